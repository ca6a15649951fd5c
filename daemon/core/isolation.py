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

Two things make "as long as a miss" hold for the attacker's stopwatch, not only on average:

- a held-back hit waits as long as a real miss of the tenant's *drawn* from its own recent
  real misses (or every tenant's, until it has enough), not their average: a fixed wait
  has no tail, so the slowest real misses, landing a grid point later, told unused experts
  apart (`bench/side_channel.py`, docs/security.md);
- `HeldReplies`: the loop takes no new work in the last `HOLD_GUARD_S` before a held reply
  is due and sleeps, then spins, to the due time, so when the reply leaves does not depend
  on what the loop was doing (a real miss's own transfer completions arrive just before
  its release) nor on when it was held (a millisecond-granular receive timeout overslept
  by an amount that depended on exactly that).

(The converse cannot be hidden: a shadow hit that is a real miss is slower than
private, revealing that others evicted that expert. `partitioned` closes that too, at
the cost of its own slots.)
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

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
OWN_ANSWERS_MIN = 16  # a private tenant's own real answers needed before its waits are drawn from them
HOLD_GUARD_S = 0.5e-3  # the loop takes no new work this long before a held reply is due
HOLD_SPIN_S = 0.2e-3  # ... and spins (holding the GIL) the last this long of it, rather than sleep


class Release(NamedTuple):
    """When a private acquire's reply may go, and whether its wait was drawn or its own."""

    at: float
    kind: str  # "drawn": the real cache hit what the tenant's would have missed; "real": it missed too


@dataclasses.dataclass
class _Pending:
    started: float
    shadow_misses: int
    link: str
    tenant: str


class PrivateTiming:
    """Shadow caches of private tenants and the transfer times their replies are held to."""

    def __init__(
        self,
        geometry: Geometry,
        slots: Mapping[str, int],
        policies: Mapping[str, str],
        rng: random.Random | None = None,
    ) -> None:
        self.geometry = geometry
        self._rng = rng or random.SystemRandom()  # the attacker must not predict the draws
        self._slots = dict(slots)  # tier -> slots in the real tier
        self._policies = dict(policies)  # tier -> eviction policy spec
        self._shadows: dict[tuple[str, str], EvictionPolicy] = {}
        self._t: dict[tuple[str, str], int] = {}
        self._pending: dict[Hashable, _Pending] = {}
        # (link, misses) -> how long such an acquire takes to answer; misses capped at MAX_MISSES
        self.answer_s: dict[tuple[str, int], float] = {}
        self.miss_s = {LOAD: INITIAL_MISS_S, H2D: INITIAL_MISS_S}  # per missing expert, any count
        # (tenant, link, misses) -> the last TAIL_WINDOW answer times of real acquires with that
        # many misses (capped at MAX_MISSES); tenant None: every tenant's, else a private tenant's own
        self._answers: dict[tuple[str | None, str, int], deque[float]] = {}
        self._private: set[str] = set()  # tenants with their own answers (configured private ones only)
        self._tail = {LOAD: 0.0, H2D: 0.0}  # TAIL_QUANTILE of every one-miss answer, taken every TAIL_REFRESH
        self._fresh = {LOAD: 0, H2D: 0}  # answers since
        self.held_back = 0  # replies delayed
        self.held_back_s = 0.0
        # kind -> [replies timed to the grid, those past its first point]: the two kinds must match
        self.grid_points = {"drawn": [0, 0], "real": [0, 0]}

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
        self._private.add(tenant)
        self._pending[key] = _Pending(now, misses, H2D if tier == DEVICE else LOAD, tenant)

    def release_at(self, key: Hashable, now: float, real_misses: int) -> Release | None:
        """When acquire ``key``'s reply (ready ``now``) may go (None: it is not a private acquire).

        Not before the tenant's own misses would have been answered: where the real cache had
        experts its own would have missed, the reply waits as long as a real acquire with that
        many misses did, drawn from the recent ones (`_drawn_answer_s`), so held-back hits and
        real misses take the same distribution of times. A reply that waited at all then goes
        out on a grid from the acquire's arrival whose step is twice the link's average one-miss
        answer time, or the 98th percentile of its last 256 one-miss answers if that is longer:
        what is left between the two (the load of the moment, fine jitter) mostly lands on the
        same grid point. That at least doubles the private tenant's miss latency; it is what
        closing the channel costs.
        """
        pending = self._pending.pop(key, None)
        if pending is None:
            return None
        misses = pending.shadow_misses
        if not misses and not real_misses:
            return Release(now, "real")  # a hit, and its own history explains it
        target = now
        kind = "drawn" if misses > real_misses else "real"
        if kind == "drawn":  # the real cache held what the tenant's own would have missed
            target = max(now, pending.started + self._drawn_answer_s(pending))
        waited = target - pending.started
        one_miss = self.answer_s.get((pending.link, 1), self.miss_s[pending.link])
        step = max(QUANTUM_FLOOR_S, GRID_STEPS_PER_MISS * one_miss, self._tail[pending.link])
        point = math.ceil(waited / step - 1e-9)
        counts = self.grid_points[kind]
        counts[0] += 1
        counts[1] += point > 1
        return Release(pending.started + point * step, kind)

    def _drawn_answer_s(self, pending: _Pending) -> float:
        """How long a real acquire with the pending one's shadow misses took: one drawn at random
        from the tenant's own recent ones, or every tenant's until it has `OWN_ANSWERS_MIN`."""
        misses, link = pending.shadow_misses, pending.link
        if misses <= MAX_MISSES:
            answers = self._answers.get((pending.tenant, link, misses), ())
            if len(answers) < OWN_ANSWERS_MIN:
                answers = self._answers.get((None, link, misses), ())
            if answers:
                return self._rng.choice(answers)
        return misses * self.miss_s[link]

    def forget(self, key: Hashable) -> None:
        self._pending.pop(key, None)

    def miss_answered(self, tier: str, misses: int, waited_s: float, tenant: str | None = None) -> None:
        """A real acquire (of ``tenant``) with ``misses`` missing experts took ``waited_s``: learn
        what a miss costs."""
        if misses > 0:
            link = H2D if tier == DEVICE else LOAD
            self.miss_s[link] += EWMA_ALPHA * (waited_s / misses - self.miss_s[link])
            bucket = (link, min(misses, MAX_MISSES))
            known = self.answer_s.get(bucket)
            self.answer_s[bucket] = waited_s if known is None else known + EWMA_ALPHA * (waited_s - known)
            for who in (None, tenant) if tenant in self._private else (None,):
                answers = self._answers.get((who, *bucket))
                if answers is None:
                    answers = self._answers[(who, *bucket)] = deque(maxlen=TAIL_WINDOW)
                answers.append(waited_s)
            if misses == 1:
                self._fresh[link] += 1
                if self._fresh[link] >= TAIL_REFRESH:
                    ordered = sorted(self._answers[(None, link, 1)])
                    self._tail[link] = ordered[min(len(ordered) - 1, int(TAIL_QUANTILE * len(ordered)))]
                    self._fresh[link] = 0

    def _shadow(self, tenant: str, share: float, tier: str) -> EvictionPolicy:
        shadow = self._shadows.get((tenant, tier))
        if shadow is None:
            slots = max(1, round(share * self._slots[tier]))
            shadow = self._shadows[(tenant, tier)] = make_policy(self._policies[tier], slots, self.geometry)
        return shadow


class HeldReplies:
    """Private tenants' replies held back, in due order, and when the loop must stop taking work.

    A reply leaves when it is due, not when the loop next looks: in the last ``guard_s`` before
    it is due the loop receives nothing and sleeps to the due time (`wait_s` says None). What
    arrives meanwhile waits at most ``guard_s``; a message the loop is already handling when
    the guard begins must take less than ``guard_s`` for the reply to leave on time.
    """

    def __init__(self, guard_s: float = HOLD_GUARD_S) -> None:
        self.guard_s = guard_s
        self._heap: list[tuple[float, int, Any, Any, str]] = []  # (due, seq, client, reply, kind)
        self._seq = itertools.count()
        # Release kind -> how late the last replies of that kind left: the two kinds must match
        self.late_s: dict[str, deque[float]] = {
            kind: deque(maxlen=TAIL_WINDOW * 4) for kind in ("drawn", "real")
        }

    def __len__(self) -> int:
        return len(self._heap)

    def hold(self, release: Release, identity: Any, payload: Any) -> None:
        heapq.heappush(self._heap, (release.at, next(self._seq), identity, payload, release.kind))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def wait_for_next(self, clock: Callable[[], float], sleep: Callable[[float], None] = time.sleep) -> None:
        """Sleep, then spin the last `HOLD_SPIN_S`, until the next reply is due (a sleep wakes
        late by an amount that varies with how long the core idled and with the load; the
        release must not carry it)."""
        due = self.next_due()
        if due is None:
            return
        asleep_s = due - clock() - HOLD_SPIN_S  # read the clock once: a second read may be past due
        if asleep_s > 0:
            sleep(asleep_s)
        while clock() < due:
            pass

    def wait_s(self, now: float, longest_s: float) -> float | None:
        """How long the loop may wait for messages (at most ``longest_s``); None: a reply is due
        within the guard, so sleep until `next_due` and send it before anything else."""
        if not self._heap:
            return longest_s
        until_guard = self._heap[0][0] - self.guard_s - now
        return None if until_guard <= 0 else min(longest_s, until_guard)

    def due(self, now: float) -> list[tuple[Any, Any, Release]]:
        """The replies due by ``now``, removed, in due order: (identity, payload, release) each."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            at, _, identity, payload, kind = heapq.heappop(self._heap)
            out.append((identity, payload, Release(at, kind)))
        return out

    def sent(self, release: Release, now: float) -> None:
        """A held reply went out at ``now``."""
        self.late_s[release.kind].append(now - release.at)

    def late_us(self) -> dict[str, dict[str, float]]:
        """Median and 90th percentile of how late each kind of held reply left, in microseconds."""
        out = {}
        for kind, late in self.late_s.items():
            ordered = sorted(late) or [0.0]
            out[kind] = {
                q: ordered[int(f * (len(ordered) - 1))] * 1e6 for q, f in (("p50", 0.5), ("p90", 0.9))
            }
        return out
