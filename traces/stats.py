"""Statistics of a routing trace: size, per-layer skew and temporal reuse, as a dict and a table.

Temporal reuse at a layer: of the k experts a token routes to there, the fraction that the next
token of the same request (the next one present in the trace) routes to at the same layer. A pair
counts for the phase of its second token. Skew: the share of a layer's accesses that go to its
most used 10% / 25% of experts, and the entropy of its expert use over log(experts).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from expertd.traces.format import PHASE_DECODE, PHASE_PREFILL, Trace

_PAIR_BLOCK = 1 << 16  # pairs compared at once: bounds the [P, k, k] comparison


def _top_share(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Share of each row's total held by its top ``ceil(fraction * columns)`` entries."""
    top = max(1, math.ceil(fraction * counts.shape[-1]))
    ordered = -np.sort(-counts, axis=-1)
    total = counts.sum(-1)
    return np.divide(ordered[..., :top].sum(-1), total, out=np.zeros(total.shape), where=total > 0)


def _reuse_pairs(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Row indexes (a, b): b is the same request's next token at a's layer."""
    new_token = np.ones(len(trace), dtype=bool)
    new_token[1:] = (trace.request[1:] != trace.request[:-1]) | (trace.token[1:] != trace.token[:-1])
    rank = np.cumsum(new_token)  # token ordinal over the whole trace
    by_layer = np.argsort(trace.layer, kind="stable")  # [N], token order within each layer
    a, b = by_layer[:-1], by_layer[1:]
    same = (trace.layer[a] == trace.layer[b]) & (trace.request[a] == trace.request[b])
    keep = same & (rank[b] == rank[a] + 1)
    return a[keep], b[keep]


def _overlaps(trace: Trace, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many of row a's experts row b also routes to, per pair."""
    out = np.empty(len(a), dtype=np.int64)
    for start in range(0, len(a), _PAIR_BLOCK):
        first = trace.experts[a[start : start + _PAIR_BLOCK]]  # [P, k]
        second = trace.experts[b[start : start + _PAIR_BLOCK]]  # [P, k]
        out[start : start + _PAIR_BLOCK] = (first[:, :, None] == second[:, None, :]).any(2).sum(1)
    return out


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def trace_stats(trace: Trace) -> dict[str, Any]:
    """What `expertd trace stats` reports, JSON-ready (None where there is nothing to count)."""
    meta, k = trace.meta, trace.meta.top_k
    layers, experts = meta.num_layers, meta.num_experts
    counts = np.bincount(trace.keys(), minlength=layers * experts).reshape(layers, experts)
    tokens = trace.num_tokens()
    a, b = _reuse_pairs(trace)
    overlap = _overlaps(trace, a, b)
    pair_layer = trace.layer[b]
    reused = np.bincount(pair_layer, weights=overlap, minlength=layers)
    pairs = np.bincount(pair_layer, minlength=layers)
    probabilities = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(counts > 0, probabilities * np.log(probabilities), 0.0).sum(1)
    entropy /= math.log(experts) if experts > 1 else 1.0
    top10, top25 = _top_share(counts, 0.10), _top_share(counts, 0.25)
    stats: dict[str, Any] = {
        "model": meta.model,
        "source": meta.source,
        "license": meta.license,
        "requests": int(len(np.unique(trace.request))),
        "tokens": tokens,
        "rows": len(trace),
        "layers": layers,
        "experts": experts,
        "top_k": k,
        "accesses": len(trace) * k,
        "missing_cells": tokens * layers - len(trace),
        "experts_used": int(np.count_nonzero(counts)),
        "top10_share": float(top10.mean()),
        "top25_share": float(top25.mean()),
        "static_top10_share": float(_top_share(counts.ravel(), 0.10)),
        "static_top25_share": float(_top_share(counts.ravel(), 0.25)),
        "entropy": float(entropy.mean()),
        "reuse": _ratio(overlap.sum(), len(a) * k),
    }
    if trace.phase is not None:
        starts = np.ones(len(trace), dtype=bool)
        starts[1:] = (trace.request[1:] != trace.request[:-1]) | (trace.token[1:] != trace.token[:-1])
        for name, value in (("prefill", PHASE_PREFILL), ("decode", PHASE_DECODE)):
            stats[f"{name}_tokens"] = int(np.count_nonzero(starts & (trace.phase == value)))
            in_phase = trace.phase[b] == value
            stats[f"reuse_{name}"] = _ratio(overlap[in_phase].sum(), in_phase.sum() * k)
    stats["per_layer"] = [
        {
            "layer": layer,
            "accesses": int(counts[layer].sum()),
            "experts_used": int(np.count_nonzero(counts[layer])),
            "top10_share": float(top10[layer]),
            "top25_share": float(top25[layer]),
            "entropy": float(entropy[layer]),
            "reuse": _ratio(reused[layer], pairs[layer] * k),
        }
        for layer in range(layers)
    ]
    return stats


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_stats(stats: dict[str, Any]) -> str:
    """A readable table of `trace_stats` output."""
    tokens = f"{stats['tokens']}"
    reuse = _num(stats["reuse"])
    if "prefill_tokens" in stats:
        tokens += f" ({stats['prefill_tokens']} prefill, {stats['decode_tokens']} decode)"
        reuse += f" (prefill {_num(stats['reuse_prefill'])}, decode {_num(stats['reuse_decode'])})"
    lines = [
        f"model           {stats['model']}",
        f"source          {stats['source']}",
        f"license         {stats['license']}",
        f"requests        {stats['requests']}",
        f"tokens          {tokens}",
        f"rows            {stats['rows']} (missing (token, layer) cells: {stats['missing_cells']})",
        f"geometry        {stats['layers']} layers x {stats['experts']} experts, top-{stats['top_k']}",
        f"accesses        {stats['accesses']} ({stats['experts_used']} of "
        f"{stats['layers'] * stats['experts']} (layer, expert) objects used)",
        f"temporal reuse  {reuse}",
        f"skew            top 10% / 25% of a layer's experts take {_num(stats['top10_share'])} / "
        f"{_num(stats['top25_share'])} of its accesses; entropy {_num(stats['entropy'])}",
        f"static cache    top 10% / 25% of all objects take {_num(stats['static_top10_share'])} / "
        f"{_num(stats['static_top25_share'])} of all accesses",
        "",
        f"{'layer':>5} {'accesses':>9} {'used':>6} {'top10%':>7} {'top25%':>7} {'entropy':>8} {'reuse':>6}",
    ]
    for row in stats["per_layer"]:
        lines.append(
            f"{row['layer']:>5} {row['accesses']:>9} {row['experts_used']:>6} "
            f"{_num(row['top10_share']):>7} {_num(row['top25_share']):>7} "
            f"{_num(row['entropy']):>8} {_num(row['reuse']):>6}"
        )
    return "\n".join(lines)
