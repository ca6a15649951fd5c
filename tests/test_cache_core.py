"""CacheCore, the facade the server and replay drive: reply order, held replies, tenants' counters."""

from __future__ import annotations

import random

import pytest

from expertd.daemon.core.cache_core import CacheCore, Isolation
from expertd.daemon.core.events import DEVICE, HOST, Priority, Reply, StartTransfer
from expertd.daemon.core.manager import ManagerConfig
from expertd.daemon.core.prefetch import PrefetchConfig
from expertd.policies.base import Geometry

GEOMETRY = Geometry(num_layers=4, num_experts=8)
ROUTING = [[0, 1], [2, 3], [4, 5], [6, 7]]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(tenants=None, predictor=None, device=4, clock=None) -> CacheCore:
    config = ManagerConfig(
        GEOMETRY, host_slots=GEOMETRY.num_keys, device_slots=device, h2d_depth=1,
        prefetch=PrefetchConfig(predictor, depth=1, min_prob=0.3),
    )  # fmt: skip
    core = CacheCore(config, tenants, clock=clock or Clock(), rng=random.Random(1))
    core.partitions.shared.preload(HOST, range(GEOMETRY.num_keys))
    return core


def finish(core: CacheCore, commands, now: float = 0.0) -> list[Reply]:
    """Carry out every command as a shell would, transfers finishing at once; the replies."""
    replies, queue = [], list(commands)
    while queue:
        command = queue.pop(0)
        if isinstance(command, StartTransfer):
            queue.extend(core.transfer_done(command.transfer_id, True, "", now))
        elif isinstance(command, Reply):
            replies.append(command)
    return replies


def token(core: CacheCore, client: str, start_id: int = 0, lease: int | None = None) -> int:
    for layer, experts in enumerate(ROUTING):
        out = core.acquire(client, start_id + layer, layer, experts, DEVICE, 0.0, [lease] if lease else [], 1)
        (reply,) = finish(core, out)
        lease = reply.lease_id
    assert lease is not None
    return lease


def test_a_hit_reply_comes_out_before_the_prediction_work_it_put_off():
    core = make(predictor="temporal")
    core.connect("a", "t", 0.0)
    lease = token(core, "a")  # leaves layers 0 and 3 resident on the 4 device slots
    prefetcher = core.partitions.shared.prefetcher
    assert prefetcher is not None
    seen = prefetcher.counters["actual"]
    out = core.acquire("a", 10, 0, ROUTING[0], DEVICE, 0.0, [lease], 1)  # a hit; layer 1 comes next
    reply = next(out)
    assert isinstance(reply, Reply) and reply.hits == 2
    assert prefetcher.counters["actual"] == seen, "the prediction ran before the reply was taken"
    rest = list(out)
    assert prefetcher.counters["actual"] == seen + 2
    assert [c.key for c in rest if isinstance(c, StartTransfer) and c.priority == Priority.PREDICTED] == [
        GEOMETRY.key(1, 2)
    ]


def test_a_private_tenants_hit_its_own_cache_would_miss_is_held_until_due():
    clock = Clock()
    core = make({"eve": Isolation("private", 0.5)}, clock=clock)
    core.connect("victim", "vic", 0.0)
    core.connect("eve", "eve", 0.0)
    # resident now, brought in by the victim; its copy took 2 ms: what a miss costs here
    finish(core, core.acquire("victim", 1, 0, [5], DEVICE, 0.0), now=0.002)
    clock.now = 1.0
    out = list(core.acquire("eve", 1, 0, [5], DEVICE, 1.0))
    assert out == [], "a hit eve's own cache would have missed left at once"
    due_at = core.next_due()
    assert due_at is not None and due_at >= 1.002  # not before a miss of its own would have been answered
    assert core.due(due_at - 1e-9) == []
    assert core.wait_s(due_at - core.held.guard_s / 2, 0.1) is None  # inside the guard: no new work
    ((reply, release),) = core.due(due_at)
    assert reply.client == "eve" and reply.hits == 1 and release.kind == "drawn"
    assert core.counters["eve"].hits == 1 and core.counters["eve"].acquires == 1  # counted once, when held
    assert core.isolation_stats()["private_replies_held"] == 1


@pytest.mark.parametrize("mode", ["shared", "partitioned"])
def test_tenants_counters_and_gone_clients(mode):
    core = make({"b": Isolation(mode, 0.5)})
    core.connect("a1", "a", 0.0)
    core.connect("b1", "b", 0.0)
    for client in ("a1", "b1"):
        finish(core, core.acquire(client, 1, 0, [1, 2], DEVICE, 0.0))
        finish(core, core.acquire(client, 2, 0, [1, 2], DEVICE, 0.0))
    # b's second acquire hits in both modes (its own copies); in shared mode so does its first
    expected_b_hits = 4 if mode == "shared" else 2
    assert core.tenant_stats()["a"]["hits"] == 2
    assert core.tenant_stats()["b"]["hits"] == expected_b_hits
    assert core.knows("b1")
    finish(core, core.client_gone("b1", 1.0))
    assert not core.knows("b1")
    assert "b1" not in core.client_summary()
