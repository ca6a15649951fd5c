"""Prefetching in the cache manager: what it fetches, what it must never do, and tenant isolation."""

from __future__ import annotations

import random

import numpy as np
import pytest
from manager_util import settle

from expertd.daemon.core import defaults
from expertd.daemon.core.events import DEVICE, H2D, HOST, Predict, Priority, Reply, StartTransfer
from expertd.daemon.core.manager import CacheManager, ManagerConfig
from expertd.daemon.core.prefetch import PrefetchConfig, Prefetcher, PrefetchPlan
from expertd.policies.base import Geometry
from expertd.policies.predict.predictor import Prediction, Predictor, register_predictor

GEOMETRY = Geometry(num_layers=4, num_experts=8)


def make(device=6, predictor="temporal", **prefetch) -> CacheManager:
    config = ManagerConfig(
        GEOMETRY, host_slots=32, device_slots=device, h2d_depth=1,
        prefetch=PrefetchConfig(predictor, **prefetch),
    )  # fmt: skip
    manager = CacheManager(config)
    manager.preload(HOST, range(GEOMETRY.num_keys))
    return manager


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


def test_a_hit_is_answered_before_its_prediction_work_and_that_work_still_happens():
    manager = make(device=4, depth=1, min_prob=0.3)
    lease, _ = token(manager, "a", ROUTING)  # leaves layers 0 and 3 resident
    key = GEOMETRY.key
    assert set(manager.resident(DEVICE)) == {key(0, 0), key(0, 1), key(3, 6), key(3, 7)}
    seen = manager.prefetcher.counters["actual"]
    out = manager.acquire("a", 10, 0, ROUTING[0], DEVICE, 0.0, [lease], 1)  # a hit; layer 1 comes next
    reply, deferred = out
    assert isinstance(reply, Reply) and reply.hits == 2 and isinstance(deferred, Predict)
    assert manager.prefetcher.counters["actual"] == seen, "the prediction ran before the reply"
    started = manager.predict(deferred)
    assert manager.prefetcher.counters["actual"] == seen + 2
    predicted = {s.key for s in started if isinstance(s, StartTransfer) and s.priority == Priority.PREDICTED}
    assert predicted == {GEOMETRY.key(1, 2)}  # one h2d transfer at a time: (1, 3) waits in the queue
    manager.client_gone("a")
    assert manager.predict(deferred) == [], "the work of a client that left is dropped"


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


def test_a_prefetch_never_evicts_a_key_expected_to_be_used_sooner():
    manager = make(device=4, depth=1, min_prob=0.0, budget=2)
    prefetcher = manager.prefetcher
    lease, _ = token(manager, "a", ROUTING)
    resident_before = dict(manager.resident(DEVICE))
    # Pretend every resident key is needed next: no guess may displace one.
    waits = np.full(GEOMETRY.num_keys, 100.0)
    waits[list(resident_before)] = 1.0
    prefetcher.waits = lambda: waits
    out = manager.acquire("a", 60, 0, [0, 1], DEVICE, 0.0, [lease], 1)  # guesses layer 1: [2, 3]
    _, started = settle(manager, out)
    assert [s for s in started if s.priority == Priority.PREDICTED] == []


def test_a_hinted_prefetch_never_evicts_a_key_expected_to_be_used_sooner():
    manager = make(device=4, depth=1, min_prob=0.0, budget=2)
    lease, _ = token(manager, "a", ROUTING)
    resident = list(manager.resident(DEVICE))
    waits = np.full(GEOMETRY.num_keys, 100.0)
    waits[resident] = 1.0  # every resident key is needed before the hinted one
    manager.prefetcher.waits = lambda: waits
    _, started = settle(manager, manager.hint("a", 2, [0, 7], 0.0, generation=1))
    assert [s for s in started if s.priority == Priority.HINT] == []
    assert set(manager.resident(DEVICE)) == set(resident)
    waits[resident] = 1000.0  # now every resident key is needed much later: the hint may take a slot
    _, started = settle(manager, manager.hint("a", 2, [0, 7], 0.0, generation=1))
    assert {s.key for s in started if s.priority == Priority.HINT} <= {GEOMETRY.key(2, 0), GEOMETRY.key(2, 7)}
    assert [s for s in started if s.priority == Priority.HINT]


def test_a_prefetch_may_evict_a_key_expected_to_be_used_later():
    manager = make(device=4, depth=1, min_prob=0.0, budget=2)
    prefetcher = manager.prefetcher
    lease, _ = token(manager, "a", ROUTING)
    waits = np.full(GEOMETRY.num_keys, 1.0)
    waits[list(manager.resident(DEVICE))] = 100.0  # everything resident is needed much later
    prefetcher.waits = lambda: waits
    _, started = settle(manager, manager.acquire("a", 60, 0, [0, 1], DEVICE, 0.0, [lease], 1))
    predicted = {s.key for s in started if s.priority == Priority.PREDICTED}
    assert predicted == {GEOMETRY.key(1, 2), GEOMETRY.key(1, 3)}


