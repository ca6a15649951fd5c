"""Tenant isolation in time: answer a `private` tenant as if its cache were its own.

In a shared cache a tenant learns, from a fast acquire, that some other tenant used
that expert recently (Flush+Reload on CPU caches works the same way), and routing
says a lot about a prompt. A `private` tenant still shares the physical copies (no
extra memory), but each of its acquires is checked against a *shadow*: the same
eviction policy, run over that tenant's own accesses only, with the tenant's share
of the tier. Where the shadow misses and the real cache hit (someone else brought the
expert in), the reply is held back until a private miss would have been answered:
the time real acquires with that many missing experts took to answer in that tier
(from arrival to reply: queueing, transfers, completions, all of what misses cost here).
A reply is therefore never faster than the tenant's own history explains.

(The converse cannot be hidden: a shadow hit that is a real miss is slower than
private, revealing that others evicted something -- how much activity, not which
experts. `partitioned` closes that too, at the cost of its own slots.)
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Hashable, Mapping, Sequence

from expertd.daemon.core.events import DEVICE, H2D, LOAD
from expertd.policies.base import EvictionPolicy, Geometry
from expertd.policies.registry import make_policy

EWMA_ALPHA = 0.1
QUANTUM_FLOOR_S = 50e-6  # the grid step is never smaller
GRID_STEPS_PER_MISS = 2.0  # grid step: at least this many average one-miss answer times
TAIL_QUANTILE = 0.98  # ... and at least this quantile of recent one-miss answer times
TAIL_WINDOW = 256  # one-miss answers the quantile is taken over, per link
TAIL_REFRESH = 16  # new answers before the quantile is taken again
INITIAL_MISS_S = 1e-3  # per missing expert, before anything was measured
MAX_MISSES = 16  # acquires with more misses are timed by the per-miss average


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
        # (link, misses) -> how long such an acquire takes to answer; misses capped at MAX_MISSES
        self.answer_s: dict[tuple[str, int], float] = {}
        self.miss_s = {LOAD: INITIAL_MISS_S, H2D: INITIAL_MISS_S}  # per missing expert, any count
        self._one_miss = {LOAD: deque(maxlen=TAIL_WINDOW), H2D: deque(maxlen=TAIL_WINDOW)}
        self._tail = {LOAD: 0.0, H2D: 0.0}  # TAIL_QUANTILE of _one_miss, taken every TAIL_REFRESH
        self._fresh = {LOAD: 0, H2D: 0}  # answers since
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

    def release_at(self, key: Hashable, now: float, real_misses: int) -> float | None:
        """When acquire ``key``'s reply (ready ``now``) may go (None: it is not a private acquire).

        Not before the tenant's own misses would have been answered; and a reply that waited
        at all goes out on a grid from the acquire's arrival whose step is twice the link's
        average one-miss answer time, or the 98th percentile of its last 256 one-miss answers
        if that is longer: a real miss and a held-back hit (held to that average) then both
        leave at the first grid point unless the miss was slower than 98% of recent ones.
        (Twice the average alone lets every miss slower than that land a grid point after a
        held-back hit, and prefetch queues make the link's tail longer.) That at least
        doubles the private tenant's miss latency; it is what closing the channel costs.
        """
        pending = self._pending.pop(key, None)
        if pending is None:
            return None
        misses = pending.shadow_misses
        if not misses and not real_misses:
            return now  # a hit, and its own history explains it
        target = now
        if misses:
            answer = self.answer_s.get((pending.link, min(misses, MAX_MISSES)))
            if answer is None or misses > MAX_MISSES:
                answer = misses * self.miss_s[pending.link]
            target = max(now, pending.started + answer)
        waited = target - pending.started
        one_miss = self.answer_s.get((pending.link, 1), self.miss_s[pending.link])
        step = max(QUANTUM_FLOOR_S, GRID_STEPS_PER_MISS * one_miss, self._tail[pending.link])
        return pending.started + math.ceil(waited / step - 1e-9) * step

    def forget(self, key: Hashable) -> None:
        self._pending.pop(key, None)

    def miss_answered(self, tier: str, misses: int, waited_s: float) -> None:
        """A real acquire with ``misses`` missing experts took ``waited_s``: learn what a miss costs."""
        if misses > 0:
            link = H2D if tier == DEVICE else LOAD
            self.miss_s[link] += EWMA_ALPHA * (waited_s / misses - self.miss_s[link])
            bucket = (link, min(misses, MAX_MISSES))
            known = self.answer_s.get(bucket)
            self.answer_s[bucket] = waited_s if known is None else known + EWMA_ALPHA * (waited_s - known)
            if misses == 1:
                self._one_miss[link].append(waited_s)
                self._fresh[link] += 1
                if self._fresh[link] >= TAIL_REFRESH:
                    ordered = sorted(self._one_miss[link])
                    self._tail[link] = ordered[min(len(ordered) - 1, int(TAIL_QUANTILE * len(ordered)))]
                    self._fresh[link] = 0

    def _shadow(self, tenant: str, share: float, tier: str) -> EvictionPolicy:
        shadow = self._shadows.get((tenant, tier))
        if shadow is None:
            slots = max(1, round(share * self._slots[tier]))
            shadow = self._shadows[(tenant, tier)] = make_policy(self._policies[tier], slots, self.geometry)
        return shadow
