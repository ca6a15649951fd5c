"""Timed replay with host compute: the timing model, the peers' rows, and the hybrid oracle bound."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from expertd import traces
from expertd.daemon.cli.main import main
from expertd.traces.format import read_trace
from expertd.traces.peers import HOST_PEERS, PEERS, bypass_min_fetches, run_peer
from expertd.traces.replay import BOUND_POLICY, forward_ids, parse_capacity, replay_hits, sweep
from expertd.traces.timing import PROFILES, TimingModel, build_timing
from expertd.traces.trace import Trace, TraceMeta

ROWS = ["default", "lru", *PEERS]


def synthetic(tokens: int = 40, layers: int = 6, experts: int = 16, k: int = 2, seed: int = 1) -> Trace:
    """Skewed routing with some reuse from token to token."""
    rng = np.random.default_rng(seed)
    taste = rng.dirichlet(np.full(experts, 0.3), size=layers)  # [L, E]
    chosen = [
        rng.choice(experts, size=k, replace=False, p=taste[layer])
        for _ in range(tokens)
        for layer in range(layers)
    ]
    meta = TraceMeta(model="synthetic", num_layers=layers, num_experts=experts, top_k=k, requests=["r"])
    n = tokens * layers
    return Trace(
        meta=meta,
        request=np.zeros(n, dtype=np.int32),
        token=np.repeat(np.arange(tokens, dtype=np.int32), layers),
        layer=np.tile(np.arange(layers, dtype=np.int16), tokens),
        experts=np.array(chosen, dtype=np.int16),
    )


@pytest.fixture(scope="module")
def granite() -> Trace:
    trace = read_trace(traces.shipped())
    return trace.select(forward_ids(trace) < 40)


def desktop(trace: Trace, **kw) -> TimingModel:
    """pcie4, with the expert size of a model large enough that host passes matter."""
    return build_timing(
        model=trace.meta.model, num_layers=trace.meta.num_layers, expert_mb=17.3, layer_ms=0.24, **kw
    )


@pytest.mark.slow
@pytest.mark.parametrize("which", ["granite", "synthetic"])
@pytest.mark.parametrize("capacity", ["0.05", "0.25", "0.5"])
def test_the_hybrid_oracle_is_at_most_every_row(granite, which, capacity):
    trace = granite if which == "granite" else synthetic()
    num_keys = trace.meta.num_layers * trace.meta.num_experts
    slots = parse_capacity(capacity, num_keys)[0]
    rows = {r.policy: r for r in sweep(trace, ROWS, [slots], timing=desktop(trace))}
    oracle = rows["hybrid-oracle"].time_s_per_token
    for name, row in rows.items():
        if row.error:
            continue
        assert row.time_s_per_token >= oracle * (1 - 1e-9), (name, row.time_s_per_token, oracle)
        assert row.bound_ratio >= 1 - 1e-9 and row.bound_s_per_token == pytest.approx(oracle)


def test_the_default_computes_misses_on_the_host_and_copies_what_returns(granite):
    row = run_default(granite, "0.1")
    assert row.host_computed > 0 and row.copied > 0
    assert row.seconds_per_token == row.time_s_per_token
    assert row.copy_bound_ratio is not None and row.copy_bound_ratio <= row.bound_ratio


def run_default(trace: Trace, capacity: str):
    num_keys = trace.meta.num_layers * trace.meta.num_experts
    (row,) = sweep(trace, ["default"], [parse_capacity(capacity, num_keys)[0]], timing=desktop(trace))
    return row


def brute_force_fetches(keys: list[int], slots: int) -> int:
    """Fewest fetches over every schedule: any free start, each miss cached (evicting any key) or not."""
    distinct = sorted(set(keys))
    best = math.inf
    for start in itertools.combinations(distinct, min(slots, len(distinct))):
        states = {frozenset(start): 0}
        for key in keys:
            after: dict[frozenset, int] = {}
            for state, cost in states.items():
                if key in state:
                    options = [(state, cost)]
                else:
                    options = [(state, cost + 1)]  # bypass
                    if len(state) < slots:
                        options.append((state | {key}, cost + 1))
                    options += [((state - {victim}) | {key}, cost + 1) for victim in state]
                for s, c in options:
                    after[s] = min(after.get(s, math.inf), c)
            states = after
        best = min(best, min(states.values()))
    return int(best)


@pytest.mark.parametrize("seed", range(12))
def test_min_with_bypass_counts_the_fewest_fetches_any_schedule_needs(seed):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 5, size=10)
    for slots in (1, 2, 3):
        assert bypass_min_fetches(keys, slots) == brute_force_fetches(keys.tolist(), slots), (keys, slots)


def test_min_with_bypass_never_needs_more_than_plain_min(granite):
    keys = granite.keys()
    plain = replay_hits(granite, BOUND_POLICY, 40)
    assert bypass_min_fetches(keys, 40) <= plain.accesses - plain.hits


def test_a_layer_ends_when_both_its_device_part_and_its_host_part_end():
    timing = TimingModel(
        expert_bytes=10**9, h2d_gbps=25.0, nvme_gbps=7.0, layer_s=0.1, host_gbps=50.0, device_gbps=1000.0
    )
    assert timing.layer_end_s(0) == 0.1
    assert timing.layer_end_s(1) == pytest.approx(max(0.1 - 0.001, 0.02))  # the device part is longer
    assert timing.layer_end_s(8) == pytest.approx(0.16)  # eight host passes are longer


def test_n_cpu_moe_holds_whole_layers_and_computes_the_rest_on_the_host():
    trace = synthetic()
    experts = trace.meta.num_experts
    row = run_peer("n-cpu-moe", trace, 2 * experts + 3, desktop(trace), 0)  # two whole layers fit
    on_device = np.isin(trace.layer, [4, 5]).sum() * trace.meta.top_k  # llama.cpp: the last layers
    assert row.hits == on_device and row.host_computed == row.accesses - on_device and row.copied == 0


def test_fiddler_holding_every_expert_computes_nothing_on_the_host():
    trace = synthetic()
    timing = desktop(trace)
    row = run_peer("fiddler", trace, trace.meta.num_layers * trace.meta.num_experts, timing, 0)
    assert row.host_computed == 0 and row.hit_rate == 1.0
    assert row.time_s_per_token == pytest.approx(trace.meta.num_layers * timing.layer_s)


def test_mixtral_offloading_copies_every_miss():
    trace = synthetic()
    row = run_peer("mixtral-offloading", trace, 12, desktop(trace), 0)
    assert row.copied == row.accesses - row.hits and row.host_computed == 0


@pytest.mark.parametrize("peer", HOST_PEERS)
def test_a_cpu_peer_without_host_compute_is_a_row_with_its_reason(peer):
    trace = synthetic()
    timing = build_timing(model="synthetic", num_layers=6, profile="cpu-nvme", expert_mb=17.3, layer_ms=0.24)
    (row,) = sweep(trace, [peer], [10], timing=timing)
    assert row.error and peer in row.error


def test_every_profile_with_a_device_computes_on_the_host_and_pays_round_trips():
    for profile in PROFILES.values():
        if profile.h2d_gbps is not None:
            assert profile.host_gbps and profile.host_cores and profile.acquire_socket_us > 0, profile.name


def test_deepseek_v2_lite_replays_without_layer_ms():
    timing = build_timing(model="deepseek-ai/DeepSeek-V2-Lite", num_layers=26, profile="pcie4")
    assert timing.expert_bytes == 3 * 2048 * 1408 * 2 and 0 < timing.layer_s < 1e-3


def test_replay_cli_writes_the_hybrid_columns(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main([
        "replay", str(traces.shipped()), "--timed", "--profile", "pcie4", "--max-tokens", "20",
        "--policy", "default,n-cpu-moe,fiddler,hybrid-oracle", "--capacity", "0.1", "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    rows = {row["policy"]: row for row in json.loads(out.read_text())}
    for name in ("default", "n-cpu-moe", "fiddler"):
        for field in ("seconds_per_token", "bound_ratio", "host_computed", "copied", "hit_rate"):
            assert field in rows[name], (name, field)
    assert rows["hybrid-oracle"]["bound_ratio"] == pytest.approx(1.0)
    assert "on host" in capsys.readouterr().out