def test_guesses_that_stop_being_guessed_are_cancelled_while_queued():
    manager = make(device=4, depth=3, min_prob=0.0, budget=8)
    lease, _ = token(manager, "a", ROUTING)
    lease, _ = token(manager, "a", ROUTING, start_id=10, lease=lease)
    out = manager.acquire("a", 20, 0, [0, 1], DEVICE, 0.0, [lease], 1)  # leave every transfer queued
    for command in out:
        if isinstance(command, Predict):
            manager.predict(command)
    queued = [
        t.key for t in manager.transfers.by_id.values() if t.priority == Priority.PREDICTED and not t.running
    ]
    assert queued, out
    manager._prefetch(PrefetchPlan([], set(queued)))
    transfers = manager.transfers.by_id.values()
    assert not [t for t in transfers if t.priority == Priority.PREDICTED and not t.running]
    assert manager.stats()["prefetch"]["cancelled"] == len(queued)


@register_predictor("test-follow-last-expert")
class FollowLastExpert(Predictor):
    """Guesses, for every coming layer, the expert the last observation chose (a test double)."""

    def __init__(self, geometry, params=None) -> None:
        super().__init__(geometry, params)
        self.last = 0

    def observe(self, request, layer, experts) -> None:
        self.last = experts[0]

    def predict(self, request, layer, horizon, min_prob=0.0):
        if min_prob > 0.9:
            return []
        return [Prediction((layer + a) % 4, self.last, 0.9, a) for a in range(1, horizon + 1)]


def test_the_prefetcher_marks_guesses_it_no_longer_makes_as_stale():
    prefetcher = Prefetcher(PrefetchConfig("test-follow-last-expert", depth=2, min_prob=0.0), GEOMETRY)
    plan = prefetcher.on_acquire("t", 1, 0, [5])  # guesses expert 5 for layers 1 and 2
    assert {key for key, _ in plan.wanted} == {GEOMETRY.key(1, 5), GEOMETRY.key(2, 5)}
    plan = prefetcher.on_acquire("t", 1, 1, [3])  # layer 1 chose 3; now expert 3 for layers 2 and 3
    assert plan.stale == {GEOMETRY.key(1, 5), GEOMETRY.key(2, 5)}  # wrong, and no longer guessed
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


# --- bandwidth share, leases, prediction-aware eviction ------------------------------------


def drive(manager, tokens: int, seed: int, hint_every: int = 0):
    """Random sticky routing through every layer, holding each lease for one layer, with
    transfers finishing one at a time in order; yields (commands started, leased slots) per step."""
    rng = random.Random(seed)
    lease, request_id, started = None, 0, []
    queue: list = []
    for _ in range(tokens):
        for layer in range(GEOMETRY.num_layers):
            experts = rng.sample([0, 1, 2] if rng.random() < 0.6 else range(8), 2)
            request_id += 1
            out = manager.acquire("a", request_id, layer, experts, DEVICE, 0.0, [lease] if lease else [], 1)
            if hint_every and request_id % hint_every == 0:
                out += manager.hint("a", (layer + 1) % 4, [rng.randrange(8)], 0.0)
            queue.extend(out)
            reply = None
            while reply is None:
                command = queue.pop(0)
                if isinstance(command, StartTransfer):
                    started.append(command)
                    queue.extend(manager.transfer_done(command.transfer_id, True))
                elif isinstance(command, Reply) and command.request_id == request_id:
                    reply = command
                elif isinstance(command, Predict):
                    queue.extend(manager.predict(command))
            lease = reply.lease_id
            yield started, reply


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5])
def test_prefetches_never_exceed_their_share_of_a_link(share):
    window = 8
    manager = make(device=5, depth=3, min_prob=0.0, budget=8, share=share, window=window)
    started: list[StartTransfer] = []
    for so_far, _ in drive(manager, 40, seed=3, hint_every=5):
        started = so_far
    flags = [s.priority != Priority.DEMAND for s in started if s.link == H2D]
    assert len(flags) > 100
    if share:
        assert any(flags), "no prefetch ever started"
    for i in range(len(flags)):
        recent = flags[max(0, i - window + 1) : i + 1]
        assert sum(recent) <= share * window, (i, recent)


def test_a_leased_slot_is_never_evicted_by_anything():
    manager = make(device=4, depth=3, min_prob=0.0, budget=8)
    for _, reply in drive(manager, 30, seed=5, hint_every=3):
        held = {slot: key for key, slot in manager.resident(DEVICE).items()}
        for slot in reply.slots:
            assert slot in held, "a leased slot lost its expert"


