"""The shared-memory hit path, daemon side: residency tables, clients' pin files, the write gate.

The core decides; this mirror publishes what it decided where clients can see it without a
round trip. A slot is *published* (a client may pin it) once the transfer that filled it has
finished; it is *retired* (unpublished) before the next transfer into it is handed to the
engine, and that transfer starts only once no client's pin row holds the slot. The daemon
stays the only evictor; a client only ever stops a write from starting.

Why a pinned slot is never overwritten (the ordering argument). Each client ``c`` has a pin
file with a lock ``L_c`` (an open-file-description lock: `expertd.daemon.protocol.residency`).
The client pins (`expertd.client.fastpath`) with ``L_c`` held exclusively: it reads the table,
and only if ``key_of[s] == k`` for every slot it wants does it store ``pin_c[s] += 1``, then
unlocks. The daemon, before a transfer into ``s``: (1) stores ``key_of[s] = -1`` (retire), then
(2) for every client takes ``L_c`` shared, reads ``pin_c`` with ``pread`` and unlocks. The lock
orders the two critical sections: if the client's came first, its pin store happens-before the
daemon's read (the kernel's unlock is a release, its lock an acquire), so the daemon sees the
pin and defers the write; if the daemon's came first, its retire store (before its lock in
program order) happens-before the client's table read, so the client sees ``-1`` and takes the
socket path. There is no third order. Unpinning needs no lock: a late-seen unpin only defers a write.
Publishing needs no lock on x86-64 (TSO: the slot's bytes, written before the engine's
completion message, are visible before ``key_of[s]``, stores are not reordered); the client
turns the path off on other architectures (`expertd.client.fastpath.SUPPORTED`).

A client's pins count as its leases for what it may hold: a row with more pinned slots than
its ``max_pinned``, a pin file that cannot be read, or a pin that keeps a write waiting
longer than the lease timeout ends its session (`Residency.misbehaving`), exactly as a silent
client's leases are taken back; after that its row is never read again. Garbage in its own
row can thus delay writes into slots it names, by at most the lease timeout, and never
changes what bytes anyone is served.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from expertd.daemon.core.events import TIER_OF_LINK, StartTransfer
from expertd.daemon.protocol.local import SHM_PREFIX
from expertd.daemon.protocol.residency import (
    H_GENERATION,
    H_HEARTBEAT_NS,
    H_KEYS,
    H_MAGIC,
    H_SLOTS,
    HEADER_WORDS,
    PINS_HEADER_BYTES,
    TABLE_MAGIC,
    pin_row_bytes,
    table_offsets,
    try_lock_pins_shared,
    unlock_pins,
)
from expertd.daemon.service.slabs import PAGE_BYTES, SHM_DIR, _ShmSlab, pid_alive

log = logging.getLogger("expertd")

SLOW_UNPIN_S = 1.0  # a write held back this long by one client's pins is logged
CLEAR, PUBLISHED, RETIRING = 0, 1, 2  # a slot's state: nobody may pin it / may / not yet known unpinned


class ResidencyTable:
    """One tier's table in shared memory (layout: `expertd.daemon.protocol.residency`)."""

    def __init__(self, tier: str, num_slots: int, num_keys: int, generation: int) -> None:
        key_of, slot_gen, slot_of, end = table_offsets(num_slots, num_keys)
        self.tier = tier
        self.shm = _ShmSlab(f"table-{tier}", -(-end // PAGE_BYTES), PAGE_BYTES)
        self.path = self.shm.path
        raw = self.shm.array
        self.header = raw[: HEADER_WORDS * 8].view(np.uint64)
        self.key_of = raw[key_of:slot_gen].view(np.int64)
        self.slot_gen = raw[slot_gen:slot_of].view(np.uint64)
        self.slot_of = raw[slot_of:end].view(np.int32)
        self.key_of[:] = -1
        self.slot_of[:] = -1
        self.state = np.zeros(num_slots, dtype=np.int8)
        self.header[H_SLOTS], self.header[H_KEYS] = num_slots, num_keys
        self.header[H_MAGIC] = TABLE_MAGIC
        self.beat()
        self.header[H_GENERATION] = generation  # last: a table is valid once its generation is set

    def beat(self) -> None:
        self.header[H_HEARTBEAT_NS] = time.monotonic_ns()

    def publish(self, slot: int, key: int) -> None:
        """``slot`` holds ``key``'s bytes now (its transfer finished): clients may pin it."""
        self.slot_gen[slot] += 1
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.state[slot] = PUBLISHED

    def retire(self, slot: int) -> None:
        """No new pins of ``slot``: a transfer will overwrite it once no row holds it."""
        key = int(self.key_of[slot])
        self.key_of[slot] = -1
        if key >= 0 and self.slot_of[key] == slot:
            self.slot_of[key] = -1
        self.state[slot] = RETIRING

    def handle(self) -> dict[str, Any]:
        return {"path": str(self.path), "slots": self.shm.num_slots, "slot_bytes": PAGE_BYTES}

    def close(self) -> None:
        """Void the table for clients that still map it, then free it."""
        self.header[H_GENERATION] = 0
        self.shm.close()


class PinFile:
    """One client's pin rows: a file the client writes, read here only under its lock."""

    def __init__(self, path: Path, fd: int, offsets: dict[str, int], sizes: dict[str, int]) -> None:
        self.path, self.fd, self.offsets, self.sizes = path, fd, offsets, sizes
        self.blocking_since: float | None = None  # when it first kept a write waiting
        self.warned = False

    def rows(self) -> dict[str, np.ndarray] | None:
        """Every tier's row, read under the client's lock; None while the client holds it."""
        if not try_lock_pins_shared(self.fd):
            return None
        try:
            out = {}
            for tier, offset in self.offsets.items():
                size = self.sizes[tier]
                data = os.pread(self.fd, 2 * size, offset)
                if len(data) != 2 * size:  # truncated by its owner: unreadable
                    raise OSError(errno.EIO, f"pin file {self.path.name} is {offset + len(data)} bytes")
                out[tier] = np.frombuffer(data, dtype=np.uint16)
            return out
        finally:
            unlock_pins(self.fd)

    def applied(self, seq: int) -> None:
        """Tell the client its report ``seq`` is in (it holds back reports past a few ahead)."""
        os.pwrite(self.fd, struct.pack("=Q", seq), 0)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class Residency:
    """Tables of every tier, pin files of every fast client, and the transfers they hold back."""

    def __init__(self, tiers: dict[str, int], num_keys: int, lease_timeout_s: float) -> None:
        self.generation = secrets.randbits(63) | 1
        self.tables: dict[str, ResidencyTable] = {}
        try:
            for tier, slots in tiers.items():
                self.tables[tier] = ResidencyTable(tier, slots, num_keys, self.generation)
        except BaseException:
            self.close()
            raise
        self.lease_timeout_s = lease_timeout_s
        self.clients: dict[Any, PinFile] = {}
        self.caps: dict[Any, dict[str, int]] = {}
        self._writes: dict[int, tuple[str, int, int]] = {}  # transfer id -> (tier, slot, key)
        self.deferred: list[StartTransfer] = []
        self.misbehaving: list[Any] = []  # clients to drop (the server forgets them)
        # client -> its fast id -> (the core's lease id, tier, slots); and slots so held, per tier
        self.leases: dict[Any, dict[int, tuple[int | None, str, int]]] = {}
        self.pinned: dict[Any, dict[str, int]] = {}
        self.seq: dict[Any, int] = {}  # client -> the last report's sequence number
        self._files = 0
        self.counters = {"deferred": 0, "revoked": 0, "reports": 0, "report_gaps": 0, "stale_hits": 0}
        self.counters["refused_hits"] = 0

    # --- clients ----------------------------------------------------------------------------

    def add_client(self, client: Any, uid: int, max_pinned: dict[str, int]) -> dict[str, dict[str, Any]]:
        """A pin file for ``client`` (a process of ``uid``); per tier what its hello says. {}: none."""
        euid = os.geteuid()
        if uid < 0 or (uid != euid and euid != 0):
            return {}  # tcp://, or a user whose file this daemon could neither chown nor read
        self._files += 1
        path = SHM_DIR / f"{SHM_PREFIX}{os.getpid()}-pins-{self._files}"
        offsets, sizes, end = {}, {}, PINS_HEADER_BYTES
        for tier, table in self.tables.items():
            offsets[tier], sizes[tier] = end, table.state.size
            end += pin_row_bytes(table.state.size)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, max(end, 8))
            if uid != euid:
                os.fchown(fd, uid, -1)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self.clients[client] = PinFile(path, fd, offsets, sizes)
        self.caps[client] = max_pinned
        self.leases[client], self.seq[client] = {}, 0
        self.pinned[client] = dict.fromkeys(self.tables, 0)
        return {
            tier: {
                "table": table.handle(),
                "generation": self.generation,
                "pins": str(path),
                "pins_offset": offsets[tier],
            }
            for tier, table in self.tables.items()
        }

    def drop_client(self, client: Any) -> None:
        """The client left, died or was expelled: its row is never read again."""
        pins = self.clients.pop(client, None)
        self.caps.pop(client, None)
        self.leases.pop(client, None)
        self.pinned.pop(client, None)
        self.seq.pop(client, None)
        if pins is not None:
            pins.close()

    # --- the write gate ---------------------------------------------------------------------

    def start(self, command: StartTransfer, now: float) -> bool:
        """May ``command`` be handed to the engine now? False: it waits in `deferred`."""
        tier = TIER_OF_LINK[command.link]
        table = self.tables[tier]
        self._writes[command.transfer_id] = (tier, command.dst_slot, command.key)
        slot = command.dst_slot
        if table.state[slot] == PUBLISHED:
            table.retire(slot)  # (1) of the ordering argument: before any lock is taken
        if table.state[slot] == RETIRING:
            if self._blocked({tier: [slot]}, now):
                self.deferred.append(command)
                self.counters["deferred"] += 1
                return False
            table.state[slot] = CLEAR
        return True

    def ready(self, now: float) -> list[StartTransfer]:
        """Deferred transfers whose slots no pin row holds any more (they may start)."""
        if not self.deferred:
            return []
        wanted: dict[str, list[int]] = {}
        for command in self.deferred:
            wanted.setdefault(TIER_OF_LINK[command.link], []).append(command.dst_slot)
        held = self._held(wanted, now)
        if held is None:
            return []
        out, waiting = [], []
        for command in self.deferred:
            tier = TIER_OF_LINK[command.link]
            if command.dst_slot in held[tier]:
                waiting.append(command)
            else:
                self.tables[tier].state[command.dst_slot] = CLEAR
                out.append(command)
        self.deferred = waiting
        return out

    def held(self, tier: str, slot: int) -> bool:
        """Does a client's row pin ``slot`` now (or is a row locked, so it may)? The core asks
        before a prefetch evicts: a pin it has not heard of yet must not hold back a write that
        the pinning client may itself be waiting for."""
        if not self.clients or self.tables[tier].state[slot] != PUBLISHED:
            return False
        held = self._held({tier: [slot]}, time.monotonic())
        return held is None or bool(held[tier])

    def done(self, transfer_id: int, ok: bool) -> None:
        """A transfer finished: its slot holds its key (publish), or nothing (a failure)."""
        write = self._writes.pop(transfer_id, None)
        if write is not None and ok:
            tier, slot, key = write
            self.tables[tier].publish(slot, key)

    def _blocked(self, wanted: dict[str, list[int]], now: float) -> bool:
        held = self._held(wanted, now)
        return held is None or any(held.values())

    def _held(self, wanted: dict[str, list[int]], now: float) -> dict[str, set[int]] | None:
        """Of ``wanted`` slots, those some live client's row pins (None: a row is locked now)."""
        held: dict[str, set[int]] = {tier: set() for tier in wanted}
        busy = False
        for client, pins in list(self.clients.items()):
            try:
                rows = pins.rows()
            except OSError as exc:
                log.warning("pin file %s unreadable (%s): its client is dropped", pins.path.name, exc)
                self._expel(client)
                continue
            if rows is None:
                busy = True
                self._blocking(client, pins, now)
                continue
            caps = self.caps[client]
            if any(int(np.count_nonzero(row)) > caps.get(tier, 0) for tier, row in rows.items()):
                log.warning("pin file %s pins more than its client may: it is dropped", pins.path.name)
                self._expel(client)
                continue
            blocking = False
            for tier, slots in wanted.items():
                row = rows[tier]
                for slot in slots:
                    if row[slot]:
                        held[tier].add(slot)
                        blocking = True
            if blocking:
                self._blocking(client, pins, now)
            else:
                pins.blocking_since = None
        return None if busy else held

    def _blocking(self, client: Any, pins: PinFile, now: float) -> None:
        if pins.blocking_since is None:
            pins.blocking_since = now
            pins.warned = False
        elif not pins.warned and now - pins.blocking_since > SLOW_UNPIN_S:
            pins.warned = True
            slots = {TIER_OF_LINK[c.link]: c.dst_slot for c in self.deferred}
            log.warning(
                "pin file %s has kept writes into %s waiting %.1f s",
                pins.path.name,
                slots,
                now - pins.blocking_since,
            )
        elif now - pins.blocking_since > self.lease_timeout_s:
            log.warning("pin file %s kept a write waiting past the lease timeout: dropped", pins.path.name)
            self._expel(client)

    def _expel(self, client: Any) -> None:
        self.drop_client(client)
        self.misbehaving.append(client)
        self.counters["revoked"] += 1

    # --- life --------------------------------------------------------------------------------

    def tick(self) -> None:
        for table in self.tables.values():
            table.beat()

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "clients": len(self.clients), "waiting_writes": len(self.deferred)}

    def close(self) -> None:
        for client in list(self.clients):
            self.drop_client(client)
        for table in self.tables.values():
            table.close()
        self.tables.clear()


def void_stale_tables(shm_dir: Path = SHM_DIR) -> int:
    """Before stale files go: set the generation of every dead daemon's table to 0, so that its
    clients, which still map it, stop pinning from it (they fall back to the socket)."""
    voided = 0
    for path in shm_dir.glob(f"{SHM_PREFIX}*-table-*"):
        try:
            pid = int(path.name[len(SHM_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            if path.lstat().st_uid != os.geteuid():
                continue
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            try:
                os.pwrite(fd, b"\0" * 8, H_GENERATION * 8)
                voided += 1
            finally:
                os.close(fd)
    return voided
