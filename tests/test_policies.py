"""The contract every registered eviction policy keeps, whatever its order.

Driven the way the cache manager drives a policy: hits, demand misses
(``on_miss`` -> ``victim`` -> ``on_remove`` -> ``on_insert``), prefetch inserts with
no miss before them, removals, pinned keys, and forward steps.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertd.policies.base import NO_PINS, EvictionPolicy, Geometry, NoVictimError, PolicyError
from expertd.policies.registry import available, make_policy, parse_spec, policy_class
from expertd.policies.steps import StepClock, steps_from_rows

GEOMETRY = Geometry(num_layers=4, num_experts=8)
POLICIES = available()


def build(name: str, capacity: int, future=()) -> EvictionPolicy:
    policy = make_policy(name, capacity, GEOMETRY)
    if policy.offline:
        policy.prepare(list(future))
    return policy


def demand(policy: EvictionPolicy, key: int, t: int, pinned=NO_PINS) -> bool:
    """One demand access as the manager makes it; checks the victim it gets."""
    if key in policy:
        policy.on_hit(key, t)
        return True
    policy.on_miss(key, t)
    if policy.needs_eviction(key):
        victim = policy.victim(t, pinned, key)
        assert victim in policy, f"{policy.name}: victim {victim} is not resident"
        assert victim not in pinned, f"{policy.name}: victim {victim} is pinned"
        policy.on_remove(victim)
    policy.on_insert(key, t)
    return False


def random_keys(seed: int, n: int = 400) -> list[int]:
    rng = random.Random(seed)
    hot = rng.sample(range(GEOMETRY.num_keys), 6)
    return [rng.choice(hot) if rng.random() < 0.6 else rng.randrange(GEOMETRY.num_keys) for _ in range(n)]


def layered_steps(keys: list[int]) -> list[tuple[int, int, int]]:
    """One step per access, a new forward pass whenever the layer does not rise."""
    steps, forward, last = [], 0, -1
    for t, key in enumerate(keys):
        layer = GEOMETRY.layer_of(key)
        if layer <= last:
            forward += 1
        steps.append((t, forward, layer))
        last = layer
    return steps


# --- contract, for every registered policy ------------------------------------------------


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("capacity", [4, 9, 20])
def test_access_never_exceeds_capacity(name, capacity):
    keys = random_keys(capacity)
    policy = build(name, capacity, keys)
    for t, key in enumerate(keys):
        policy.access(key, t)
        assert len(policy) <= capacity
        assert key in policy


def access_loop(policy, keys, steps):
    """The hits of `access` called key by key, with `on_step` before each step's first key."""
    pending = list(steps)[::-1]
    hits = 0
    for t, key in enumerate(keys):
        while pending and pending[-1][0] <= t:
            _, forward, layer = pending.pop()
            policy.on_step(forward, layer)
        hits += policy.access(key, t)
    return hits


@pytest.mark.parametrize("name", POLICIES)
def test_replay_counts_the_same_hits_as_the_access_loop(name):
    for seed in range(6):
        keys = random_keys(100 + seed, n=600)
        for capacity in (4, 11, 24):
            for steps in ((), layered_steps(keys)):
                fast = build(name, capacity, keys)
                slow = build(name, capacity, keys)
                expected = access_loop(slow, keys, steps)
                assert fast.replay(np.asarray(keys), steps) == expected, (seed, capacity)


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_manager_protocol_keeps_every_invariant(name, data):
    capacity = data.draw(st.integers(GEOMETRY.num_layers, 12), label="capacity")
    ops = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(["access", "access", "prefetch", "remove", "step"]),
                st.integers(0, GEOMETRY.num_keys - 1),
            ),
            max_size=120,
        ),
        label="ops",
    )
    future = [key for _, key in ops] or [0]
    policy = build(name, capacity, future)
    resident: set[int] = set()
    forward = 0
    for t, (op, key) in enumerate(ops):
        pinned = frozenset(k for k in resident if data.draw(st.integers(0, 3), label="pin") == 0)
        if op == "step":
            forward += key % 2
            policy.on_step(forward, GEOMETRY.layer_of(key))
            continue
        if op == "remove":
            if key in resident:
                policy.on_remove(key)
                resident.discard(key)
            continue
        if key in resident:
            if op == "access":
                policy.on_hit(key, t)
            continue
        if op == "access":
            policy.on_miss(key, t)
        if policy.needs_eviction(key):
            try:
                victim = policy.victim(t, pinned, key)
            except NoVictimError:
                candidates = resident - pinned
                if name == "lru-per-layer":
                    layer = GEOMETRY.layer_of(key)
                    candidates = {k for k in candidates if GEOMETRY.layer_of(k) == layer}
                assert not candidates, f"NoVictimError with unpinned candidates {candidates}"
                continue
            assert victim in resident and victim not in pinned
            policy.on_remove(victim)
            resident.discard(victim)
        policy.on_insert(key, t)
        resident.add(key)
        assert len(policy) == len(resident) <= capacity
        assert all(k in policy for k in resident)


@pytest.mark.parametrize("name", POLICIES)
def test_victim_is_never_pinned(name):
    keys = random_keys(7)
    policy = build(name, 10, keys)
    for t, key in enumerate(keys[:200]):
        demand(policy, key, t)
    resident = [k for k in range(GEOMETRY.num_keys) if k in policy]
    rng = random.Random(3)
    for _ in range(30):
        pinned = set(rng.sample(resident, rng.randrange(len(resident))))
        victim = policy.victim(200, pinned)
        assert victim in policy and victim not in pinned


