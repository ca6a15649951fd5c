"""Each policy's own eviction order, on small hand-worked sequences."""

from __future__ import annotations

import pytest

from expertd.policies.base import Geometry, PolicyError
from expertd.policies.registry import make_policy

GEOMETRY = Geometry(num_layers=4, num_experts=8)


def run(policy, keys, start=0):
    for t, key in enumerate(keys, start):
        policy.access(key, t)
    return policy


def evicted_by(policy, key, t):
    """Access ``key`` (a miss) and return the key it evicted."""
    before = {k for k in range(policy.geometry.num_keys) if k in policy}
    assert not policy.access(key, t)
    (gone,) = before - {k for k in range(policy.geometry.num_keys) if k in policy}
    return gone


def test_fifo_ignores_hits():
    policy = run(make_policy("fifo", 2, GEOMETRY), [1, 2, 1])
    assert evicted_by(policy, 3, 3) == 1


def test_lru_evicts_least_recently_used():
    policy = run(make_policy("lru", 2, GEOMETRY), [1, 2, 1])
    assert evicted_by(policy, 3, 3) == 2


def test_lfu_breaks_ties_by_arrival_at_the_frequency_and_forgets_on_eviction():
    policy = run(make_policy("lfu", 3, GEOMETRY), [1, 2, 3, 2, 3, 1])  # all at frequency 2
    assert evicted_by(policy, 4, 6) == 2  # reached frequency 2 first
    assert evicted_by(policy, 2, 7) == 4  # the newcomer has frequency 1
    assert policy.frequency(2) == 1  # its earlier hits were forgotten


def test_sieve_hand_keeps_its_place():
    policy = run(make_policy("sieve", 3, GEOMETRY), [1, 2, 3, 1])
    assert evicted_by(policy, 4, 4) == 2  # 1 was visited: its bit is cleared, the hand moves on
    # The hand rests after 2, on 3: it is evicted although 1 is older and now unvisited.
    assert evicted_by(policy, 5, 5) == 3
    assert evicted_by(policy, 6, 6) == 4  # and goes on towards the head
    assert 1 in policy


def test_s3fifo_ghost_hit_enters_main_and_twice_hit_small_key_is_promoted():
    policy = make_policy("s3fifo", 20, GEOMETRY)  # small 2, main 18, ghost 18
    run(policy, range(20))
    assert [policy.queue_of(k) for k in (0, 1, 2, 19)] == ["small", "small", "main", "main"]
    assert evicted_by(policy, 20, 20) == 0  # small's oldest, never hit
    assert policy.queue_of(0) == "ghost"
    assert evicted_by(policy, 0, 21) == 1  # 0 was a ghost: it enters main...
    assert policy.queue_of(0) == "main" and policy.queue_of(1) == "ghost"
    run(policy, [20, 20], 22)  # 20 (in small) reaches the move-to-main threshold
    assert evicted_by(policy, 21, 24) == 2  # ...main is over its share: its oldest goes
    assert evicted_by(policy, 22, 25) == 21  # small: 20 moves to main, 21 is evicted
    assert policy.queue_of(20) == "main"


def test_s3fifo_main_gives_hit_keys_a_second_chance():
    policy = make_policy("s3fifo", 20, GEOMETRY)
    run(policy, [*range(20), 2, 20, 0])  # 2 hit in main; 0 comes back from the ghost
    assert policy.queue_of(0) == "main"  # main holds 19 > 18: the next eviction is from main
    assert evicted_by(policy, 21, 23) == 3  # 2 (hit) went to main's tail instead
    assert policy.queue_of(2) == "main"


def test_arc_adapts_p_on_ghost_hits():
    policy = run(make_policy("arc", 2, GEOMETRY), [1, 1, 2, 3])
    assert [policy.list_of(k) for k in (1, 2, 3)] == ["T2", "B1", "T1"]
    assert policy.p == 0.0
    policy.access(2, 4)  # a B1 ghost hit: favour recency
    assert policy.p == 1.0
    assert [policy.list_of(k) for k in (1, 2)] == ["B2", "T2"]
    policy.access(1, 5)  # a B2 ghost hit: favour frequency
    assert policy.p == 0.0 and policy.list_of(1) == "T2"


