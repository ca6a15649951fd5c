"""Placement of an auto acquire's experts: the cost model's decision at its edges, and the
cache manager carrying it out (host slots pinned and leased, background copies queued)."""

from __future__ import annotations

import math

import pytest
from manager_util import settle

from expertd.daemon.core.events import AUTO, DEVICE, H2D, HOST, Priority, StartTransfer
from expertd.daemon.core.manager import CacheManager, ManagerConfig
from expertd.daemon.core.placement import COPY, HOST_AND_COPY, ON_HOST, Miss, PlacementConfig, place
from expertd.daemon.core.prefetch import PrefetchConfig
from expertd.policies.base import Geometry

GEOMETRY = Geometry(num_layers=4, num_experts=8)
EXPERT_BYTES = 176_160_768  # a Mixtral-8x7B expert in FP8
# pcie4-like: a copy takes 7.0 ms, a batch-1 host pass 2.9 ms, a device pass 0.18 ms.
DESKTOP = PlacementConfig(h2d_gbps=25.0, host_gbps=60.0, device_gbps=1000.0, host_knee_tokens=4.0)


def test_a_cold_one_off_miss_is_computed_on_the_host():
    assert place([Miss(1)], DESKTOP, EXPERT_BYTES) == [ON_HOST]


def test_a_prefill_batch_is_copied_to_the_device():
    # 512 tokens are compute-bound on the CPU: 128 host passes' worth, far above one copy.
    assert place([Miss(1, tokens=512)], DESKTOP, EXPERT_BYTES) == [COPY]


def test_a_miss_reused_soon_is_computed_on_the_host_and_copied_for_later():
    decisions = place([Miss(1, wait=4.0), Miss(2, wait=math.inf)], DESKTOP, EXPERT_BYTES, reuse_within=8.0)
    assert decisions == [HOST_AND_COPY, ON_HOST]


def test_a_layer_splits_its_misses_between_the_host_and_the_link():
    # 64 tokens take 16 host passes (47 ms): copied (7 ms), while one-token misses go on the host.
    decisions = place([Miss(1), Miss(2, tokens=64), Miss(3)], DESKTOP, EXPERT_BYTES)
    assert decisions == [ON_HOST, COPY, ON_HOST]


def test_host_work_waits_for_the_reply_so_one_off_misses_are_not_copied_to_share_the_load():
    # The reply (and with it the host's work) waits for the copies: eight host passes (23.5 ms)
    # still end before two copies (14 ms) followed by six host passes (17.6 ms).
    assert place([Miss(k) for k in range(8)], DESKTOP, EXPERT_BYTES) == [ON_HOST] * 8


def test_a_busy_link_keeps_a_miss_on_the_host_even_when_it_is_batched():
    # 16 tokens cost four host passes (11.7 ms) and one copy 7 ms; behind a 10-copy backlog, 77 ms.
    assert place([Miss(1, tokens=16)], DESKTOP, EXPERT_BYTES) == [COPY]
    assert place([Miss(1, tokens=16)], DESKTOP, EXPERT_BYTES, link_backlog_s=0.070) == [ON_HOST]


def test_an_expert_the_host_does_not_hold_goes_to_the_device():
    assert place([Miss(1, on_host=False)], DESKTOP, EXPERT_BYTES) == [COPY]


def test_without_a_measured_host_bandwidth_everything_is_copied():
    assert place([Miss(1)], PlacementConfig(), EXPERT_BYTES) == [COPY]


@pytest.mark.parametrize("field", ["h2d_gbps", "device_gbps", "host_knee_tokens"])
def test_a_non_positive_bandwidth_is_refused_by_name(field):
    with pytest.raises(ValueError, match=field):
        PlacementConfig(**{field: 0.0})


def make(device=4, placement=DESKTOP, predictor=None, **prefetch) -> CacheManager:
    config = ManagerConfig(
        GEOMETRY, host_slots=GEOMETRY.num_keys, device_slots=device, expert_bytes=EXPERT_BYTES,
        placement=placement, prefetch=PrefetchConfig(predictor, **prefetch),
    )  # fmt: skip
    manager = CacheManager(config)
    manager.preload(HOST, range(GEOMETRY.num_keys))
    return manager