@pytest.mark.parametrize("name", POLICIES)
def test_all_pinned_raises_no_victim(name):
    keys = [GEOMETRY.key(layer, expert) for layer in range(4) for expert in (0, 5)]
    policy = build(name, 8, keys)
    for t, key in enumerate(keys[:8]):
        demand(policy, key, t)
    resident = {k for k in range(GEOMETRY.num_keys) if k in policy}
    assert len(resident) == len(policy) == 8
    with pytest.raises(NoVictimError):
        policy.victim(8, resident)


@pytest.mark.parametrize("name", POLICIES)
def test_removed_key_is_gone_and_can_come_back(name):
    keys = random_keys(11)
    policy = build(name, 8, keys + keys)
    for t, key in enumerate(keys[:100]):
        demand(policy, key, t)
    gone = next(k for k in range(GEOMETRY.num_keys) if k in policy)
    size = len(policy)
    policy.on_remove(gone)
    assert gone not in policy and len(policy) == size - 1
    for _ in range(3):
        assert policy.victim(100) != gone
    policy.on_insert(gone, 100)
    assert gone in policy and len(policy) == size


@pytest.mark.parametrize("name", POLICIES)
def test_prefetch_inserts_fill_and_get_evicted(name):
    keys = random_keys(13)
    policy = build(name, 6, keys)
    for t, key in enumerate(keys[:150]):
        prefetch = (key + 5) % GEOMETRY.num_keys
        if prefetch not in policy:
            if policy.needs_eviction(prefetch):
                policy.on_remove(policy.victim(t, NO_PINS, prefetch))
            policy.on_insert(prefetch, t)  # no on_miss: a prefetch
        demand(policy, key, t)
        assert len(policy) <= 6


@pytest.mark.parametrize("name", POLICIES)
def test_same_inputs_give_the_same_evictions(name):
    keys = random_keys(17)

    def evictions() -> list[int]:
        policy = build(name, 7, keys)
        out = []
        for t, key in enumerate(keys):
            if key not in policy and policy.needs_eviction(key):
                policy.on_miss(key, t)
                out.append(policy.victim(t, NO_PINS, key))
                policy.on_remove(out[-1])
                policy.on_insert(key, t)
            else:
                policy.access(key, t)
        return out

    assert evictions() == evictions()


@pytest.mark.parametrize("name", POLICIES)
def test_unknown_parameter_is_a_clear_error(name):
    with pytest.raises(PolicyError, match=r"unknown parameter\(s\) bogus"):
        make_policy(f"{name}(bogus=1)", 8, GEOMETRY)


@pytest.mark.parametrize("name", POLICIES)
def test_policy_has_a_docstring_and_registered_name(name):
    cls = policy_class(name)
    assert cls.name == name and cls.__doc__ and cls.__module__.startswith("expertd.policies.")


def test_unknown_policy_name_lists_the_known_ones():
    with pytest.raises(PolicyError, match=r"unknown policy 'nope' \(known: arc, belady"):
        make_policy("nope", 4, GEOMETRY)


def test_bad_parameter_value_names_it():
    with pytest.raises(PolicyError, match="s3fifo: small_ratio must be in"):
        make_policy("s3fifo(small_ratio=1.5)", 20, GEOMETRY)
    with pytest.raises(PolicyError, match="alpha must be in"):
        make_policy("layer-distance(alpha=0)", 20, GEOMETRY)
    assert parse_spec("s3fifo(small_ratio=0.2;move_to_main_threshold=1)") == (
        "s3fifo",
        {"small_ratio": 0.2, "move_to_main_threshold": 1},
    )


def test_offline_policy_needs_prepare():
    policy = make_policy("belady", 4, GEOMETRY)
    policy.on_step(0, 0)
    with pytest.raises(PolicyError, match="prepare"):
        policy.on_insert(1, 0)


# --- steps ---------------------------------------------------------------------------------


def test_steps_from_rows_numbers_forward_passes():
    steps = list(steps_from_rows([(0 << 32) | 5, (0 << 32) | 5, (1 << 32) | 0], [0, 1, 0], 2))
    assert steps == [(0, 0, 0), (2, 0, 1), (4, 1, 0)]


def test_step_clock_infers_steps_from_accesses():
    clock = StepClock(GEOMETRY)
    began = [clock.observe(k) for k in (0, 1, 8, 9, 16, 0, 2, 8)]
    assert began == [True, False, True, False, True, True, False, True]
    assert (clock.forward, clock.layer) == (1, 1)
    assert clock.widest == 2 and not clock.step_done()
    clock.observe(10)
    assert clock.step_done()


@pytest.mark.parametrize("name", ["least-stale", "layer-distance"])
def test_inferred_steps_equal_given_steps_on_token_ordered_access(name):
    keys = []
    rng = random.Random(5)
    for _ in range(80):  # 80 forward passes, top-2 distinct experts per layer
        for layer in range(GEOMETRY.num_layers):
            keys += [GEOMETRY.key(layer, e) for e in rng.sample(range(8), 2)]
    steps = list(steps_from_rows(np.repeat(np.arange(80), 4), np.tile(np.arange(4), 80), 2))
    for capacity in (6, 12):
        assert build(name, capacity).replay(keys, steps) == build(name, capacity).replay(keys)