def test_belady_evicts_the_furthest_next_use_and_never_used_first():
    keys = [1, 2, 3, 1, 2, 4, 1]
    policy = make_policy("belady", 2, GEOMETRY)
    policy.prepare(keys)
    run(policy, keys[:2])
    assert evicted_by(policy, 3, 2) == 2  # 1 is next used at 3, 2 at 4
    policy.on_insert(5, 3)  # a prefetch of a key never used: it goes first
    assert policy.victim(3) == 5
    assert policy.victim(3, pinned={5}) in (1, 3)


def test_belady_next_use_for_prefetches_and_pins():
    keys = [1, 2, 1, 3, 2]
    policy = make_policy("belady", 3, GEOMETRY)
    policy.prepare(keys)
    assert policy.next_use(3, 0) == 3 and policy.next_use(1, 0) == 2 and policy.next_use(7, 0) == 5
    policy.access(1, 0)
    policy.on_insert(3, 0)  # prefetched at t=0, used at t=3
    policy.on_insert(2, 0)  # used at t=1
    assert policy.victim(0) == 3
    assert policy.victim(0, pinned={3}) == 1


def test_lru_per_layer_isolates_layers():
    policy = make_policy("lru-per-layer", 9, GEOMETRY)  # 3, 2, 2, 2 slots
    assert policy.quota == [3, 2, 2, 2]
    layer0 = [GEOMETRY.key(0, e) for e in range(4)]
    layer1 = [GEOMETRY.key(1, e) for e in range(3)]
    run(policy, layer1[:2] + layer0[:3])
    assert evicted_by(policy, layer0[3], 5) == layer0[0]  # not the older layer-1 keys
    assert evicted_by(policy, layer1[2], 6) == layer1[0]
    assert len(policy) == 5  # the other layers' slots stay free


def test_lru_per_layer_needs_a_slot_per_layer():
    with pytest.raises(PolicyError, match="capacity 3 is less than one slot for each of 4 layers"):
        make_policy("lru-per-layer", 3, GEOMETRY)


G3 = Geometry(num_layers=3, num_experts=4)  # key = 4 * layer + expert


def test_least_stale_evicts_a_stale_key_before_a_fresh_one():
    policy = make_policy("least-stale", 2, G3)
    policy.on_step(0, 2)
    policy.on_insert(8, 0)  # layer 2, touched in pass 0
    policy.on_step(1, 0)
    policy.on_insert(0, 1)  # layer 0, touched in pass 1: fresh
    policy.on_step(1, 1)
    # By layer order alone layer 0 (just computed) would go first; staleness comes first.
    assert policy.victim(2) == 8


def test_least_stale_orders_stale_keys_by_layer_unlike_lru():
    least_stale, lru = make_policy("least-stale", 4, G3), make_policy("lru", 4, G3)
    keys = [0, 4, 8, 1]  # pass 0: layers 0, 1, 2; pass 1: layer 0
    for policy in (least_stale, lru):
        run(policy, keys)
    # Pass 1 computes layer 1: 4 was not chosen there, so it waits longest; LRU takes 0.
    assert evicted_by(least_stale, 5, 4) == 4
    assert evicted_by(lru, 5, 4) == 0


def test_layer_distance_evicts_the_layer_just_computed_at_equal_frequency():
    policy = make_policy("layer-distance", 3, G3)
    for t, key in enumerate([0, 4, 8]):  # one expert per layer, each chosen once
        policy.on_step(0, t)
        policy.access(key, t)
    assert policy.frequency(0) == policy.frequency(4) == policy.frequency(8)
    assert policy.victim(3) == 8  # layer 2 was just computed: next used in 3 steps


def test_layer_distance_lets_frequency_outweigh_distance():
    policy = make_policy("layer-distance(alpha=0.5)", 2, G3)
    t = 0
    for forward in range(4):
        for layer, key in enumerate([1, 5, 9]):
            policy.on_step(forward, layer)
            if layer != 1 or forward == 3:  # 5 is chosen once, 9 every pass
                policy.access(key, t)
                t += 1
    # Layer 2 (key 9) was just computed, but 9 is chosen every pass, 5 hardly ever.
    assert policy.frequency(9) > policy.frequency(5)
    assert policy.victim(t) == 5
