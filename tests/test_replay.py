"""The replay simulator: hit-rate mode, timed mode against its bound, and `expertd replay`."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from expertd import traces
from expertd.daemon.cli.main import main
from expertd.daemon.core.cache_core import Isolation
from expertd.daemon.core.prefetch import PrefetchConfig
from expertd.policies.base import Geometry
from expertd.policies.registry import available, make_policy
from expertd.traces.format import read_trace
from expertd.traces.replay import (
    ReplayError,
    parse_capacity,
    replay_hits,
    replay_timed,
    sweep,
)
from expertd.traces.timing import TimingModel, build_timing
from expertd.traces.trace import Trace, TraceMeta


def tiny_trace(rows: list[tuple[int, list[int]]], layers: int = 2, experts: int = 4) -> Trace:
    """One request; a new token starts whenever the layer goes back to 0."""
    tokens, token = [], -1
    for layer, _ in rows:
        token += layer == 0
        tokens.append(token)
    k = len(rows[0][1])
    meta = TraceMeta(model="tiny", num_layers=layers, num_experts=experts, top_k=k, requests=["r"])
    return Trace(
        meta=meta,
        request=np.zeros(len(rows), dtype=np.int32),
        token=np.array(tokens, dtype=np.int32),
        layer=np.array([r[0] for r in rows], dtype=np.int16),
        experts=np.array([r[1] for r in rows], dtype=np.int16),
    )


@pytest.fixture(scope="module")
def granite() -> Trace:
    return read_trace(traces.shipped())


@pytest.mark.parametrize(
    ("spec", "slots"),
    [("0.05", 5), ("0.5", 50), ("1.0", 100), ("7", 7), ("100", 100), (0.25, 25)],
)
def test_capacity_is_a_fraction_or_a_slot_count(spec, slots):
    assert parse_capacity(spec, 100)[0] == slots


@pytest.mark.parametrize("spec", ["0", "1.5", "-3", "101", "ten", "2.5e3"])
def test_bad_capacity_names_the_value(spec):
    with pytest.raises(ReplayError, match=spec.replace(".", r"\.")):
        parse_capacity(spec, 100)


def test_hit_mode_counts_what_the_policy_counts(granite):
    geometry = Geometry(granite.meta.num_layers, granite.meta.num_experts)
    row = replay_hits(granite, "lru", 77)
    assert row.accesses == len(granite) * granite.meta.top_k
    assert row.hits == make_policy("lru", 77, geometry).replay(granite.keys())


def test_sweep_reports_belady_as_every_rows_bound(granite):
    rows = sweep(granite, available(), [40, 200])
    assert {r.policy for r in rows} == set(available())
    for row in rows:
        assert row.hit_rate <= row.bound_hit_rate + 1e-12, row


def test_timed_mode_hits_match_hit_mode_for_lru(granite):
    timing = TimingModel(expert_bytes=1_000_000, h2d_gbps=10.0, nvme_gbps=1.0, layer_s=1e-4)
    timed = replay_timed(granite, "lru", 100, timing)
    assert timed.hits == replay_hits(granite, "lru", 100).hits


def test_stall_is_exactly_the_load_time_of_each_miss():
    # Two layers, capacity 2, each row one expert: every access misses.
    trace = tiny_trace([(0, [0]), (1, [1]), (0, [2]), (1, [3])])
    timing = TimingModel(expert_bytes=10**9, h2d_gbps=1.0, nvme_gbps=1.0, layer_s=0.5)
    row = replay_timed(trace, "lru", 2, timing)
    assert row.hits == 0 and row.tokens == 2
    # Each row: 1 s copy then 0.5 s compute; nothing overlaps without prefetch.
    assert row.stall_s_per_token == pytest.approx(2.0)
    assert row.time_s_per_token == pytest.approx(3.0)
    assert row.bytes_per_link == {"load": 0, "h2d": 4 * 10**9}


def test_timed_replay_credits_a_right_hint_and_charges_a_wrong_one():
    # As in the test above, every demand access misses (2 slots, 1 s copies, 0.5 s layers).
    # A client hints layer 1 while layer 0 loads: a right hint's copy starts as soon as
    # the demand copy is done, so layer 1 waits 0.5 s instead of 1 s; a wrong one holds
    # the link for the full second ahead of the next demand copy.
    trace = tiny_trace([(0, [0]), (1, [1]), (0, [2]), (1, [3])])
    timing = TimingModel(expert_bytes=10**9, h2d_gbps=1.0, nvme_gbps=1.0, layer_s=0.5)
    prefetch = PrefetchConfig("hints")
    right = {0: [(1, [1])], 2: [(1, [3])]}
    wrong = {0: [(1, [2])], 2: [(1, [0])]}
    plain = replay_timed(trace, "lru", 2, timing, prefetch=prefetch)
    helped = replay_timed(trace, "lru", 2, timing, prefetch=prefetch, hints=lambda row: right.get(row, []))
    hurt = replay_timed(trace, "lru", 2, timing, prefetch=prefetch, hints=lambda row: wrong.get(row, []))
    assert plain.stall_s_per_token == pytest.approx(2.0)
    assert helped.stall_s_per_token == pytest.approx(1.5)
    assert helped.prefetch["prefetches_used"] == 2 and helped.prefetch["prefetches_wasted"] == 0
    assert hurt.stall_s_per_token > plain.stall_s_per_token
    assert hurt.prefetch["prefetches_used"] == 0 and hurt.prefetch["prefetches_wasted"] >= 1


def test_cold_host_loads_from_the_store_first():
    trace = tiny_trace([(0, [0]), (1, [1])])
    timing = TimingModel(expert_bytes=10**9, h2d_gbps=2.0, nvme_gbps=1.0, layer_s=0.0, host_slots=8)
    row = replay_timed(trace, "lru", 2, timing)
    # One token, both rows miss twice over: 1 s from NVMe, then 0.5 s over h2d, each.
    assert row.tokens == 1 and row.time_s_per_token == pytest.approx(3.0)
    assert row.bytes_per_link == {"load": 2 * 10**9, "h2d": 2 * 10**9}


@pytest.mark.parametrize("policy", ["lru", "fifo", "lru-per-layer", "belady"])
@pytest.mark.parametrize("capacity", ["0.05", "0.25"])
def test_no_timed_row_beats_its_bound(granite, policy, capacity):
    slots, _ = parse_capacity(capacity, 24 * 32)
    timing = build_timing(model=granite.meta.model, num_layers=24, profile="pcie4")
    (row,) = sweep(granite, [policy], [slots], timing=timing)
    assert row.bound_ratio >= 1.0 - 1e-9, row
    assert row.time_s_per_token >= row.bound_s_per_token * (1 - 1e-9)


def test_timed_mode_without_device_computes_from_host(granite):
    timing = build_timing(model=granite.meta.model, num_layers=24, profile="cpu-nvme")
    (row,) = sweep(granite, ["lru"], [100], timing=timing)
    assert row.bytes_per_link["h2d"] == 0 and row.bytes_per_link["load"] > 0
    assert math.isfinite(row.tokens_per_s) and row.bound_ratio >= 1.0


def test_replay_command_writes_the_json_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(["replay", "granite-3.0-1b-a400m", "--policy", "lru,fifo", "--capacity", "0.1,50"])
    assert code == 0
    assert "lru" in capsys.readouterr().out
    code = main(["replay", str(traces.shipped()), "--policy", "lru", "--capacity", "0.1", "--timed",
                 "--json", str(out)])  # fmt: skip
    assert code == 0
    (row,) = json.loads(out.read_text())
    for key in ("policy", "capacity", "accesses", "hits", "hit_rate", "seconds", "stall_s_per_token",
                "tokens_per_s", "bytes_moved", "bound_s_per_token", "bound_ratio"):  # fmt: skip
        assert key in row, key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nonexistent.etrace"], "no such file"),
        (["granite-3.0-1b-a400m", "--policy", "nope"], "unknown policy 'nope'"),
        (["granite-3.0-1b-a400m", "--capacity", "2.0"], "capacity fraction 2.0"),
        (
            ["granite-3.0-1b-a400m", "--timed", "--profile", "pcie4", "--h2d-gbps", "-1"],
            "h2d bandwidth",
        ),
        (["granite-3.0-1b-a400m", "--tenants", "a,b"], "--tenants needs --timed"),
        (["granite-3.0-1b-a400m", "--timed", "--tenants", "a:secret"], "isolation 'secret' is not one of"),
        (["granite-3.0-1b-a400m", "--timed", "--tenants", "a:private:0"], "share 0.0 must be a fraction"),
        (["granite-3.0-1b-a400m", "--timed", "--tenants", "a,a"], "a name of its own"),
        (
            ["granite-3.0-1b-a400m", "--timed", "--tenants", "a,b:partitioned:0.5"],
            "partitioned tenants need a host tier of a given size",
        ),
    ],
)
def test_replay_errors_are_one_line_and_exit_2(args, message, capsys):
    assert main(["replay", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_bad_trace_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.etrace"
    bad.write_bytes(b"not a trace at all")
    assert main(["replay", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.etrace" in err and "\n" not in err


def test_live_replay_measures_a_real_daemon(tmp_path, capsys):
    out = tmp_path / "live.json"
    args = ["granite", "--live", "--live-scale", "16", "--max-tokens", "8", "--capacity", "0.25"]
    code = main(["replay", *args, "--policy", "lru,fifo", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert [(r["policy"], r["device"]) for r in rows] == [("lru", "cpu"), ("fifo", "cpu")]
    for row in rows:
        assert row["tokens"] == 8 and row["accesses"] == 8 * 24 * 8 and row["tokens_per_s"] > 0
        assert 0.0 <= row["hit_rate"] <= 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where CUDA is absent")
def test_live_replay_on_cuda_without_cuda_says_so(capsys):
    args = ["granite", "--live", "--live-device", "cuda", "--max-tokens", "2", "--capacity", "0.25"]
    assert main(["replay", *args]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_timed_replay_of_a_recorded_trace_takes_the_expert_size_it_carries(tmp_path, capsys):
    from expertd.traces.format import write_trace

    granite = read_trace(traces.shipped())
    meta = dataclasses.replace(granite.meta, model="my-own-moe", extra={"expert_bytes": 2_000_000})
    recorded = Trace(
        meta, granite.request, granite.token, granite.layer, granite.experts, phase=granite.phase
    )
    write_trace(tmp_path / "mine.etrace", recorded)
    code = main(["replay", str(tmp_path / "mine.etrace"), "--timed", "--policy", "lru", "--capacity", "0.1",
                 "--json", str(tmp_path / "rows.json")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["bytes_moved"] % 2_000_000 == 0 and row["bytes_moved"] > 0


def test_live_replay_of_the_default_runs_what_serve_runs_without_flags(tmp_path, capsys):
    from expertd.daemon.core import defaults

    out = tmp_path / "live.json"
    args = ["granite", "--live", "--live-scale", "16", "--max-tokens", "6", "--capacity", "0.25"]
    code = main(["replay", *args, "--policy", "default", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    (row,) = json.loads(out.read_text())
    assert row["policy"] == "default" and row["prefetch"]["predictor"] == defaults.PREFETCH["predictor"]
    assert row["prefetch"]["planned"] > 0
    code = main(["replay", *args, "--policy", "default", "--predictor", "temporal"])
    assert code == 2 and "brings its own prefetch settings" in capsys.readouterr().err


def test_one_shared_tenant_replays_exactly_as_no_tenants(granite):
    timing = build_timing(model=granite.meta.model, num_layers=granite.meta.num_layers, profile="pcie4")
    alone = replay_timed(granite, "lru", 96, timing)
    tenant = replay_timed(granite, "lru", 96, timing, tenants={"solo": Isolation()})
    assert (
        tenant.tenants["solo"]["hits"] == alone.hits and tenant.tenants["solo"]["accesses"] == alone.accesses
    )
    same = {k: v for k, v in alone.as_dict().items() if k != "seconds"}
    assert {k: v for k, v in tenant.as_dict().items() if k in same} == same


def test_replay_command_counts_each_tenants_hits(tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = [
        "granite-3.0-1b-a400m",
        "--timed",
        "--policy",
        "lru",
        "--capacity",
        "0.5",
        "--host-capacity",
        "0.75",
    ]
    code = main(["replay", *args, "--tenants", "a,b:partitioned:0.5,c:private:0.5", "--json", str(out)])
    assert code == 0
    assert "tenants: a " in capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert set(row["tenants"]) == {"a", "b", "c"}
    assert sum(t["hits"] for t in row["tenants"].values()) == row["hits"]
    assert set(row["private_replies"]) == {"drawn", "real"}


def test_live_replay_gives_its_daemons_every_prefetch_setting_timed_replay_uses():
    import argparse
    import tomllib

    from expertd.daemon.cli.replay_cli import prefetch_toml
    from expertd.daemon.service.config import ServeConfig
    from expertd.daemon.service.startup import prefetch_settings

    args = argparse.Namespace(
        prefetch_depth=3, prefetch_min_prob=0.4, prefetch_budget=5, prefetch_width=3, prefetch_share=0.5
    )
    timed = PrefetchConfig.from_settings(args, predictor="temporal")
    served = prefetch_settings(ServeConfig.from_mapping(tomllib.loads(prefetch_toml(timed))))
    assert served == timed
