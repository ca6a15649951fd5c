"""PrivateTiming and HeldReplies: a private tenant's held-back hits take as long as its real misses."""

from __future__ import annotations

import random

import pytest

from expertd.daemon.core.events import DEVICE
from expertd.daemon.core.isolation import HeldReplies, PrivateTiming, Release
from expertd.policies.base import Geometry

GEOMETRY = Geometry(num_layers=2, num_experts=64)


def timing() -> PrivateTiming:
    return PrivateTiming(GEOMETRY, {DEVICE: 8}, {DEVICE: "lru"})


def released(t: PrivateTiming, key: str, expert: int, started: float, ready: float, real_misses: int):
    t.before_acquire(key, "attacker", 0.5, DEVICE, 0, [expert], started)  # a new expert: a shadow miss
    release = t.release_at(key, ready, real_misses)
    assert release is not None
    return release.at


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
    assert t.release_at("b", 2.0001, 0) == (2.0001, "real")


def test_held_back_hits_land_past_the_first_grid_point_as_often_as_real_misses():
    # The side channel's last leak: held-back hits waited a fixed average and always left at the
    # first grid point, while the slowest real misses (here 1 in 64, beyond the 98th percentile
    # the step covers) left later -- so a late reply meant "unused". Held-back hits must wait
    # as long as a real miss drawn from the recent ones, tail included.
    t = PrivateTiming(GEOMETRY, {DEVICE: 8}, {DEVICE: "lru"}, rng=random.Random(7))
    answers = [10e-3 if i % 64 == 0 else 1e-3 + 1e-6 * (i % 7) for i in range(256)]
    for answer in answers:
        t.miss_answered(DEVICE, 1, answer)

    first = released(t, "first", 63, started=0.0, ready=0.5e-3, real_misses=1)  # an ordinary miss

    def past_first_point(waits: list[float], real_misses: int) -> float:
        late = 0
        for i, wait in enumerate(waits):
            started = 100.0 * (i + 1)
            late += (
                released(t, f"k{i}", i % 64, started, started + wait, real_misses) - started > first + 1e-9
            )
        return late / len(waits)

    real = past_first_point(answers, real_misses=1)
    held = past_first_point([1e-4] * 4096, real_misses=0)  # someone else's copies: ready at once
    assert real == pytest.approx(4 / 256)
    assert held == pytest.approx(real, abs=0.006), "held-back hits never leave as late as slow misses do"


def test_held_back_hits_draw_from_their_own_tenants_misses_once_it_has_enough():
    t = PrivateTiming(GEOMETRY, {DEVICE: 8}, {DEVICE: "lru"}, rng=random.Random(1))
    t.before_acquire("a", "attacker", 0.5, DEVICE, 0, [1], 0.0)  # the tenant is a private one
    t.release_at("a", 1e-3, 1)
    for _ in range(16):
        t.miss_answered(DEVICE, 1, 5e-3, "attacker")  # the attacker's own misses: 5 ms (its load)
    for _ in range(256):
        t.miss_answered(DEVICE, 1, 1e-3, "victim")  # everyone's last 256: 1 ms, a 2 ms grid step
    at = released(t, "b", 2, started=10.0, ready=10.0001, real_misses=0)
    assert at - 10.0 == pytest.approx(6e-3), "a held-back hit was timed by other tenants' misses, not its own"


def test_the_loop_stops_taking_work_in_the_guard_before_a_held_reply_is_due():
    held = HeldReplies(guard_s=0.5e-3)
    assert held.wait_s(0.0, 0.1) == 0.1  # nothing held: wait a whole tick
    late, early = Release(2.7e-3, "drawn"), Release(1.3e-3, "real")
    held.hold(late, b"eve", b"late")
    held.hold(early, b"eve", b"early")
    # Waits for messages until the guard opens, to the microsecond (a millisecond-granular timeout
    # overslept by as much as the reply had left to wait: when it left told how long it was held).
    assert held.wait_s(0.0, 0.1) == pytest.approx(0.8e-3)
    assert held.wait_s(0.9e-3, 0.1) is None  # inside the guard: receive nothing, sleep to 1.3 ms
    assert held.next_due() == pytest.approx(1.3e-3)
    assert held.due(1.29e-3) == []
    assert held.due(1.3e-3) == [(b"eve", b"early", early)]
    assert held.wait_s(1.3e-3, 0.1) == pytest.approx(0.9e-3)
    assert held.due(5e-3) == [(b"eve", b"late", late)] and len(held) == 0


def test_waiting_for_a_held_reply_never_asks_for_a_negative_sleep():
    # Under load the loop can be preempted between two clock reads; the daemon once read the
    # clock twice and asked time.sleep for a negative time (ValueError: the loop died, every
    # client then timed out). A clock that jumps 0.1 ms per read reproduces that.
    held = HeldReplies()
    held.hold(Release(1.00025, "real"), b"eve", b"reply")
    ticks = iter(1.0 + 0.1e-3 * i for i in range(100))
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        slept.append(seconds)

    held.wait_for_next(ticks.__next__, sleep)
    assert slept == [] or all(s > 0 for s in slept)
    assert next(ticks) > 1.00025, "returned before the reply was due"
