"""A pack's store is readable by the service that serves it, and a stopped pack leaves nothing behind."""

from __future__ import annotations

import grp
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from expertd.daemon.cli.main import main
from expertd.daemon.store.manifest import StoreError
from expertd.daemon.store.pack import pack_synthetic
from expertd.daemon.store.partials import (
    OWNER_NAME,
    UNOWNED_STALE_S,
    PackInterrupted,
    find_partials,
    signals_deferred,
    signals_unwind,
)

SMALL = {"preset": "olmoe-1b-7b", "scale": 64, "layers": 1}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_store_is_world_readable_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)  # a root shell's umask made the store 0700 and experts.bin executable
    try:
        pack_synthetic(tmp_path / "new" / "parent" / "store", **SMALL)
    finally:
        os.umask(old)
    store = tmp_path / "new" / "parent" / "store"
    assert _mode(store) == 0o755
    assert _mode(store / "experts.bin") == 0o644
    assert _mode(store / "manifest.json") == 0o644
    assert _mode(tmp_path / "new") == _mode(tmp_path / "new" / "parent") == 0o755  # made by the pack
    assert sorted(p.name for p in store.iterdir()) == ["experts.bin", "manifest.json"]  # no owner record


def test_group_store_is_readable_by_that_group_only(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid())  # a group the packer belongs to, whoever runs the test
    pack_synthetic(tmp_path / "store", group=group.gr_name, **SMALL)
    store = tmp_path / "store"
    for path, mode in [(store, 0o750), (store / "experts.bin", 0o640), (store / "manifest.json", 0o640)]:
        assert _mode(path) == mode, path
        assert path.stat().st_gid == group.gr_gid, path


def test_pack_command_takes_a_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    group = grp.getgrgid(os.getgid())
    argv = ["pack", "--synthetic", "olmoe-1b-7b", "--scale", "64", "--layers", "1", "--quiet"]
    assert main([*argv, "--group", group.gr_name, str(tmp_path / "store")]) == 0
    assert _mode(tmp_path / "store" / "experts.bin") == 0o640
    assert main([*argv, "--group", "no-such-group-here", str(tmp_path / "other")]) == 2
    assert "--group no-such-group-here: no such group" in capsys.readouterr().err