def test_the_manager_binds_its_predictions_to_a_policy_that_wants_them():
    config = ManagerConfig(
        GEOMETRY, host_slots=32, device_slots=6, device_policy="predictive",
        prefetch=PrefetchConfig("combined"),
    )  # fmt: skip
    manager = CacheManager(config)
    manager.preload(HOST, range(GEOMETRY.num_keys))
    token(manager, "a", ROUTING)
    policy = manager.tiers[DEVICE].policy
    assert np.array_equal(policy.waits(), manager.prefetcher.waits())
    assert np.isfinite(policy.waits()).all()


def test_waits_count_steps_to_the_next_computation_of_each_layer():
    prefetcher = Prefetcher(PrefetchConfig("test-follow-last-expert", min_prob=0.0), GEOMETRY)
    assert np.isinf(prefetcher.waits()).all()  # no active request: no use foreseen
    prefetcher.on_acquire("t", 1, 0, [5])  # guesses expert 5 for every coming layer, p = 0.9
    waits = prefetcher.waits()
    layers = GEOMETRY.num_layers
    for layer in range(layers):
        d = (layer - 0 - 1) % layers + 1
        assert waits[GEOMETRY.key(layer, 5)] == pytest.approx(d + layers * (1 / 0.9 - 1))
    prefetcher.forget("t", 1)
    assert np.isinf(prefetcher.waits()).all()


def test_the_default_prefetch_settings_are_valid_and_used_by_replay_default():
    assert defaults.resolve("default") == (defaults.DEVICE_POLICY, defaults.prefetch_config())
    assert defaults.resolve("lru") == ("lru", None)
    assert defaults.prefetch_config().predictor == defaults.PREFETCH["predictor"]


def test_serve_without_flags_runs_exactly_replays_default():
    from expertd.daemon.service.config import ServeConfig
    from expertd.daemon.service.startup import prefetch_settings

    config = ServeConfig.from_mapping({})
    policy, prefetch = defaults.resolve("default")
    assert config.policy_device == policy and config.policy_host == defaults.HOST_POLICY
    assert prefetch_settings(config) == prefetch
    assert config.prefetch_state is None


def test_the_default_runs_on_a_trace_format_never_tuned_on(tmp_path):
    """A moe-beyond-csv directory (DeepSeek-V2-Lite's 64 experts, top-6): default settings, no tuning."""
    from expertd.traces.convert import ConvertOptions, convert
    from expertd.traces.format import read_trace
    from expertd.traces.replay import sweep
    from expertd.traces.timing import build_timing

    rng = random.Random(0)
    src = tmp_path / "csv"
    src.mkdir()
    for request in range(2):
        hot = {layer: rng.sample(range(64), 12) for layer in range(1, 5)}
        lines = ["Layer ID,Batch Number,Token,Activated Expert IDs"]
        for layer in range(1, 5):
            for token in range(40):
                ids = sorted(rng.sample(hot[layer] if rng.random() < 0.8 else range(64), 6))
                lines.append(f'{layer},0,t{token},"{ids}"')
        (src / f"r{request}.csv").write_text("\n".join(lines) + "\n")
    convert("moe-beyond-csv", src, tmp_path / "t.etrace", ConvertOptions())
    trace = read_trace(tmp_path / "t.etrace")
    timing = build_timing(model=trace.meta.model, num_layers=4, expert_mb=17.3, layer_ms=0.25)
    rows = sweep(trace, ["default", "layer-distance"], [26], timing=timing)
    default = rows[0]
    assert default.policy == "default" and default.error is None
    assert default.prefetch is not None and default.prefetch["predictor"] == defaults.PREFETCH["predictor"]
    assert default.bound_ratio >= 1.0 and 0.0 < default.hit_rate < 1.0


def test_replay_saves_and_loads_predictor_statistics(tmp_path):
    import subprocess
    import sys

    expertd = [sys.executable, "-m", "expertd.daemon"]
    state = tmp_path / "granite.state"
    base = ["replay", "granite", "--timed", "--capacity", "0.1", "--policy", "default", "--max-tokens", "20"]
    saved = subprocess.run([*expertd, *base, "--save-state", str(state)], capture_output=True, text=True)
    assert saved.returncode == 0, saved.stderr
    assert state.exists() and "statistics of 20 tokens written" in saved.stderr
    loaded = subprocess.run([*expertd, *base, "--load-state", str(state)], capture_output=True, text=True)
    assert loaded.returncode == 0 and "default" in loaded.stdout, loaded.stderr
    other = tmp_path / "other.state"
    other.write_bytes(state.read_bytes().replace(b"granite-3.0-1b-a400m", b"granite-3.0-1b-a999m"))
    wrong = subprocess.run([*expertd, *base, "--load-state", str(other)], capture_output=True, text=True)
    assert wrong.returncode != 0 and "the statistics are for model" in wrong.stderr
