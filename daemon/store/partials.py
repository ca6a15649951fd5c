"""A pack's temporary directory: its owner record, stale ones left by a killed pack, and signals.

`StoreWriter` builds a store in ``.OUT.partial-XXXX`` beside OUT and renames it into place.
A pack killed with SIGKILL (or a crashed machine) cannot remove that directory, so each one
holds an owner record (`OWNER_NAME`: pid, process start time, host) and the next pack into
the same parent removes every partial whose owner is gone. SIGTERM and SIGINT do not get
that far: `signals_unwind` turns them into `PackInterrupted`, the pack's with-blocks unwind
and remove their own partial, and the command exits non-zero. A killed ``--force`` pack's
replaced store (``.OUT.old-XXXX/store``) is removed once OUT is in place, or pointed at if not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from expertd.daemon.store.manifest import DATA_NAME, MANIFEST_NAME

PARTIAL_INFIX = ".partial-"  # the temporary directory is f".{out.name}{PARTIAL_INFIX}XXXX"
OLD_INFIX = ".old-"  # `--force`: the replaced store waits in f".{out.name}{OLD_INFIX}XXXX/store"
OWNER_NAME = ".owner.json"  # inside a partial; removed before the rename into place
#: A partial without an owner record (an older expertd's, or one killed before it wrote the
#: record) counts as stale once nothing in it has changed for this long: a live pack writes
#: its data file continuously.
UNOWNED_STALE_S = 600.0
UNWIND_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PackInterrupted(Exception):
    """SIGTERM or SIGINT arrived during a pack; the partial store is removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; the partial store was removed")
        self.signum = signum


def _process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22 (starttime), counted after the ")" that ends the command name (which may hold spaces)
    return int(stat[stat.rindex(")") + 2 :].split()[19])


_OWN_ACTIVE: set[Path] = set()  # this process's partials still being written (by any thread)


def write_owner(partial: Path) -> None:
    """Record this process as the owner of ``partial``, until `release`."""
    _OWN_ACTIVE.add(partial)
    record = {
        "pid": os.getpid(),
        "start_ticks": _process_start_ticks(os.getpid()),
        "host": socket.gethostname(),
    }
    (partial / OWNER_NAME).write_text(json.dumps(record) + "\n")


def release(partial: Path) -> None:
    """``partial`` was renamed into place or removed: this process no longer writes it."""
    _OWN_ACTIVE.discard(partial)


@dataclass(frozen=True)
class Partial:
    """A partial store found beside a destination, and why it is (or is not) stale."""

    path: Path
    stale: bool
    reason: str
    size_bytes: int


def _size_and_newest_mtime(path: Path) -> tuple[int, float]:
    """Bytes under ``path`` and the newest modification time of anything in it."""
    total, newest = 0, path.lstat().st_mtime
    for entry in path.rglob("*"):
        with suppress(OSError):  # removed meanwhile
            st = entry.lstat()
            total, newest = total + st.st_size, max(newest, st.st_mtime)
    return total, newest


def judge(path: Path, *, now: float, unowned_stale_s: float = UNOWNED_STALE_S) -> Partial:
    """Whether the partial store ``path`` still has a live owner."""
    size, newest = _size_and_newest_mtime(path)
    try:
        record = json.loads((path / OWNER_NAME).read_text())
        pid, ticks, host = int(record["pid"]), record["start_ticks"], str(record["host"])
    except (OSError, ValueError, KeyError, TypeError):
        idle_s = now - newest
        if idle_s >= unowned_stale_s:
            return Partial(path, True, f"no owner record, untouched for {idle_s:.0f} s", size)
        return Partial(path, False, f"no owner record, written {idle_s:.0f} s ago", size)
    if host != socket.gethostname():
        return Partial(path, False, f"packed by pid {pid} on host {host}", size)
    if pid == os.getpid() and path in _OWN_ACTIVE:
        return Partial(path, False, "this process is still writing it", size)
    if pid != os.getpid() and _process_start_ticks(pid) == ticks and ticks is not None:
        return Partial(path, False, f"pack pid {pid} is still running", size)
    return Partial(path, True, f"its pack (pid {pid}) is gone", size)


