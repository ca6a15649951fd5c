"""The shared-memory hit path's layout: the daemon's residency tables and a client's pin rows.

A residency table (one per tier, a shared-memory file the daemon writes and clients map
read-only) says which key each slot holds; a client's pin file (one per client, written only
by that client, read by the daemon with ``pread``) counts the slots it pins. Both sides import
these offsets, so they are declared once, here.

Table, in native-endian words:

    header   u64[8]   magic, generation, heartbeat_ns, num_slots, num_keys, 0, 0, 0
    key_of   i64[S]   the key a slot holds, -1: none a client may pin
    slot_gen u64[S]   bumped each time the slot is published (new bytes in it)
    slot_of  i32[K]   the slot a key is published in, -1: none

``generation`` is random per daemon start and 0 once the table is void (the daemon
stopped, or a new daemon found the old table); ``heartbeat_ns`` is the daemon's
``CLOCK_MONOTONIC`` at its last tick. A pin file starts with one u64 the daemon writes (the
sequence number of the client's last report it has applied: the client waits rather than run
more than `MAX_UNAPPLIED_REPORTS` ahead), then one row per tier: ``u16[S]``, how many of the
client's leases hold each slot.

The ordering argument (why a pinned slot is never overwritten) is in
`expertd.daemon.service.residency`; the client's half is `expertd.client.fastpath`.
"""

from __future__ import annotations

import fcntl
import struct

TABLE_MAGIC = 0x3154534552505845  # b"EXPRST1" little-endian, and a version
HEADER_WORDS = 8
HEADER_BYTES = HEADER_WORDS * 8
H_MAGIC, H_GENERATION, H_HEARTBEAT_NS, H_SLOTS, H_KEYS = range(5)
PIN_BYTES = 2  # u16 per slot
PINS_HEADER_BYTES = 8  # u64: the last report the daemon applied
MAX_UNAPPLIED_REPORTS = 4  # a client sends no report while this many wait in the daemon's queue
PIN_MAX = 2**16 - 1
STALE_HEARTBEAT_NS = 1_000_000_000  # a table whose daemon has not ticked this long is not used


def table_offsets(num_slots: int, num_keys: int) -> tuple[int, int, int, int]:
    """Byte offsets of ``key_of``, ``slot_gen``, ``slot_of`` and the table's total size."""
    key_of = HEADER_BYTES
    slot_gen = key_of + 8 * num_slots
    slot_of = slot_gen + 8 * num_slots
    end = slot_of + 4 * num_keys
    return key_of, slot_gen, slot_of, end


def pin_row_bytes(num_slots: int) -> int:
    """One tier's pin row, padded to 8 bytes so the next row stays aligned."""
    return -(-num_slots * PIN_BYTES // 8) * 8


# The pin file's lock: an open-file-description lock over the whole file (Linux 3.15+). Unlike a
# classic POSIX record lock it belongs to the open file, not the process: it is not dropped when
# some other descriptor of the file closes, and two opens in one process exclude each other
# (the tests drive both sides in one process). It goes when its last descriptor closes, so a
# killed client never leaves it held.
def _flock(kind: int) -> bytes:
    return struct.pack("hhqqi4x", kind, 0, 0, 0, 0)  # struct flock: type, whence, start, len 0 (all), pid 0


_EXCLUSIVE, _SHARED, _UNLOCK = _flock(fcntl.F_WRLCK), _flock(fcntl.F_RDLCK), _flock(fcntl.F_UNLCK)


def lock_pins(fd: int) -> None:
    """The client: hold its pin file exclusively (waits while the daemon reads it)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _EXCLUSIVE)


def try_lock_pins_shared(fd: int) -> bool:
    """The daemon: hold a client's pin file to read it; False while the client holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _SHARED)
    except BlockingIOError:
        return False
    except PermissionError:  # EACCES: what some systems answer instead of EAGAIN
        return False
    return True


def unlock_pins(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _UNLOCK)
