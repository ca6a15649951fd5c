"""Prefetching in the cache manager: what it fetches, what it must never do, and tenant isolation."""

from __future__ import annotations

from expertd.daemon.events import DEVICE, HOST, Priority, Reply, StartTransfer
from expertd.daemon.manager import CacheManager, ManagerConfig
from expertd.daemon.prefetch import PrefetchConfig, Prefetcher, PrefetchPlan
from expertd.policies.base import Geometry
from expertd.policies.predictor import Prediction, Predictor, register_predictor

GEOMETRY = Geometry(num_layers=4, num_experts=8)


def make(device=6, predictor="temporal", **prefetch) -> CacheManager:
    config = ManagerConfig(
        GEOMETRY, host_slots=32, device_slots=device, h2d_depth=1,
        prefetch=PrefetchConfig(predictor, **prefetch),
    )  # fmt: skip
    manager = CacheManager(config)
    manager.preload(HOST, range(GEOMETRY.num_keys))
    return manager


def settle(manager: CacheManager, commands) -> tuple[list[Reply], list[StartTransfer]]:
    """Finish every transfer, in order; the replies and every transfer that ran."""
    replies, started, queue = [], [], list(commands)
    while queue:
        command = queue.pop(0)
        if isinstance(command, StartTransfer):
            started.append(command)
            queue.extend(manager.transfer_done(command.transfer_id, True))
        elif isinstance(command, Reply):
            replies.append(command)
    return replies, started


def token(manager, client, routing, request=1, start_id=0, lease=None):
    """One token: acquire each layer's experts in order, releasing the previous layer's lease."""
    started_all = []
    for layer, experts in enumerate(routing):
        out = manager.acquire(
            client, start_id + layer, layer, experts, DEVICE, 0.0, [lease] if lease else [], request
        )
        (reply,), started = settle(manager, out)
        lease = reply.lease_id
        started_all += started
    return lease, started_all


ROUTING = [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_repeated_routing_is_prefetched_before_it_is_asked_for():
    manager = make(depth=1, min_prob=0.3)
    lease, _ = token(manager, "a", ROUTING)
    lease, started = token(manager, "a", ROUTING, start_id=10, lease=lease)
    predicted = [s for s in started if s.priority == Priority.PREDICTED]
    assert predicted, "the second token's next layers were not prefetched"
    assert manager.stats()["tiers"][DEVICE]["prefetch_used"] > 0


def test_no_predictor_means_no_prefetch():
    manager = make(predictor=None)
    lease, _ = token(manager, "a", ROUTING)
    _, started = token(manager, "a", ROUTING, start_id=10, lease=lease)
    assert all(s.priority == Priority.DEMAND for s in started)


def test_a_prefetch_never_evicts_a_leased_slot():
    manager = make(device=2, depth=3, min_prob=0.0)
    lease, _ = token(manager, "a", ROUTING)
    (reply,), _ = settle(manager, manager.acquire("a", 50, 0, [6, 7], DEVICE, 0.0, [lease], 1))
    leased = dict(manager.resident(DEVICE))
    # Every device slot is leased: the guesses this acquire made cannot start anywhere.
    _, started = settle(manager, manager.hint("a", 1, [0, 1, 2, 3], 0.0, Priority.PREDICTED))
    assert started == [] and manager.resident(DEVICE) == leased


def test_a_prefetch_never_evicts_a_key_more_likely_to_be_used():
    manager = make(device=4, depth=1, min_prob=0.0, budget=2)
    prefetcher = manager.prefetcher
    lease, _ = token(manager, "a", ROUTING)
    # Pretend every resident key is certain to be used: no guess may displace one.
    for key in manager.resident(DEVICE):
        prefetcher._prob[key] = 1.0
    resident_before = dict(manager.resident(DEVICE))
    out = manager.acquire("a", 60, 0, [0, 1], DEVICE, 0.0, [lease], 2)  # new request: fresh guesses
    _, started = settle(manager, out)
    evicted = set(resident_before) - set(manager.resident(DEVICE))
    assert not evicted - {0, 1} or all(s.priority == Priority.DEMAND for s in started)


def test_guesses_that_stop_being_guessed_are_cancelled_while_queued():
    manager = make(device=4, depth=3, min_prob=0.0, budget=8)
    lease, _ = token(manager, "a", ROUTING)
    lease, _ = token(manager, "a", ROUTING, start_id=10, lease=lease)
    out = manager.acquire("a", 20, 0, [0, 1], DEVICE, 0.0, [lease], 1)  # leave every transfer queued
    queued = [
        t.key for t in manager._transfers.values() if t.priority == Priority.PREDICTED and not t.running
    ]
    assert queued, out
    manager._prefetch(PrefetchPlan([], set(queued)))
    assert not [t for t in manager._transfers.values() if t.priority == Priority.PREDICTED and not t.running]
    assert manager.stats()["prefetch"]["cancelled"] == len(queued)


@register_predictor("test-follow-last-expert")
class FollowLastExpert(Predictor):
    """Guesses, for every coming layer, the expert the last observation chose (a test double)."""

    def __init__(self, geometry, params=None) -> None:
        super().__init__(geometry, params)
        self.last = 0

    def observe(self, request, layer, experts) -> None:
        self.last = experts[0]

    def predict(self, request, layer, horizon):
        return [Prediction((layer + a) % 4, self.last, 0.9, a) for a in range(1, horizon + 1)]


def test_the_prefetcher_marks_guesses_it_no_longer_makes_as_stale():
    prefetcher = Prefetcher(PrefetchConfig("test-follow-last-expert", depth=2, min_prob=0.0), GEOMETRY)
    plan = prefetcher.on_acquire("t", 1, 0, [5])  # guesses expert 5 for layers 1 and 2
    assert {key for key, _ in plan.wanted} == {GEOMETRY.key(1, 5), GEOMETRY.key(2, 5)}
    plan = prefetcher.on_acquire("t", 1, 1, [3])  # now expert 3 for layers 2 and 3
    assert plan.stale == {GEOMETRY.key(2, 5)}
    assert prefetcher.probability(GEOMETRY.key(2, 5)) == 0.0
    assert prefetcher.probability(GEOMETRY.key(2, 3)) == 0.9


def test_one_tenants_routing_never_changes_another_tenants_predictions():
    def plan_of_b(with_a: bool):
        manager = make()
        manager.set_tenant("a", "alice", 0.0)
        manager.set_tenant("b", "bob", 0.0)
        if with_a:
            lease = None
            for i in range(5):
                lease, _ = token(
                    manager, "a", [[7, 6], [5, 4], [3, 2], [1, 0]], request=9, start_id=100 * i, lease=lease
                )
        predictor = manager.prefetcher.predictor("bob")
        token(manager, "b", ROUTING, request=1)
        return predictor.predict(("b", 1), 0, 3)

    assert plan_of_b(with_a=True) == plan_of_b(with_a=False)


def test_tenants_get_separate_predictors():
    manager = make()
    manager.set_tenant("a", "alice", 0.0)
    manager.set_tenant("b", "bob", 0.0)
    assert manager.prefetcher.predictor("alice") is not manager.prefetcher.predictor("bob")
