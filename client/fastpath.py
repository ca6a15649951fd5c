"""The shared-memory hit path, client side: pin resident slots without waking the daemon.

The daemon publishes per tier which key each slot holds (a residency table, mapped read-only)
and gives this client a pin file that only it writes. An acquire whose experts are all
published pins their slots in the client's own row and is served at once; anything else (a
miss, a void or silent table, a full row) takes the socket. The daemon learns of every such
hit afterwards, in order, from `Report` messages (sent before any other message of this
client, or after ``release_linger_s``).

The pin is taken with the pin file's POSIX lock held, and the slot re-checked under it: the
daemon retires a slot before it takes the same lock to read this row, so either it sees the
pin (and holds its write back) or this client sees the slot retired. The full argument is in
`expertd.daemon.service.residency`. It leans on x86-64's store order for publishing, so the
path is on there only (`SUPPORTED`).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import platform
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from expertd.daemon.protocol import ProtocolError, Report
from expertd.daemon.protocol.local import SHM_PREFIX, open_shm_readonly
from expertd.daemon.protocol.residency import (
    H_GENERATION,
    H_HEARTBEAT_NS,
    H_KEYS,
    H_MAGIC,
    H_SLOTS,
    HEADER_BYTES,
    MAX_UNAPPLIED_REPORTS,
    PIN_MAX,
    PINS_HEADER_BYTES,
    STALE_HEARTBEAT_NS,
    TABLE_MAGIC,
    lock_pins,
    pin_row_bytes,
    table_offsets,
    unlock_pins,
)

SUPPORTED = platform.machine() in ("x86_64", "AMD64")
REPORT_FLUSH_EVENTS = 128  # a report goes out once this many events wait (the wire allows 256)


class FastTier:
    """One tier's residency table (read-only) and this client's pin row for it."""

    def __init__(self, handle: Mapping[str, Any], num_keys: int, pins: memoryview, max_pinned: int) -> None:
        self._mapping, self._array = open_shm_readonly(dict(handle["table"]))
        view = memoryview(self._mapping)
        self.header = view[:HEADER_BYTES].cast("Q")
        self.num_slots = int(self.header[H_SLOTS])
        key_of, slot_gen, slot_of, end = table_offsets(self.num_slots, num_keys)
        if self.header[H_MAGIC] != TABLE_MAGIC or self.header[H_KEYS] != num_keys or end > len(view):
            raise ProtocolError(f"residency table {handle['table'].get('path')!r} does not match the hello")
        self.key_of = view[key_of:slot_gen].cast("q")
        self.slot_gen = view[slot_gen:slot_of].cast("Q")
        self.slot_of = view[slot_of:end].cast("i")
        offset = int(handle["pins_offset"])
        if offset % 8 or offset + pin_row_bytes(self.num_slots) > len(pins):
            raise ProtocolError(f"pin row at {offset} does not fit the pin file")
        self.row = pins[offset : offset + 2 * self.num_slots].cast("H")
        self.max_pinned = max_pinned
        self.pinned = 0


class FastPath:
    """Every tier's table and pin row, the pin file's lock, and the report not yet sent."""

    def __init__(self, tiers: Mapping[str, Mapping[str, Any]], num_layers: int, num_experts: int) -> None:
        handles = {tier: h["fast"] for tier, h in tiers.items() if isinstance(h.get("fast"), Mapping)}
        if not handles:
            raise ProtocolError("no tier offers shared-memory hits")
        paths = {str(h["pins"]) for h in handles.values()}
        generations = {int(h["generation"]) for h in handles.values()}
        if len(paths) != 1 or len(generations) != 1:
            raise ProtocolError("tiers name different pin files or generations")
        path = Path(paths.pop())
        if not path.name.startswith(SHM_PREFIX) or path.parent != Path("/dev/shm"):
            raise ProtocolError(f"refusing pin file {path}: not an expertd file")
        self.generation = generations.pop()
        self.num_layers, self.num_experts = num_layers, num_experts
        self.fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            size = os.fstat(self.fd).st_size
            self._pins_map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            pins = memoryview(self._pins_map)
            self.applied = pins[:PINS_HEADER_BYTES].cast("Q")  # the daemon's: its last report applied
            self.tiers = {
                tier: FastTier(h, num_layers * num_experts, pins, int(tiers[tier].get("max_pinned", 0)))
                for tier, h in handles.items()
            }
        except BaseException:
            os.close(self.fd)
            raise
        self.path = path
        self.lock = threading.Lock()  # the row and the report, between this process's threads
        self.events: list[list[Any]] = []
        self.since = 0.0  # when the oldest unsent event was queued
        self.seq = 0
        self.void = False  # the table's daemon is gone: never again
        self._ids = itertools.count(1)
        self.hits = 0

    def pin(
        self, layer: int, experts: list[int], tier: str, generation: int | None
    ) -> tuple[int, tuple[int, ...]] | None:
        """Pin every expert's slot and queue the hit's report: ``(fast id, slots)``; None: use the socket."""
        fast = self.tiers.get(tier)
        if fast is None or self.void:
            return None
        header = fast.header
        if header[H_GENERATION] != self.generation:
            self.void = True  # the daemon stopped, or a new one found this table: hello again
            return None
        if time.monotonic_ns() - header[H_HEARTBEAT_NS] > STALE_HEARTBEAT_NS:
            return None  # the daemon has not ticked lately: ask it
        if not 0 <= layer < self.num_layers or not experts:
            return None
        base = layer * self.num_experts
        with self.lock:
            if fast.pinned + len(experts) > fast.max_pinned:
                return None
            lock_pins(self.fd)  # the fence of the ordering argument
            try:
                slots = self.check(fast, base, experts)
                if slots is None:
                    return None
                self.store(fast, slots)
            finally:
                unlock_pins(self.fd)
            fast_id = next(self._ids)
            self._queue([fast_id, layer, tier, list(experts), slots, generation])
            self.hits += 1
        return fast_id, tuple(slots)

    def check(self, fast: FastTier, base: int, experts: list[int]) -> list[int] | None:
        """With the pin file locked: the slots of keys ``base + e``, if each is published; else None."""
        num_experts, slot_of, key_of, row = self.num_experts, fast.slot_of, fast.key_of, fast.row
        slots = []
        for expert in experts:
            if not 0 <= expert < num_experts:
                return None
            key = base + expert
            slot = slot_of[key]
            if slot < 0 or key_of[slot] != key or row[slot] >= PIN_MAX:
                return None
            slots.append(slot)
        return slots if len(set(slots)) == len(slots) else None  # duplicates: the daemon says why

    @staticmethod
    def store(fast: FastTier, slots: list[int]) -> None:
        """With the pin file locked: count the pins (the daemon reads them under the same lock)."""
        row = fast.row
        for slot in slots:
            row[slot] += 1
        fast.pinned += len(slots)

    def unpin(self, fast_id: int, tier: str, slots: tuple[int, ...]) -> None:
        """Let the slots go (no lock: a late-seen unpin only holds a write back longer)."""
        fast = self.tiers[tier]
        row = fast.row
        with self.lock:
            for slot in slots:
                row[slot] -= 1
            fast.pinned -= len(slots)
            self._queue([fast_id])

    def _queue(self, event: list[Any]) -> None:
        if not self.events:
            self.since = time.monotonic()
        self.events.append(event)

    def take_report(self) -> Report | None:
        """The events so far as the next report (None: none wait)."""
        with self.lock:
            if not self.events:
                return None
            events, self.events = self.events, []
            self.seq += 1
            return Report(self.seq, events)

    def behind(self, seq: int) -> bool:
        """Would report ``seq`` run more than `MAX_UNAPPLIED_REPORTS` ahead of the daemon?"""
        return seq - self.applied[0] > MAX_UNAPPLIED_REPORTS

    def requeue(self, report: Report) -> None:
        """A report that could not be sent goes back in front of what came since."""
        with self.lock:
            self.events[:0] = report.events
            self.seq -= 1

    def slot_generation(self, tier: str, slot: int) -> int:
        """How often the daemon published new bytes in ``slot``: unchanged while it is pinned."""
        return int(self.tiers[tier].slot_gen[slot])

    def close(self) -> None:
        """Unmap this client's side (views of the slabs live on; their slots are not pinned)."""
        for fast in self.tiers.values():
            for view in (fast.row, fast.header, fast.key_of, fast.slot_gen, fast.slot_of):
                view.release()
        self.applied.release()
        self.tiers = {}
        self.void = True
        with contextlib.suppress(BufferError):  # a view still alive keeps it mapped
            self._pins_map.close()
        os.close(self.fd)