def _ours(path: Path, infix: str, allowed: set[str]) -> bool:
    """Whether ``path`` is a directory a pack made (name and contents), not someone else's look-alike."""
    if not re.fullmatch(rf"\..+{re.escape(infix)}[a-z0-9_]{{8}}", path.name):  # tempfile.mkdtemp's names
        return False
    if path.is_symlink() or not path.is_dir():
        return False
    return {entry.name for entry in path.iterdir()} <= allowed


def find_partials(parent: Path, *, now: float | None = None) -> list[Partial]:
    """Every partial store directly under ``parent``, judged."""
    when = time.time() if now is None else now
    found = []
    try:
        entries = sorted(parent.glob(f".*{PARTIAL_INFIX}*"))
    except OSError:
        return []
    for entry in entries:
        with suppress(FileNotFoundError):  # its pack finished or cleaned up meanwhile
            if _ours(entry, PARTIAL_INFIX, {DATA_NAME, MANIFEST_NAME, OWNER_NAME}):
                found.append(judge(entry, now=when))
    return found


def remove_stale_partials(parent: Path, report: Callable[[str], None]) -> list[Partial]:
    """Remove the stale partials under ``parent``, reporting each one found; returns those removed."""
    removed = []
    for partial in find_partials(parent):
        mib = partial.size_bytes / 2**20
        if partial.stale:
            shutil.rmtree(partial.path, ignore_errors=True)
            if partial.path.exists():  # another user's, say
                report(f"cannot remove stale partial store {partial.path} ({mib:.1f} MiB; {partial.reason})")
                continue
            removed.append(partial)
            report(f"removed stale partial store {partial.path} ({mib:.1f} MiB; {partial.reason})")
        else:
            report(f"left partial store {partial.path} ({mib:.1f} MiB; {partial.reason})")
    _settle_replaced_stores(parent, report)
    return removed


def _ours_store(path: Path) -> bool:
    """Whether ``path`` (the old store inside a `.OUT.old-*`) is absent or holds only a store's files."""
    if not path.exists():
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    return {entry.name for entry in path.iterdir()} <= {DATA_NAME, MANIFEST_NAME}


def _settle_replaced_stores(parent: Path, report: Callable[[str], None]) -> None:
    """A `--force` pack killed after moving the old store aside: remove it once the new one is in
    place; if the kill came between the two renames, the old store is the only one: say where."""
    now = time.time()
    for entry in sorted(parent.glob(f".*{OLD_INFIX}*")):
        with suppress(FileNotFoundError):
            if not _ours(entry, OLD_INFIX, {"store"}) or not _ours_store(entry / "store"):
                continue
            size, newest = _size_and_newest_mtime(entry)
            if now - newest < UNOWNED_STALE_S:  # a commit may be between its renames right now
                continue
            out = parent / entry.name[1:].rsplit(OLD_INFIX, 1)[0]
            if out.exists():
                shutil.rmtree(entry, ignore_errors=True)
                report(
                    f"removed replaced store {entry} ({size / 2**20:.1f} MiB) left by a killed --force pack"
                )
            else:
                report(
                    f"a --force pack of {out} was killed between its renames: the previous store is "
                    f"{entry / 'store'}; move it back to {out} (or remove it)"
                )


_deferring = False
_deferred: list[int] = []
_unwinding = False  # a signal already raised: later ones must not interrupt the cleanup


def _unwind(signum: int, frame: FrameType | None) -> None:
    global _unwinding
    if _deferring:
        _deferred.append(signum)
        return
    if _unwinding:
        return
    _unwinding = True
    raise PackInterrupted(signum)


@contextmanager
def signals_unwind() -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT raise `PackInterrupted` (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _unwinding
    _unwinding = False
    previous = {sig: signal.signal(sig, _unwind) for sig in UNWIND_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _unwinding = False


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block (a rename that must finish), an unwinding signal waits until its end."""
    global _deferring
    if _deferring:
        yield
        return
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        if _deferred:
            signum = _deferred[0]
            _deferred.clear()
            if signal.getsignal(signum) is _unwind:
                _unwind(signum, None)