def test_an_auto_miss_is_answered_at_once_from_host_slots_and_they_stay_pinned_until_release():
    manager = make()
    out = manager.acquire("a", 1, 0, [3, 5], AUTO, 0.0)
    (reply,) = out  # no transfer: both are computed on the host
    assert reply.tier == AUTO and reply.placements == (HOST, HOST) and reply.host_computed == 2
    host = manager.tiers[HOST]
    assert list(reply.slots) == [host.slot_of[GEOMETRY.key(0, 3)], host.slot_of[GEOMETRY.key(0, 5)]]
    assert all(host.pins[slot] for slot in reply.slots)
    manager.release("a", 2, reply.lease_id, 0.0)
    assert not any(host.pins[slot] for slot in reply.slots)
    assert manager.stats()["placed"] == {DEVICE: 0, HOST: 2, "background": 0}


def test_an_auto_acquire_mixes_device_hits_and_host_misses_in_the_order_asked():
    manager = make()
    (warm,), _ = settle(manager, manager.acquire("a", 1, 0, [3], DEVICE, 0.0))
    out = manager.acquire("a", 2, 0, [5, 3], AUTO, 0.0, [warm.lease_id])
    (reply,), started = settle(manager, out)
    assert not started
    assert reply.placements == (HOST, DEVICE) and reply.hits == 1
    assert reply.slots[1] == manager.tiers[DEVICE].slot_of[GEOMETRY.key(0, 3)]
    assert reply.slots[0] == manager.tiers[HOST].slot_of[GEOMETRY.key(0, 5)]


def test_an_auto_prefill_batch_waits_for_its_copy_and_is_computed_on_the_device():
    manager = make()
    out = manager.acquire("a", 1, 0, [3], AUTO, 0.0, tokens=512)
    (start,) = [c for c in out if isinstance(c, StartTransfer)]
    assert start.link == H2D and start.priority == Priority.DEMAND
    (reply,), _ = settle(manager, out)
    assert reply.placements == (DEVICE,) and reply.slots == (start.dst_slot,)


def test_an_auto_miss_expected_back_soon_is_copied_in_the_background():
    manager = make(predictor="temporal", depth=1, min_prob=0.0)
    routing = [[0, 1], [2, 3], [4, 5], [6, 7]]
    lease, background = None, []
    for step in range(3):  # the same routing every token: the predictor expects it back
        for layer, experts in enumerate(routing):
            release = [lease] if lease else []
            out = manager.acquire("a", 10 * step + layer, layer, experts, AUTO, 0.0, release, 1)
            (reply,), started = settle(manager, out)
            lease = reply.lease_id
            background += [s for s in started if s.priority == Priority.PREDICTED]
    assert background, "no expert expected back soon was copied to the device"
    assert manager.stats()["placed"]["background"] > 0
    assert manager.stats()["tiers"][DEVICE]["hits"] > 0, "the background copies were never used"


def test_auto_without_a_measured_host_places_everything_on_the_device():
    manager = make(placement=PlacementConfig())
    (reply,), started = settle(manager, manager.acquire("a", 1, 0, [3, 5], AUTO, 0.0))
    assert reply.placements == (DEVICE, DEVICE) and len(started) == 2


def test_auto_without_a_device_tier_places_everything_on_the_host():
    config = ManagerConfig(GEOMETRY, host_slots=8, expert_bytes=EXPERT_BYTES, placement=DESKTOP)
    manager = CacheManager(config)
    (reply,), _ = settle(manager, manager.acquire("a", 1, 0, [3, 5], AUTO, 0.0))
    assert reply.placements == (HOST, HOST)


def test_a_client_that_leaves_unpins_its_host_placed_slots():
    manager = make()
    (reply,) = manager.acquire("a", 1, 0, [3, 5], AUTO, 0.0)
    manager.client_gone("a")
    assert manager.tiers[HOST].pinned_slots == 0 and manager.tiers[DEVICE].pinned_slots == 0


def test_per_expert_token_counts_place_only_the_batched_expert_on_the_device():
    manager = make()
    (start,) = [
        c
        for c in manager.acquire("a", 1, 0, [3, 5], AUTO, 0.0, tokens=[1, 512])
        if isinstance(c, StartTransfer)
    ]
    assert start.key == GEOMETRY.key(0, 5)


@pytest.mark.parametrize("tokens", [0, -1, [1], [1, 2, 3], [1, "x"], 1 << 40])
def test_bad_token_counts_are_refused_by_name_and_pin_nothing(tokens):
    manager = make()
    (error,) = manager.acquire("a", 1, 0, [3, 5], AUTO, 0.0, tokens=tokens)
    assert error.code == "bad_request" and "token" in error.message
    assert manager.tiers[HOST].pinned_slots == 0
