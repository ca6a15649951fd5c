"""Fit the combined predictor's pool weights on the tuning split; score every estimate on both splits.

    .venv/bin/python bench/fit_combined.py [--stride 5]

For every routing decision of the tuning split (Granite; Llama-4 abstract_algebra; Mixtral
gsm8k), the estimates `Combined.parts` made before it, 1, 2 and 3 steps ahead (near rows:
this token's layers, with cross-layer evidence) and L/2 and L steps ahead (far rows), as
log-probability features. The weights maximise the conditional-logit likelihood of the
experts chosen (concave: Newton steps), near and far separately, averaged over the three
traces. Then every estimate alone and the pool are scored on both splits: Bernoulli
log-likelihood per choice (higher is better) and precision at k (the k likeliest experts
against the k chosen). Llama-4 rows are sampled every ``--stride`` steps. Prints a markdown
table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from expertd.policies.base import Geometry
from expertd.policies.predict.combined import Combined
from expertd.traces import corpus

PARTS = ("frequency", "recency", "cross", "marginal")
TUNE = {"llama4": "llama4-mmlu-abstract_algebra/", "mixtral": "gsm8k/", "granite": ""}


def split(name: str, part: str):
    trace = corpus.load(name)
    prefix = TUNE[name]
    tune = np.array([n.startswith(prefix) for n in trace.meta.requests])
    keep = tune if part == "tune" else ~tune
    return trace.select(keep[trace.request]) if keep.any() else None


def collect(trace, stride: int) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int]:
    """Per steps ahead: features [N, C, E] (log parts) and choices [N, E] (bool)."""
    meta = trace.meta
    layers_n = meta.num_layers
    predictor = Combined(Geometry(layers_n, meta.num_experts))
    aheads = (1, 2, 3, layers_n // 2, layers_n)
    layers, experts, requests = trace.layer.tolist(), trace.experts.tolist(), trace.request.tolist()
    pending: dict[int, list[tuple[int, np.ndarray]]] = {}
    feats: dict[int, list[np.ndarray]] = {a: [] for a in aheads}
    chosen: dict[int, list[np.ndarray]] = {a: [] for a in aheads}
    for i, (layer, row, request) in enumerate(zip(layers, experts, requests, strict=True)):
        if i and requests[i - 1] != request:
            predictor.forget(requests[i - 1])
        for a, f in pending.pop(i, []):
            y = np.zeros(meta.num_experts, dtype=bool)
            y[row] = True
            feats[a].append(f)
            chosen[a].append(y)
        predictor.observe(request, layer, row)
        if i % stride:
            continue
        parts = predictor.parts(request, layer, layers_n)
        logs = np.stack([np.log(np.maximum(parts[p][[a - 1 for a in aheads]], 1e-4)) for p in PARTS], axis=1)
        for k, a in enumerate(aheads):
            j = i + a
            if j < len(layers) and requests[j] == request and layers[j] == (layer + a) % layers_n:
                pending.setdefault(j, []).append((a, logs[k]))
    return {a: (np.array(feats[a]), np.array(chosen[a])) for a in aheads if feats[a]}, meta.top_k


def features(F: np.ndarray, near: bool) -> np.ndarray:
    """The pool's inputs: near rows log f, log rec, log cross; far rows log f, log rec."""
    return F[:, [0, 1, 2]] if near else F[:, [0, 1]]


def fit(sets: list[tuple[list[tuple[np.ndarray, np.ndarray]], int]], size: int) -> np.ndarray:
    w = np.full(size, 0.5)
    for _ in range(40):
        g, H = np.zeros(size), np.zeros((size, size))
        for pairs, k in sets:
            for F, Y in pairs:
                z = np.einsum("nce,c->ne", F, w)
                s = np.exp(z - z.max(axis=1, keepdims=True))
                s /= s.sum(axis=1, keepdims=True)
                mean = np.einsum("ne,nce->nc", s, F)
                scale = 1.0 / len(pairs) / len(sets)
                g += scale * (np.einsum("ne,nce->nc", Y, F) - k * mean).mean(axis=0)
                second = np.einsum("ne,nce,nde->ncd", s, F, F) - np.einsum("nc,nd->ncd", mean, mean)
                H -= scale * k * second.mean(axis=0)
        step = np.linalg.solve(H - 1e-9 * np.eye(size), -g)
        w = np.maximum(w + step, 0.0)
        if np.abs(step).max() < 1e-5:
            break
    return w


def score(z: np.ndarray, Y: np.ndarray, k: int) -> tuple[float, float]:
    """Bernoulli log-likelihood per choice and precision at k of pooled logits ``z`` [N, E]."""
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p = np.clip(p * (k / p.sum(axis=1, keepdims=True)), 1e-4, 1 - 1e-4)
    ll = float(np.where(Y, np.log(p), np.log(1 - p)).sum() / Y.sum())
    top = np.argpartition(-z, k - 1, axis=1)[:, :k]
    return ll, float(np.take_along_axis(Y, top, axis=1).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stride", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    data: dict[tuple[str, str], tuple[dict, int]] = {}
    for name in ("llama4", "mixtral", "granite"):
        for part in ("tune", "held-out"):
            trace = split(name, part)
            if trace is not None:
                data[(name, part)] = collect(trace, args.stride if name == "llama4" else 1)
    tune = [v for (n, p), v in data.items() if p == "tune"]
    w_near = fit([([(features(F, True), Y) for a, (F, Y) in d.items() if a <= 3], k) for d, k in tune], 3)
    w_far = fit([([(features(F, False), Y) for a, (F, Y) in d.items() if a > 3], k) for d, k in tune], 2)
    weights = {
        "near_frequency": round(float(w_near[0]), 3),
        "near_recency": round(float(w_near[1]), 3),
        "w_cross": round(float(w_near[2]), 3),
        "w_frequency": round(float(w_far[0]), 3),
        "w_recency": round(float(w_far[1]), 3),
    }
    rows = []
    for (name, part), (d, k) in data.items():
        for span, keep in (("near (1-3 ahead)", lambda a: a <= 3), ("far (L/2, L ahead)", lambda a: a > 3)):
            pairs = [(F, Y) for a, (F, Y) in d.items() if keep(a)]
            near = span.startswith("near")
            out = {"trace": name, "part": part, "span": span}
            for c, label in enumerate(PARTS[:3]):
                res = [score(F[:, c], Y, k) for F, Y in pairs]
                out[label] = tuple(round(float(np.mean(x)), 3) for x in zip(*res, strict=True))
            w = w_near if near else w_far
            res = [score(np.einsum("nce,c->ne", features(F, near), w), Y, k) for F, Y in pairs]
            out["pool"] = tuple(round(float(np.mean(x)), 3) for x in zip(*res, strict=True))
            rows.append(out)
    print(f"fitted weights (tuning split): {weights}")
    print()
    print("| trace | split | rows | frequency | recency | cross-layer | **pool** |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        columns = ("frequency", "recency", "cross", "pool")
        cells = " | ".join(f"{r[c][0]:.3f} / {r[c][1]:.3f}" for c in columns)
        print(f"| {r['trace']} | {r['part']} | {r['span']} | {cells} |")
    print(f"\n({time.perf_counter() - started:.0f} s; each cell: log-likelihood per choice / precision at k)")
    print(json.dumps({"weights": weights, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
