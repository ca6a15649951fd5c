"""The cache manager: the pure core's contracts, one behaviour per test, plus a stateful model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from expertd.daemon.core.manager import (
    DEVICE,
    H2D,
    HOST,
    LOAD,
    CacheManager,
    ErrorCode,
    ErrorReply,
    ManagerConfig,
    Priority,
    Reply,
    StartTransfer,
)
from expertd.policies.base import Geometry
from expertd.policies.registry import available, make_policy, policy_class

GEOMETRY = Geometry(num_layers=4, num_experts=8)
ONLINE_POLICIES = [name for name in available() if not policy_class(name).offline]


def make(host=8, device=0, **kw) -> CacheManager:
    return CacheManager(ManagerConfig(GEOMETRY, host_slots=host, device_slots=device, **kw))


def of(commands, kind):
    return [c for c in commands if isinstance(c, kind)]


def finish_all(mgr: CacheManager, commands, ok=True) -> list:
    """Complete every started transfer (and those they start), collecting replies."""
    replies = []
    queue = list(commands)
    while queue:
        command = queue.pop(0)
        if isinstance(command, StartTransfer):
            queue.extend(mgr.transfer_done(command.transfer_id, ok, "" if ok else "disk on fire"))
        else:
            replies.append(command)
    return replies


def test_miss_loads_then_replies_and_second_acquire_hits():
    mgr = make()
    out = mgr.acquire("a", 1, layer=0, experts=[3, 5], tier=HOST, now=0)
    starts = of(out, StartTransfer)
    assert [s.link for s in starts] == [LOAD, LOAD] and not of(out, Reply)
    (reply,) = finish_all(mgr, out)
    assert reply.request_id == 1 and reply.hits == 0 and len(set(reply.slots)) == 2
    mgr.release("a", 2, reply.lease_id, now=0)
    (again,) = mgr.acquire("a", 3, layer=0, experts=[5, 3], tier=HOST, now=0)
    assert isinstance(again, Reply) and again.hits == 2
    assert again.slots == (reply.slots[1], reply.slots[0])


def test_a_policy_whose_shares_name_no_victim_does_not_strand_an_admitted_acquire():
    """lru-per-layer, 5 slots over 4 layers (shares 2, 1, 1, 1): layer 1 went over its share
    through a free slot, and every layer at or over its share is pinned. The only unpinned
    key is in layer 0, under its share, so the policy names no victim; the slot must still
    be found, or the acquire waits for something nothing will ever free (hypothesis found it)."""
    mgr = make(host=5, host_policy="lru-per-layer")
    (first,) = finish_all(mgr, mgr.acquire("a", 1, 0, [0], HOST, now=0))
    mgr.release("a", 2, first.lease_id, now=0)  # layer 0: one unpinned key
    for request_id, (layer, expert) in enumerate([(1, 0), (1, 1), (2, 0), (3, 0)], start=3):
        (held,) = finish_all(mgr, mgr.acquire("a", request_id, layer, [expert], HOST, now=0))
    assert mgr.tiers[HOST].pinned_slots == 4 and not mgr.tiers[HOST].free
    (load,) = of(mgr.acquire("b", 1, 1, [2], HOST, now=0), StartTransfer)
    assert load.key == GEOMETRY.key(1, 2)
    (reply,) = finish_all(mgr, [load])
    assert isinstance(reply, Reply) and reply.client == "b"
    assert GEOMETRY.key(0, 0) not in mgr.resident(HOST)


def test_device_miss_loads_into_host_then_copies_to_device():
    mgr = make(host=4, device=2)
    out = mgr.acquire("a", 1, 1, [2], DEVICE, now=0)
    (load,) = of(out, StartTransfer)
    assert load.link == LOAD
    (copy,) = mgr.transfer_done(load.transfer_id, True)
    assert copy.link == H2D and copy.src_slot == load.dst_slot
    (reply,) = mgr.transfer_done(copy.transfer_id, True)
    assert isinstance(reply, Reply) and reply.tier == DEVICE and reply.slots == (copy.dst_slot,)


def test_leased_slot_is_never_evicted():
    mgr = make(host=2)
    (held,) = finish_all(mgr, mgr.acquire("a", 1, 0, [0], HOST, now=0))
    for expert in range(1, 8):  # churn through the one free slot
        (reply,) = finish_all(mgr, mgr.acquire("b", expert, 0, [expert], HOST, now=0))
        assert reply.slots != held.slots
        mgr.release("b", 100 + expert, reply.lease_id, now=0)
    assert mgr.resident(HOST)[0] == held.slots[0]


def test_acquire_waits_while_every_slot_is_leased_and_proceeds_on_release():
    mgr = make(host=2)
    (held,) = finish_all(mgr, mgr.acquire("a", 1, 0, [0, 1], HOST, now=0))
    out = mgr.acquire("b", 1, 1, [0], HOST, now=0)
    assert out == []  # no slot can be reserved: the load waits in the queue
    out = mgr.release("a", 2, held.lease_id, now=0)
    (reply,) = finish_all(mgr, out)
    assert isinstance(reply, Reply) and reply.client == "b"


def test_demand_load_runs_before_queued_prefetches():
    mgr = make(host=8, load_depth=1)
    first = of(mgr.hint("a", 0, [0, 1, 2], now=0), StartTransfer)
    assert len(first) == 1 and first[0].priority == Priority.HINT
    assert mgr.acquire("a", 1, 3, [7], HOST, now=0) == []
    (nxt,) = mgr.transfer_done(first[0].transfer_id, True)
    assert nxt.priority == Priority.DEMAND and nxt.key == GEOMETRY.key(3, 7)


def test_demand_for_a_queued_prefetch_upgrades_it():
    mgr = make(host=8, load_depth=1)
    (running,) = of(mgr.hint("a", 0, [0, 1, 2], now=0), StartTransfer)
    mgr.acquire("a", 1, 0, [2], HOST, now=0)
    (nxt,) = mgr.transfer_done(running.transfer_id, True)
    assert nxt.key == GEOMETRY.key(0, 2) and nxt.priority == Priority.DEMAND


def test_prefetches_are_counted_as_used_or_wasted():
    mgr = make(host=2)
    finish_all(mgr, mgr.hint("a", 0, [0, 1], now=0))
    (reply,) = mgr.acquire("a", 1, 0, [0], HOST, now=0)  # the prefetch of (0, 0) pays off
    mgr.release("a", 2, reply.lease_id, now=0)
    finish_all(mgr, mgr.acquire("a", 3, 1, [5], HOST, now=0))  # evicts (0, 1), never used
    host = mgr.stats()["tiers"][HOST]
    assert (host["prefetch_used"], host["prefetch_wasted"]) == (1, 1)


def test_failed_load_is_an_error_reply_and_frees_the_slot():
    mgr = make(host=2)
    (error,) = finish_all(mgr, mgr.acquire("a", 1, 2, [6], HOST, now=0), ok=False)
    assert isinstance(error, ErrorReply) and error.code == ErrorCode.LOAD_FAILED
    assert "layer 2 expert 6" in error.message and "disk on fire" in error.message
    assert mgr.resident(HOST) == {} and mgr.stats()["tiers"][HOST]["pinned"] == 0


def test_failed_load_also_fails_the_device_acquire_behind_it():
    mgr = make(host=2, device=2)
    (error,) = finish_all(mgr, mgr.acquire("a", 1, 0, [1], DEVICE, now=0), ok=False)
    assert isinstance(error, ErrorReply) and error.code == ErrorCode.LOAD_FAILED


def test_client_gone_releases_its_leases_and_pending_acquires():
    mgr = make(host=2)
    finish_all(mgr, mgr.acquire("a", 1, 0, [0, 1], HOST, now=0))
    assert mgr.acquire("a", 2, 1, [0], HOST, now=0) == []
    mgr.client_gone("a")
    stats = mgr.stats()
    assert stats["leases"] == 0 and stats["pending"] == 0 and stats["tiers"][HOST]["pinned"] == 0


def test_silent_client_loses_leases_after_the_timeout():
    mgr = make(host=2, lease_timeout_s=5.0)
    finish_all(mgr, mgr.acquire("a", 1, 0, [0, 1], HOST, now=0))
    mgr.tick(now=4.0)
    assert mgr.stats()["leases"] == 1
    assert mgr.acquire("b", 1, 1, [0], HOST, now=5.5) == []  # a's lease holds both slots
    (reply,) = finish_all(mgr, mgr.tick(now=5.5))  # a fell silent: its lease goes
    assert reply.client == "b"
    assert mgr.stats()["leases"] == 1 and mgr.stats()["clients"] == 1


def test_host_copy_evicted_while_copy_is_queued_is_loaded_again():
    mgr = make(host=1, device=2, h2d_depth=1)
    (held,) = finish_all(mgr, mgr.acquire("a", 1, 0, [0], DEVICE, now=0))
    # Queue an h2d of (0,1) behind nothing runnable: host holds only one slot.
    out = mgr.acquire("a", 2, 0, [1], DEVICE, now=0, release=[held.lease_id])
    (reply,) = finish_all(mgr, out)
    assert isinstance(reply, Reply) and mgr.resident(DEVICE).keys() == {0, 1}


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        (dict(layer=4, experts=[0], tier=HOST), ErrorCode.OUT_OF_RANGE),
        (dict(layer=0, experts=[8], tier=HOST), ErrorCode.OUT_OF_RANGE),
        (dict(layer=0, experts=[1, 1], tier=HOST), ErrorCode.BAD_REQUEST),
        (dict(layer=0, experts=[], tier=HOST), ErrorCode.BAD_REQUEST),
        (dict(layer=0, experts=[0], tier=DEVICE), ErrorCode.TIER_OFF),
        (dict(layer=0, experts=[0], tier="disk"), ErrorCode.BAD_REQUEST),
        (dict(layer=0, experts=[0, 1, 2], tier=HOST), ErrorCode.TOO_MANY_EXPERTS),
    ],
)
def test_bad_acquire_is_an_error_reply(kwargs, code):
    mgr = make(host=2)
    (error,) = mgr.acquire("a", 7, now=0, **kwargs)
    assert isinstance(error, ErrorReply) and error.code == code and error.request_id == 7


def test_another_clients_lease_cannot_be_released():
    mgr = make(host=2)
    (held,) = finish_all(mgr, mgr.acquire("a", 1, 0, [0], HOST, now=0))
    (error,) = mgr.release("b", 1, held.lease_id, now=0)
    assert error.code == ErrorCode.UNKNOWN_LEASE and mgr.stats()["leases"] == 1


def test_pending_acquires_per_client_are_bounded():
    mgr = make(host=2, max_pending_per_client=2)
    mgr.acquire("a", 1, 0, [0], HOST, now=0)
    mgr.acquire("a", 2, 0, [1], HOST, now=0)
    (error,) = mgr.acquire("a", 3, 0, [2], HOST, now=0)
    assert error.code == ErrorCode.TOO_MANY_PENDING


def test_prefetch_queue_is_bounded():
    mgr = make(host=32, load_depth=1, max_queued_prefetches=3)
    mgr.hint("a", 0, list(range(8)), now=0)
    link = mgr.stats()["links"][LOAD]
    assert link["queued"] + link["running"] == 3  # five of the eight were dropped


@pytest.mark.parametrize("capacity", [2, 5, 12])
def test_sequential_device_replay_matches_plain_lru_hits(capacity):
    """Driving the manager one acquire at a time counts the hits plain LRU replay counts."""
    import random

    rng = random.Random(capacity)
    rows = [(layer, rng.sample(range(8), 2)) for _ in range(60) for layer in range(4)]
    mgr = make(host=32, device=capacity)
    lease = None
    for i, (layer, experts) in enumerate(rows):
        out = mgr.acquire("a", i, layer, experts, DEVICE, now=0, release=[lease] if lease else [])
        (reply,) = finish_all(mgr, out)
        lease = reply.lease_id
    keys = [GEOMETRY.key(layer, e) for layer, experts in rows for e in experts]
    plain = make_policy("lru", capacity, GEOMETRY).replay(keys)
    assert mgr.stats()["tiers"][DEVICE]["hits"] == plain


class ManagerModel(RuleBasedStateMachine):
    """Random clients, transfers finishing in any order, failures and departures."""

    def __init__(self) -> None:
        super().__init__()
        self.running: dict[int, StartTransfer] = {}
        self.leases: dict[int, tuple[str, str, list[int], tuple[int, ...]]] = {}
        self.pending: dict[tuple[str, int], tuple[str, list[int]]] = {}
        self.next_request = 0

    @initialize(host_policy=st.sampled_from(ONLINE_POLICIES), device_policy=st.sampled_from(ONLINE_POLICIES))
    def build(self, host_policy, device_policy):
        self.mgr = make(
            host=5, device=4, load_depth=2, h2d_depth=2, max_queued_prefetches=4,
            host_policy=host_policy, device_policy=device_policy,
        )  # fmt: skip

    def _apply(self, commands) -> None:
        for command in commands:
            if isinstance(command, StartTransfer):
                tier = self.mgr.tiers[HOST if command.link == LOAD else DEVICE]
                busy = {s.dst_slot for s in self.running.values() if s.link == command.link}
                assert command.dst_slot not in busy, "transfer into a slot being filled"
                for client, tier_name, _keys, slots in self.leases.values():
                    assert not (tier_name == tier.name and command.dst_slot in slots), (
                        f"transfer into leased slot {command.dst_slot} of {client}"
                    )
                self.running[command.transfer_id] = command
            elif isinstance(command, Reply):
                tier, keys = self.pending.pop((command.client, command.request_id))
                assert len(command.slots) == len(keys)
                self.leases[command.lease_id] = (command.client, tier, keys, command.slots)
            else:
                assert isinstance(command, ErrorReply)
                assert command.code == ErrorCode.LOAD_FAILED, command
                self.pending.pop((command.client, command.request_id))

    @rule(
        client=st.sampled_from("abc"),
        layer=st.integers(0, 3),
        experts=st.lists(st.integers(0, 7), min_size=1, max_size=2, unique=True),
        tier=st.sampled_from([HOST, DEVICE]),
    )
    def acquire(self, client, layer, experts, tier):
        if sum(1 for c, _ in self.pending if c == client) >= 4:
            return
        self.next_request += 1
        self.pending[(client, self.next_request)] = (tier, [GEOMETRY.key(layer, e) for e in experts])
        self._apply(self.mgr.acquire(client, self.next_request, layer, experts, tier, now=0))

    @rule(client=st.sampled_from("abc"), layer=st.integers(0, 3), experts=st.lists(st.integers(0, 7)))
    def hint(self, client, layer, experts):
        self._apply(self.mgr.hint(client, layer, experts, now=0))

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data):
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        client = self.leases.pop(lease_id)[0]
        self._apply(self.mgr.release(client, 0, lease_id, now=0))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), ok=st.booleans())
    def finish(self, data, ok):
        transfer_id = data.draw(st.sampled_from(sorted(self.running)))
        self.running.pop(transfer_id)
        self._apply(self.mgr.transfer_done(transfer_id, ok or data.draw(st.booleans()), "boom"))

    @rule(client=st.sampled_from("abc"))
    def client_gone(self, client):
        self.leases = {k: v for k, v in self.leases.items() if v[0] != client}
        self.pending = {k: v for k, v in self.pending.items() if k[0] != client}
        self._apply(self.mgr.client_gone(client))

    @invariant()
    def never_over_capacity(self):
        for tier in self.mgr.tiers.values():
            assert len(tier.slot_of) <= tier.num_slots
            assert len(tier.slot_of) + len(tier.free) == tier.num_slots

    @invariant()
    def leased_slots_keep_their_experts(self):
        for _client, tier_name, keys, slots in self.leases.values():
            tier = self.mgr.tiers[tier_name]
            for key, slot in zip(keys, slots, strict=True):
                assert tier.key_of[slot] == key and slot not in tier.filling

    @invariant()
    def nothing_waits_without_cause_once_transfers_settle(self):
        """With no transfer running, a waiting acquire is waiting for leases to be released."""
        if self.running:
            return
        mgr = self.mgr
        host = mgr.tiers[HOST]
        host_blocked = host.pinned_slots + len(mgr._committed(HOST)) >= host.num_slots
        for pending in mgr._pending.values():
            if not pending.admitted:
                head = mgr._admission[pending.tier][0]
                assert not mgr._fits(head), f"{head.client}'s acquire could be admitted"
            else:
                assert pending.tier == DEVICE and host_blocked, (
                    f"{pending.client}'s admitted {pending.tier} acquire waits with nothing running"
                )


ManagerModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_manager_state_machine = ManagerModel.TestCase
