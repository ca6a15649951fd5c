"""Trace stats: counts, per-layer skew and temporal reuse, on a trace small enough to do by hand."""

from __future__ import annotations

import json

import pytest

from expertd.traces import shipped
from expertd.traces.format import Trace, TraceMeta, read_trace
from expertd.traces.stats import format_stats, trace_stats


def hand_trace() -> Trace:
    """Request 0: three tokens (the last lacks layer 1); request 1: one token at layer 0."""
    meta = TraceMeta("m", 2, 4, 2, requests=["a", "b"], has_phase=True)
    rows = [  # request, token, layer, experts, phase
        (0, 0, 0, [0, 1], 0),
        (0, 0, 1, [2, 3], 0),
        (0, 1, 0, [1, 2], 1),
        (0, 1, 1, [3, 2], 1),
        (0, 2, 0, [3, 0], 1),
        (1, 0, 0, [0, 1], 0),
    ]
    request, token, layer, experts, phase = zip(*rows, strict=True)
    return Trace(meta, request, token, layer, experts, phase=phase)


def test_temporal_reuse_pairs_a_token_with_the_next_token_of_its_request() -> None:
    stats = trace_stats(hand_trace())
    # layer 0: t0->t1 shares expert 1, t1->t2 shares none; layer 1: t0->t1 shares both.
    # Request 1's token is not the next token of request 0.
    assert stats["reuse"] == pytest.approx(3 / 6)
    assert [row["reuse"] for row in stats["per_layer"]] == [pytest.approx(1 / 4), 1.0]
    assert stats["reuse_decode"] == pytest.approx(3 / 6)
    assert stats["reuse_prefill"] is None  # no pair ends in a prefill token


def test_counts_and_skew() -> None:
    stats = trace_stats(hand_trace())
    assert (stats["requests"], stats["tokens"], stats["rows"]) == (2, 4, 6)
    assert (stats["prefill_tokens"], stats["decode_tokens"]) == (2, 2)
    assert stats["missing_cells"] == 2
    assert stats["accesses"] == 12
    layer0, layer1 = stats["per_layer"]
    assert (layer0["experts_used"], layer1["experts_used"]) == (4, 2)
    assert layer0["top10_share"] == pytest.approx(3 / 8)  # experts 0 and 1 have 3 of 8 each
    assert layer1["top25_share"] == pytest.approx(1 / 2)
    assert layer1["entropy"] == pytest.approx(0.5)  # two equally used experts of four


def test_stats_are_strict_json_and_a_readable_table() -> None:
    stats = trace_stats(hand_trace())
    assert json.loads(json.dumps(stats, allow_nan=False)) == stats
    table = format_stats(stats)
    assert "temporal reuse  0.500 (prefill -, decode 0.500)" in table
    assert "tokens          4 (2 prefill, 2 decode)" in table
    assert len(table.splitlines()) == 13 + 2


def test_shipped_granite_stats() -> None:
    stats = trace_stats(read_trace(shipped()))
    assert (stats["tokens"], stats["prefill_tokens"], stats["decode_tokens"]) == (304, 112, 192)
    assert (stats["layers"], stats["experts"], stats["top_k"]) == (24, 32, 8)
    assert stats["missing_cells"] == 0
    assert 0.3 < stats["reuse"] < 0.6
    assert all(row["accesses"] == 304 * 8 for row in stats["per_layer"])
