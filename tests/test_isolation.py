"""PrivateTiming: a private tenant's replies leave on a grid that a slow real miss cannot beat."""

from __future__ import annotations

import pytest

from expertd.daemon.core.events import DEVICE
from expertd.daemon.core.isolation import PrivateTiming
from expertd.policies.base import Geometry

GEOMETRY = Geometry(num_layers=2, num_experts=64)


def timing() -> PrivateTiming:
    return PrivateTiming(GEOMETRY, {DEVICE: 8}, {DEVICE: "lru"})


def released(t: PrivateTiming, key: str, expert: int, started: float, ready: float, real_misses: int):
    t.before_acquire(key, "attacker", 0.5, DEVICE, 0, [expert], started)  # a new expert: a shadow miss
    at = t.release_at(key, ready, real_misses)
    assert at is not None
    return at


@pytest.mark.parametrize("tail", [False, True])
def test_a_held_back_hit_and_a_slow_real_miss_leave_at_the_same_grid_point(tail):
    t = timing()
    for i in range(256):  # one-miss answers: mostly 1 ms, the slowest 4% (prefetch queues) 4 ms
        t.miss_answered(DEVICE, 1, 4e-3 if tail and i % 25 == 0 else 1e-3)
    hit = released(t, "a", 1, started=10.0, ready=10.0001, real_misses=0)  # someone else's copy: fast
    slow = released(t, "b", 2, started=20.0, ready=20.0 + 3.9e-3, real_misses=1)  # a slow, real miss
    assert hit - 10.0 >= 1e-3, "a hit the tenant's history does not explain left before a private miss would"
    if tail:
        assert slow - 20.0 == pytest.approx(hit - 10.0), "the slow miss is told apart from the hit"
    else:  # no tail seen: a miss four times the usual is, and may be, later than the grid's first point
        assert slow - 20.0 > hit - 10.0


def test_a_tenant_whose_history_explains_a_hit_is_answered_at_once():
    t = timing()
    t.before_acquire("a", "attacker", 0.5, DEVICE, 0, [5], 1.0)
    t.release_at("a", 1.002, 1)
    t.before_acquire("b", "attacker", 0.5, DEVICE, 0, [5], 2.0)  # its own shadow holds expert 5 now
    assert t.release_at("b", 2.0001, 0) == 2.0001
