"""Hits a client served itself from shared memory, reported afterwards: the same accounting as
an acquire answered at once, so the policies, the predictors and the counters see one access
stream whichever path a hit took (and replay, which knows no fast path, agrees).

A report can come late: another client's miss may have reassigned a slot the core thought
free while the client still held it pinned in its own row (the service's write gate made the
transfer wait, so the client read the right bytes). Such a key is counted as accessed but not
as a hit (`_stale`).

A reported lease pins its slots like any lease but does not count against the client's cap
(``[clients] max_pinned_share``) for acquires: the client's view of what it holds runs one
report ahead of the core's, and its fast-path pins are bounded on their own (its row and its
reports, each at most the cap: `expertd.daemon.service.residency`, `...service.fast_hits`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from expertd.daemon.core.events import ClientId, Command, Predict
from expertd.daemon.core.manager_config import LeaseRecord

if TYPE_CHECKING:
    from expertd.daemon.core.manager import CacheManager


def reported_hit(
    manager: CacheManager,
    client: ClientId,
    layer: int,
    experts: Sequence[int],
    tier: str,
    slots: Sequence[int],
    now: float,
    generation: Hashable = None,
) -> tuple[int | None, int, list[Command]]:
    """Account a fast-path hit as `CacheManager.acquire`'s hit path would have: ``(lease id or
    None, keys that were hits, the deferred prediction work)``. The lease pins what it names
    until `CacheManager.release_many`; None: nothing checked out (a stale or invalid report)."""
    geometry = manager.geometry
    target = manager.tiers.get(tier)
    if (
        target is None
        or not 0 <= layer < geometry.num_layers
        or not experts
        or len(experts) != len(slots)
        or len(set(experts)) != len(experts)
        or not all(0 <= e < geometry.num_experts for e in experts)
    ):
        return None, 0, []
    state = manager._touch(client, now)
    keys = [layer * geometry.num_experts + expert for expert in experts]
    slot_of, filling = target.slot_of, target.filling
    if not all(slot_of.get(k) == s and s not in filling for k, s in zip(keys, slots, strict=True)):
        return _stale(manager, state, client, layer, keys, tier, slots), 0, []
    if layer <= state.last_layer:  # as `CacheManager.acquire`: a new forward pass
        state.forward = next(manager._forwards)
    state.last_layer = layer
    t0 = manager.t
    manager.t += len(keys)
    reply = manager._grant_ready(client, state, 0, tier, layer, keys, list(slots), t0)
    manager._leases[reply.lease_id].counted = False
    out: list[Command] = []
    if manager.prefetcher is not None:
        out.append(Predict(client, generation, layer, tuple(experts)))
    return reply.lease_id, len(keys), out


def _stale(
    manager: CacheManager,
    state: Any,
    client: ClientId,
    layer: int,
    keys: list[int],
    tier: str,
    slots: Sequence[int],
) -> int | None:
    """A report the core's residency moved past: counted as accesses, no policy update; the
    slots that still hold a ready key are pinned all the same (the client holds them in its row,
    and victims chosen among them would only wait for its unpin), the others are not."""
    target = manager.tiers[tier]
    manager.t += len(keys)
    manager.layer_accesses[tier][layer] += len(keys)
    manager.reported_stale += 1
    pinned = [
        s for s in dict.fromkeys(slots)
        if 0 <= s < target.num_slots and target.key_of[s] is not None and s not in target.filling
    ]  # fmt: skip
    if not pinned:
        return None
    for slot in pinned:
        target.pin(slot)
    lease_id = next(manager._ids)
    manager._leases[lease_id] = LeaseRecord(client, tier, pinned, counted=False)
    state.leases.add(lease_id)
    return lease_id
