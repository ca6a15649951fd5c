"""Tenant isolation in time: answer a `private` tenant as if its cache were its own.

In a shared cache a tenant learns, from a fast acquire, that some other tenant used
that expert recently (Flush+Reload on CPU caches works the same way), and routing
says a lot about a prompt. A `private` tenant still shares the physical copies (no
extra memory), but each of its acquires is checked against a *shadow*: the same
eviction policy, run over that tenant's own accesses only, with the tenant's share
of the tier. Where the shadow misses and the real cache hit (someone else brought the
expert in), the reply is held back until a private miss would have been answered:
the shadow's misses times the measured time of one transfer over that tier's link.
A reply is therefore never faster than the tenant's own history explains.

(The converse cannot be hidden: a shadow hit that is a real miss is slower than
private, revealing that others evicted something -- how much activity, not which
experts. `partitioned` closes that too, at the cost of its own slots.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence

from expertd.daemon.events import DEVICE, H2D, LOAD
from expertd.policies.base import EvictionPolicy, Geometry
from expertd.policies.registry import make_policy

EWMA_ALPHA = 0.1
INITIAL_TRANSFER_S = 1e-3  # before the first measured transfer


@dataclasses.dataclass
class _Pending:
    started: float
    shadow_misses: int
    link: str


class PrivateTiming:
    """Shadow caches of private tenants and the transfer times their replies are held to."""

    def __init__(self, geometry: Geometry, slots: Mapping[str, int], policies: Mapping[str, str]) -> None:
        self.geometry = geometry
        self._slots = dict(slots)  # tier -> slots in the real tier
        self._policies = dict(policies)  # tier -> eviction policy spec
        self._shadows: dict[tuple[str, str], EvictionPolicy] = {}
        self._t: dict[tuple[str, str], int] = {}
        self._pending: dict[Hashable, _Pending] = {}
        self._started: dict[int, tuple[str, float]] = {}  # transfer id -> (link, start)
        self.transfer_s = {LOAD: INITIAL_TRANSFER_S, H2D: INITIAL_TRANSFER_S}
        self.held_back = 0  # replies delayed
        self.held_back_s = 0.0

    def before_acquire(
        self,
        key: Hashable,
        tenant: str,
        share: float,
        tier: str,
        layer: int,
        experts: Sequence[int],
        now: float,
    ) -> None:
        """A private tenant's acquire ``key`` arrives: count its shadow misses, update the shadow."""
        shadow = self._shadow(tenant, share, tier)
        base = layer * self.geometry.num_experts
        t = self._t.get((tenant, tier), 0)
        misses = 0
        for expert in experts:
            misses += not shadow.access(base + expert, t)
            t += 1
        self._t[(tenant, tier)] = t
        self._pending[key] = _Pending(now, misses, H2D if tier == DEVICE else LOAD)

    def release_at(self, key: Hashable) -> float | None:
        """When acquire ``key``'s reply may go at the earliest (None: it is not a private acquire)."""
        pending = self._pending.pop(key, None)
        if pending is None:
            return None
        return pending.started + pending.shadow_misses * self.transfer_s[pending.link]

    def forget(self, key: Hashable) -> None:
        self._pending.pop(key, None)

    def transfer_started(self, transfer_id: int, link: str, now: float) -> None:
        self._started[transfer_id] = (link, now)

    def transfer_done(self, transfer_id: int, now: float) -> None:
        """Learn how long one transfer over that link takes (what a private miss costs)."""
        started = self._started.pop(transfer_id, None)
        if started is not None:
            link, start = started
            self.transfer_s[link] += EWMA_ALPHA * ((now - start) - self.transfer_s[link])

    def _shadow(self, tenant: str, share: float, tier: str) -> EvictionPolicy:
        shadow = self._shadows.get((tenant, tier))
        if shadow is None:
            slots = max(1, round(share * self._slots[tier]))
            shadow = self._shadows[(tenant, tier)] = make_policy(self._policies[tier], slots, self.geometry)
        return shadow
