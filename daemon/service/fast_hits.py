"""Reports of hits served from shared memory: the daemon accounts them as the acquires they
were, in the order the client saw them (`expertd.daemon.core.reported`)."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from expertd.daemon.protocol import Report

if TYPE_CHECKING:
    from expertd.daemon.service.server import Server

log = logging.getLogger("expertd")


def apply_report(server: Server, identity: Any, report: Report, now: float) -> None:
    """Each event in order: a hit becomes a lease in the core, a release ends it."""
    residency = server.residency
    if residency is None or identity not in residency.clients:
        return  # not a fast client (any more): nothing it says is taken
    residency.counters["reports"] += 1
    if report.seq != residency.seq[identity] + 1:
        residency.counters["report_gaps"] += 1
        log.warning("client report %d after %d: some went missing", report.seq, residency.seq[identity])
    residency.seq[identity] = report.seq
    with contextlib.suppress(OSError):  # a pin file its owner broke: the next row read drops it
        residency.clients[identity].applied(report.seq)  # first: the client may send the next one now
    leases = residency.leases[identity]
    pinned = residency.pinned[identity]
    caps = residency.caps[identity]
    core = server.core
    assert core is not None
    released = False
    for event in report.events:
        fast_id = event[0]
        if len(event) == 1:
            held = leases.pop(fast_id, None)
            if held is not None:
                lease_id, tier, count = held
                pinned[tier] -= count
                if lease_id is not None:
                    core.release(identity, [lease_id], now, settle=False)
                    released = True
            continue
        _, layer, tier, experts, slots, generation = event
        if tier not in residency.tables or fast_id in leases or pinned[tier] + len(slots) > caps.get(tier, 0):
            residency.counters["refused_hits"] += 1  # more than its row may pin: not taken
            continue
        lease_id, commands = core.reported_hit(identity, layer, experts, tier, slots, now, generation)
        leases[fast_id] = (lease_id, tier, len(slots))
        pinned[tier] += len(slots)
        if lease_id is None:
            residency.counters["stale_hits"] += 1
        server._execute(commands)
    if released:  # once per report: what the freed slots let start
        server._execute(core.settle(now))
