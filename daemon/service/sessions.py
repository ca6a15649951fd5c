"""Sessions and tenants: who is connected, what each tenant's acquires met, and the stats views
(an admin sees everything; a client sees its own tenant only, never other tenants' routing)."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from expertd.daemon import protocol as proto
from expertd.daemon.core.cache_core import TenantCounters

if TYPE_CHECKING:
    from expertd.daemon.service.server import Server

DAEMON_VERSION = "0.1.0"


@dataclasses.dataclass
class Session:
    name: str
    tenant: str
    pid: int
    since: float
    role: str = "client"  # or "admin": shutdown, every tenant's stats
    requests: int = 0
    uid: int = -1  # ipc://: the peer's user as the kernel says (-1: tcp://, unknown)
    started: int | None = None  # ipc://: the peer process's start time, to tell it died
    protocol: int = proto.PROTOCOL_VERSION  # the version the client said hello with (2: no tier "auto")


def daemon_stats(server: Server) -> dict[str, Any]:
    """Everything an admin may see: the manager's counters, the daemon's, every session and tenant."""
    stats = server.manager.stats()
    stats["daemon"] = {
        "version": DAEMON_VERSION,
        "pid": os.getpid(),
        "address": server.address,
        "uptime_s": server.clock() - server.started_at,
        "store": str(server.config.store),
        "model": server.manifest.model,
        "num_layers": server.manifest.num_layers,
        "num_experts": server.manifest.num_experts,
        "expert_bytes": server.manifest.raw_bytes,
        "direct_io": server.reader.direct,
        "device": server.config.tiers_device,
    }
    stats["acquires"] = dict(server.acquires)
    if server.host_compute is not None:
        stats["host_compute"] = server.host_compute.to_json()
    stats["messages"] = dict(server.messages)
    if server.residency is not None:
        stats["fast_path"] = server.residency.stats()
    stats["sessions"] = session_rows(server)
    stats["isolation"] = server.core.isolation_stats()
    stats["tenants"] = server.core.tenant_stats()
    return stats


def session_rows(server: Server) -> list[dict[str, Any]]:
    """One row per connected client."""
    leases = server.manager.client_summary()
    return [
        {
            "name": s.name,
            "tenant": s.tenant,
            "pid": s.pid,
            "connected_s": server.clock() - s.since,
            "requests": s.requests,
            "leases": leases.get(identity, (0, 0))[0],
            "pending": leases.get(identity, (0, 0))[1],
        }
        for identity, s in server.sessions.items()
    ]


def tenant_stats(server: Server, tenant: str) -> dict[str, Any]:
    """What a non-admin client may see: its own tenant's counters and sessions, nothing shared."""
    counters = server.core.counters.get(tenant, TenantCounters())
    return {
        "tenant": tenant,
        **dataclasses.asdict(counters),
        "hit_rate": counters.hits / counters.accesses if counters.accesses else 0.0,
        "sessions": [s for s in session_rows(server) if s["tenant"] == tenant],
    }


def status_line(server: Server) -> str:
    """One line for systemd's status."""
    stats = server.manager.stats()["tiers"]
    parts = [f"{len(server.sessions)} clients"]
    for name, tier in stats.items():
        parts.append(f"{name} {tier['used']}/{tier['slots']} slots, hit {tier['hit_rate']:.1%}")
    return "serving: " + "; ".join(parts)