def test_unknown_group_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="--group no-such-group-here: no such group"):
        pack_synthetic(tmp_path / "store", group="no-such-group-here", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_a_parent_others_cannot_enter_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    assert main(["pack", "--synthetic", "olmoe-1b-7b", "--scale", "64", "--layers", "1", "--quiet",
                 str(closed / "store")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "other users cannot enter" in err and f"{closed} (mode 0700)" in err


def _wait_for(predicate, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _pack_signalled_while_writing(parent: Path, signum: int) -> tuple[subprocess.Popen[str], str]:
    """Start a real `expertd pack` into parent/store, send ``signum`` once it is writing data."""
    # 64 experts of 12 MiB: long enough to be caught mid-way on any machine
    argv = [sys.executable, "-m", "expertd.daemon", "pack", "--synthetic", "olmoe-1b-7b", "--layers", "1",
            "--quiet", str(parent / "store")]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:

        def writing() -> bool:
            return any((p / "experts.bin").exists() and (p / "experts.bin").stat().st_size > 0
                       for p in parent.glob(".store.partial-*"))  # fmt: skip

        assert _wait_for(writing, 60), "the pack never started writing"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return proc, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signalled_pack_removes_its_partial_and_exits_non_zero(tmp_path: Path, signum: int) -> None:
    proc, err = _pack_signalled_while_writing(tmp_path, signum)
    assert proc.returncode == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name}" in err
    assert list(tmp_path.iterdir()) == []  # neither the store nor the partial


def test_a_sigkilled_packs_partial_is_removed_by_the_next_pack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc, _ = _pack_signalled_while_writing(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    (left,) = tmp_path.glob(".store.partial-*")  # SIGKILL cannot be caught: the partial stays
    assert json.loads((left / OWNER_NAME).read_text())["pid"] == proc.pid
    pack_synthetic(tmp_path / "other", **SMALL)  # another store, same parent
    err = capsys.readouterr().err
    assert f"removed stale partial store {left} (" in err and f"its pack (pid {proc.pid}) is gone" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_a_signal_during_the_renames_is_acted_on_after_them() -> None:
    done = []
    with pytest.raises(PackInterrupted, match="SIGTERM"), signals_unwind():
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now, and only noted the signal
            done.append("renamed")
        done.append("after")  # not reached: the signal is raised as the block ends
    assert done == ["renamed"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the pid space wraps, which the start time catches)


def _plant_partial(parent: Path, name: str, owner: dict[str, object] | None) -> Path:
    partial = parent / name
    partial.mkdir(parents=True)
    (partial / "experts.bin").write_bytes(bytes(1 << 20))
    if owner is not None:
        (partial / OWNER_NAME).write_text(json.dumps(owner))
    return partial


def test_next_pack_removes_a_killed_packs_partial_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    dead = _plant_partial(
        tmp_path,
        ".other.partial-k1ll3d00",
        {"pid": _dead_pid(), "start_ticks": 1, "host": socket.gethostname()},
    )
    assert main(["pack", "--synthetic", "olmoe-1b-7b", "--scale", "64", "--layers", "1", "--quiet",
                 str(tmp_path / "store")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert f"removed stale partial store {dead} (1.0 MiB; its pack (pid" in err and "is gone" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_running_packs_partial_is_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = int(Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        live = _plant_partial(
            tmp_path,
            ".other.partial-l1ve0000",
            {"pid": sleeper.pid, "start_ticks": ticks, "host": socket.gethostname()},
        )
        # the same pid with another start time is a reused pid: that owner is gone
        reused = _plant_partial(
            tmp_path,
            ".x.partial-reused00",
            {"pid": sleeper.pid, "start_ticks": ticks + 1, "host": socket.gethostname()},
        )
        pack_synthetic(tmp_path / "store", **SMALL)
    finally:
        sleeper.kill()
        sleeper.wait()
    err = capsys.readouterr().err
    assert f"left partial store {live} (1.0 MiB; pack pid {sleeper.pid} is still running)" in err
    assert live.exists() and not reused.exists()


def test_a_partial_this_process_is_still_writing_is_left_alone(tmp_path: Path) -> None:
    from expertd.daemon.store.pack import SYNTHETIC_PRESETS, StoreWriter, synthetic_layout

    tensors, raw_bytes = synthetic_layout(SYNTHETIC_PRESETS["olmoe-1b-7b"], 64)
    with StoreWriter(tmp_path / "slow", tensors, raw_bytes) as writer:  # another thread's pack, say
        pack_synthetic(tmp_path / "store", **SMALL)
        assert writer.tmp.exists()
    assert not writer.tmp.exists()  # never committed: removed on the way out


def test_a_partial_without_owner_is_stale_only_once_idle(tmp_path: Path) -> None:
    fresh = _plant_partial(tmp_path, ".a.partial-fresh000", None)
    idle = _plant_partial(tmp_path, ".b.partial-idle0000", None)
    past = time.time() - UNOWNED_STALE_S - 5
    for path in [idle, idle / "experts.bin"]:
        os.utime(path, (past, past))
    judged = {p.path.name: p for p in find_partials(tmp_path)}
    assert not judged[fresh.name].stale and "written 0 s ago" in judged[fresh.name].reason
    assert judged[idle.name].stale and "no owner record, untouched for" in judged[idle.name].reason
    pack_synthetic(tmp_path / "store", **SMALL)
    assert fresh.exists() and not idle.exists()


def test_a_killed_force_packs_replaced_store_is_removed_or_pointed_at(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    past = time.time() - UNOWNED_STALE_S - 5
    for name in ("done", "stranded"):  # killed after both renames / between them
        old = _plant_partial(
            tmp_path / f".{name}.old-x1x1x1x1", "store", None
        )  # .OUT.old-*/store/experts.bin
        for path in [old.parent, old, old / "experts.bin"]:
            os.utime(path, (past, past))
    (tmp_path / "done").mkdir()  # the new store got into place
    pack_synthetic(tmp_path / "store", **SMALL)
    err = capsys.readouterr().err
    assert f"removed replaced store {tmp_path / '.done.old-x1x1x1x1'} (1.0 MiB)" in err
    assert not (tmp_path / ".done.old-x1x1x1x1").exists()
    stranded = tmp_path / ".stranded.old-x1x1x1x1" / "store"
    assert f"the previous store is {stranded}; move it back to {tmp_path / 'stranded'}" in err
    assert stranded.exists()


def test_look_alike_directories_of_other_programs_are_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    past = time.time() - UNOWNED_STALE_S - 5
    foreign = []
    for name, inside in [(".notes.partial-abcdefgh", "notes.txt"), (".cache.partial-x", "experts.bin"),
                         (".photos.old-abcdefgh", "store")]:  # fmt: skip
        path = tmp_path / name
        path.mkdir()
        (path / inside).write_text("not expertd's")
        os.utime(path, (past, past))
        foreign.append(path)
    (tmp_path / "photos").mkdir()
    pack_synthetic(tmp_path / "store", **SMALL)
    assert all(path.exists() for path in foreign)
    err = capsys.readouterr().err
    assert "partial" not in err and "replaced" not in err
