"""The contract every shipped predictor keeps, warm starts, and each predictor's own behaviour."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from policy_traces import load_trace

from expertd.daemon.core.prefetch_state import StateError, learn_state, read_state, write_state
from expertd.policies.base import Geometry, PolicyError
from expertd.policies.predict.activation import ActivationMatrix
from expertd.policies.predict.combined import Combined
from expertd.policies.predict.predictor import (
    Predictor,
    builtin_predictors,
    make_predictor,
    pack_array,
    unpack_array,
)

GEOMETRY = Geometry(num_layers=4, num_experts=8)
PREDICTORS = builtin_predictors()


def routing(seed: int, tokens: int = 30, top_k: int = 2) -> list[tuple[int, list[int]]]:
    """(layer, experts) per step: tokens through every layer, sticky experts per layer."""
    rng = random.Random(seed)
    favourite = {layer: rng.sample(range(8), 3) for layer in range(GEOMETRY.num_layers)}
    steps = []
    for _ in range(tokens):
        for layer in range(GEOMETRY.num_layers):
            pool = favourite[layer] if rng.random() < 0.7 else list(range(8))
            steps.append((layer, rng.sample(pool, top_k)))
    return steps


def feed(predictor: Predictor, steps, request="r") -> None:
    for layer, experts in steps:
        predictor.observe(request, layer, experts)


def test_the_shipped_predictors_are_registered():
    assert PREDICTORS == ["activation-matrix", "combined", "cross-layer", "hints", "temporal"]


# --- contract, for every shipped predictor -----------------------------------------------


@pytest.mark.parametrize("name", PREDICTORS)
def test_predictions_are_valid_probabilities_layers_and_steps(name):
    predictor = make_predictor(name, GEOMETRY)
    layers = GEOMETRY.num_layers
    for i, (layer, experts) in enumerate(routing(1)):
        predictor.observe("r", layer, experts)
        if i % 3 == 0:
            predictor.hint("r", (layer + 1) % layers, [i % 8], [1.0])
        horizon = 1 + i % 6
        for p in predictor.predict("r", layer, horizon):
            assert 0.0 < p.prob <= 1.0, p
            assert 0 <= p.layer < layers and 0 <= p.expert < GEOMETRY.num_experts, p
            assert 1 <= p.ahead <= min(horizon, layers), p
            assert p.layer == (layer + p.ahead) % layers, p
        estimate = predictor.estimate("r", layer)
        assert estimate.shape == (layers, GEOMETRY.num_experts)
        assert ((estimate >= 0.0) & (estimate <= 1.0)).all()


@pytest.mark.parametrize("name", PREDICTORS)
def test_predictions_are_deterministic(name):
    def run():
        predictor = make_predictor(name, GEOMETRY)
        out = []
        for layer, experts in routing(2):
            predictor.observe("r", layer, experts)
            out.append(predictor.predict("r", layer, 3))
            out.append(predictor.estimate("r", layer).tolist())
        return out

    assert run() == run()


@pytest.mark.parametrize("name", PREDICTORS)
def test_min_prob_keeps_exactly_the_predictions_at_least_that_likely(name):
    predictor = make_predictor(name, GEOMETRY)
    for layer, experts in routing(3):
        predictor.observe("r", layer, experts)
        every = predictor.predict("r", layer, 2)
        assert predictor.predict("r", layer, 2, 0.3) == [p for p in every if p.prob >= 0.3]


@pytest.mark.parametrize("name", PREDICTORS)
def test_forget_drops_what_is_kept_per_request(name):
    steps = routing(4)
    fresh = make_predictor(name, GEOMETRY)
    fresh.observe("other", *steps[0])
    reused = make_predictor(name, GEOMETRY)
    reused.observe("other", *steps[0])
    feed(reused, steps[1:], request="r")
    reused.hint("r", 1, [7], [1.0])
    reused.forget("r")
    # Learned statistics may stay; the request's own history and hints must not.
    if name in ("temporal", "hints"):  # nothing but per-request state
        assert reused.predict("r", 0, 4) == fresh.predict("r", 0, 4)
    assert all(p.prob < 0.9 or p.expert != 7 for p in reused.predict("r", 0, 4) if p.layer == 1)


@pytest.mark.parametrize("name", PREDICTORS)
def test_hints_rank_above_history(name):
    predictor = make_predictor(name, GEOMETRY)
    feed(predictor, routing(5))
    layer = GEOMETRY.num_layers - 1  # the last observed layer of routing()
    history = predictor.predict("r", layer, 1)
    unlikely = min(range(8), key=lambda e: max([p.prob for p in history if p.expert == e], default=0.0))
    predictor.hint("r", 0, [unlikely], [0.4])
    ranked = predictor.predict("r", layer, 1)
    assert ranked[0].expert == unlikely and ranked[0].layer == 0
    assert all(p.prob < ranked[0].prob for p in ranked[1:])


@pytest.mark.parametrize("name", PREDICTORS)
def test_a_hint_is_spent_once_its_layer_is_computed(name):
    predictor = make_predictor(name, GEOMETRY)
    feed(predictor, routing(6))
    predictor.hint("r", 0, [5], [1.0])
    predictor.observe("r", 0, [1, 2])
    assert not any(p.prob >= 0.9 and (p.layer, p.expert) == (0, 5) for p in predictor.predict("r", 0, 4))


@pytest.mark.parametrize("name", PREDICTORS)
def test_warm_start_round_trip_gives_identical_predictions(name, tmp_path):
    steps = routing(7)
    learned = make_predictor(name, GEOMETRY)
    for request in ("a", "b"):
        feed(learned, steps, request)
        learned.forget(request)
    path = tmp_path / "state.msgpack"
    write_state(path, learned.state(), "test-model")
    warm = make_predictor(name, GEOMETRY)
    warm.load_state(read_state(path, "test-model"))
    again = make_predictor(name, GEOMETRY)
    again.load_state(learned.state())
    for layer, experts in steps[:12]:
        for predictor in (learned, warm, again):
            predictor.observe("c", layer, experts)
        expected = learned.predict("c", layer, 3)
        assert warm.predict("c", layer, 3) == expected
        assert again.predict("c", layer, 3) == expected
        assert np.allclose(warm.estimate("c", layer), learned.estimate("c", layer))


@pytest.mark.parametrize("name", PREDICTORS)
def test_unknown_parameter_is_a_clear_error(name):
    with pytest.raises(PolicyError, match=r"unknown parameter\(s\) bogus"):
        make_predictor(f"{name}(bogus=1)", GEOMETRY)


# --- state files ---------------------------------------------------------------------------


def test_state_of_another_predictor_or_geometry_is_refused(tmp_path):
    state = make_predictor("cross-layer", GEOMETRY).state()
    with pytest.raises(PolicyError, match="saved by predictor 'cross-layer'"):
        make_predictor("combined", GEOMETRY).load_state(state)
    with pytest.raises(PolicyError, match=r"this model is \[4, 16\]"):
        make_predictor("cross-layer", Geometry(4, 16)).load_state(state)


def test_state_file_of_another_model_or_garbage_is_refused(tmp_path):
    path = tmp_path / "state"
    write_state(path, {"predictor": "temporal"}, "model-a")
    with pytest.raises(StateError, match="for model 'model-a', not 'model-b'"):
        read_state(path, "model-b")
    path.write_bytes(b"\x93\x01\x02")
    with pytest.raises(StateError, match="not a predictor state file"):
        read_state(path)
    with pytest.raises(StateError, match="cannot read predictor state"):
        read_state(tmp_path / "missing")


def test_a_state_path_that_is_no_regular_file_is_refused_without_blocking(tmp_path, monkeypatch):
    import os

    from expertd.daemon.core import prefetch_state

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a blocking open or read would hang the daemon's loop
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(StateError, match="not a regular file|cannot read"):
            read_state(path)
    monkeypatch.setattr(prefetch_state, "MAX_STATE_BYTES", 1000)
    big = tmp_path / "big"
    big.write_bytes(bytes(1001))
    with pytest.raises(StateError, match="too large"):
        read_state(big)


def test_packed_arrays_round_trip_and_reject_bad_shapes():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(unpack_array(pack_array(array), (3, 4)), array)
    with pytest.raises(PolicyError, match=r"shape \[3, 4\], expected \[4, 3\]"):
        unpack_array(pack_array(array), (4, 3))
    with pytest.raises(PolicyError, match="not numeric"):
        unpack_array({"dtype": "|O", "shape": [1], "data": b"\0" * 8})


def test_learn_state_forgets_each_request_as_it_ends():
    steps = routing(8)
    rows = [("a", layer, experts) for layer, experts in steps] + [("b", layer, e) for layer, e in steps]
    state = learn_state("activation-matrix", GEOMETRY, rows)
    warm = ActivationMatrix(GEOMETRY)
    warm.load_state(state)
    assert warm.size == 2  # both requests ended and joined the library


# --- each predictor's own behaviour ---------------------------------------------------------


def test_cross_layer_learns_which_expert_follows():
    predictor = make_predictor("cross-layer", GEOMETRY)
    for _ in range(20):  # expert 3 at layer 0 is always followed by expert 6 at layer 1
        predictor.observe("r", 0, [3])
        predictor.observe("r", 1, [6])
    predictor.observe("r", 0, [3])
    best = predictor.predict("r", 0, 1)[0]
    assert (best.layer, best.expert, best.ahead) == (1, 6, 1) and best.prob > 0.8


def test_activation_matrix_predicts_the_most_similar_past_request():
    predictor = ActivationMatrix(GEOMETRY)
    for request, experts in (("a", [0, 1]), ("b", [6, 7])):
        for _ in range(5):
            for layer in range(4):
                predictor.observe(request, layer, experts)
        predictor.forget(request)
    predictor.observe("c", 0, [6, 7])  # looks like b
    assert {p.expert for p in predictor.predict("c", 0, 1)} == {6, 7}


def test_combined_pools_its_parts_as_documented():
    predictor = Combined(GEOMETRY)
    feed(predictor, routing(9))
    layer = GEOMETRY.num_layers - 1
    predictor.observe("r", 0, [2, 5])  # a new token: layers 1..3 have cross-layer evidence
    parts = predictor.parts("r", 0, GEOMETRY.num_layers)
    expected = predictor.pool(parts, near_rows=min(predictor.params.reach, layer))
    assert np.allclose(predictor.rows("r", 0, GEOMETRY.num_layers), expected)


def test_combined_beats_each_part_alone_on_granite():
    """Over the next layer, the one after, and the next token's: the pool's likelihood wins."""
    trace = load_trace("granite")
    geometry = Geometry(trace.meta.num_layers, trace.meta.num_experts)
    predictor = Combined(geometry)
    layers, experts_of, requests = trace.layer.tolist(), trace.experts.tolist(), trace.request.tolist()
    aheads = (1, 2, geometry.num_layers)
    scores = {name: 0.0 for name in ("pool", "frequency", "recency", "cross")}
    pending: dict[int, list[tuple[int, dict[str, np.ndarray]]]] = {}
    for i, (layer, experts, request) in enumerate(zip(layers, experts_of, requests, strict=True)):
        chosen = np.isin(np.arange(geometry.num_experts), experts)
        for _, rows in pending.pop(i, []):
            for name, row in rows.items():
                row = np.clip(row, 1e-4, 1 - 1e-4)
                scores[name] += float(np.log(np.where(chosen, row, 1 - row)).sum())
        predictor.observe(request, layer, experts)
        parts = predictor.parts(request, layer, geometry.num_layers)
        parts["pool"] = predictor.rows(request, layer, geometry.num_layers)
        for a in aheads:
            j = i + a
            if j < len(layers) and requests[j] == request and layers[j] == (layer + a) % geometry.num_layers:
                pending.setdefault(j, []).append((a, {name: parts[name][a - 1] for name in scores}))
    assert scores["pool"] > max(scores["frequency"], scores["recency"], scores["cross"]), scores


def test_per_request_state_is_bounded_and_drops_the_least_recently_used():
    from expertd.policies.predict.predictor import RecentGenerations

    made = []
    recent: RecentGenerations[int] = RecentGenerations(2)
    for request in ("a", "b", "a", "c"):  # "b" is then the least recently used
        recent.touch(request, lambda r=request: made.append(r) or len(made))
    assert list(recent) == ["a", "c"] and made == ["a", "b", "c"]
    assert recent.touch("a", lambda: -1) == 1  # kept state is returned, not made again


@pytest.mark.parametrize("name", ["cross-layer", "combined", "activation-matrix"])
def test_a_predictor_keeps_state_for_a_bounded_number_of_requests(name, monkeypatch):
    from expertd.policies.predict.predictor import RecentGenerations

    monkeypatch.setattr(type(make_predictor(name, Geometry(2, 4))), "MAX_GENERATIONS", 3)
    predictor = make_predictor(name, Geometry(2, 4))
    for request in range(10):
        predictor.observe(request, 0, [request % 4])
    kept = [v for k, v in vars(predictor).items() if isinstance(v, RecentGenerations) and k != "_hints"]
    assert [len(v) for v in kept] == [3]  # the 3 most recent of 10
    assert list(kept[0]) == [7, 8, 9]
