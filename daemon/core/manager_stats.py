"""The cache manager's counters, as `CacheManager.stats` reports them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from expertd.daemon.core.events import LINKS

if TYPE_CHECKING:
    from expertd.daemon.core.manager import CacheManager


def manager_stats(manager: CacheManager) -> dict[str, Any]:
    """The manager's counters and occupancy, msgpack-able."""
    tiers = {}
    for name, tier in manager.tiers.items():
        accesses, hits = sum(manager.layer_accesses[name]), sum(manager.layer_hits[name])
        tiers[name] = {
            "slots": tier.num_slots,
            "used": len(tier.slot_of),
            "filling": len(tier.filling),
            "pinned": tier.pinned_slots,
            "accesses": accesses,
            "hits": hits,
            "hit_rate": hits / accesses if accesses else 0.0,
            "evictions": tier.evictions,
            "prefetch_used": tier.prefetch_used,
            "prefetch_wasted": tier.prefetch_wasted,
            "policy": tier.policy.name,
            "waiting_admission": len(manager._admission[name]),
            "layer_accesses": list(manager.layer_accesses[name]),
            "layer_hits": list(manager.layer_hits[name]),
        }
    transfers = manager.transfers
    links = {
        link: {
            "started": transfers.started[link],
            "failed": transfers.failed[link],
            "bytes": transfers.started[link] * manager.config.expert_bytes,
            "running": transfers.running[link],
            "queued": transfers.queued(link),
        }
        for link in LINKS
    }
    prefetch = {"cancelled": manager.prefetch_cancelled, "deferred": transfers.deferred}
    if manager.prefetcher is not None:
        prefetch.update(manager.prefetcher.stats())
    return {
        "tiers": tiers,
        "links": links,
        "prefetch": prefetch,
        "placed": dict(manager.placed),
        "leases": len(manager._leases),
        "pending": len(manager._pending),
        "clients": len(manager._clients),
    }
