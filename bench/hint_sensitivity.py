"""What client gate hints would have to be worth for the default to reach the bound goal.

    .venv/bin/python bench/hint_sensitivity.py [--traces mixtral,llama4] [--capacity 0.1]
        [--profile pcie4] [--ahead 1,3,8,all] [--accuracy 0.8,1.0] [--share 0.25,1.0] [--jobs 2]

A client that applies layer l+a's router to layer l's hidden state can hint layer l+a's
experts before it is computed (`ExpertClient.hint`; the HF client does it one layer ahead).
The recorded traces carry no hidden states, so what such hints are worth cannot be measured
on them. This bench *simulates* them to size the requirement: right after each acquire the
simulated client hints the experts that the *same token* really routes to ``a`` layers
later, each one replaced by a wrong expert of that layer with probability
``1 - accuracy`` (seeded). ``all`` hints every remaining layer of the token at its first
layer. Hints never cross into the next token: a hidden state only predicts its own
forward pass.

Timed replay of the default configuration (`expertd serve`'s) on the held-out part of each
trace (docs/prefetch.md, "The split"), the profile's links and the traces' real expert sizes;
the first row of each trace is the default without hints, measured in the same run. Hinted
rows run once per ``--share``: the share of each link's transfers that prefetches, hinted
ones included, may take (the default's is 0.25; 1.0 lets hints take the link whenever no
demand copy waits). Prints
a markdown table; the last line is JSON. These rows are a simulation of a client, not a
measurement of one: they say how accurate and how early hints would have to be, nothing
about whether a real router gets there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefetch_table import TUNE, load, select_part  # noqa: E402

Hint = tuple[int, list[int]]  # (layer, experts)


def simulated_hints(trace, ahead: int | None, accuracy: float, seed: int = 0) -> list[list[Hint]]:
    """Per row, the ``(layer, experts)`` hinted right after it (``ahead`` None: the whole token)."""
    from expertd.traces.replay import forward_ids

    rng = np.random.default_rng(seed)
    n, k = trace.experts.shape
    num_experts = trace.meta.num_experts
    true = trace.experts.astype(np.int64)  # [n, k]
    noisy = true.copy()
    wrong = rng.random((n, k)) >= accuracy
    for row, col in zip(*np.nonzero(wrong), strict=True):  # neither a right expert nor a repeat
        others = np.setdiff1d(np.arange(num_experts), np.concatenate([true[row], noisy[row]]))
        noisy[row, col] = rng.choice(others)
    forward = forward_ids(trace)
    layers = trace.layer.tolist()
    out: list[list[Hint]] = [[] for _ in range(n)]
    for row in range(n):
        reach = n if ahead is None else min(n, row + ahead + 1)  # rows [row + 1, reach) are in range
        if row == 0 or forward[row] != forward[row - 1]:
            targets = range(row + 1, reach)  # a token's first layer: everything in range
        elif ahead is not None and reach - 1 > row:
            targets = range(reach - 1, reach)  # later: the one row that just came in range
        else:
            continue
        for target in targets:
            if forward[target] != forward[row]:
                break
            out[row].append((layers[target], noisy[target].tolist()))
    return out


def run_one(job: dict) -> dict:
    from expertd.daemon.core.defaults import prefetch_config
    from expertd.traces.replay import geometry_of, parse_capacity, replay_hits, replay_timed
    from expertd.traces.timing import build_timing, copy_only

    trace = select_part(load(job["trace"]), job["trace"], "held-out")
    meta = trace.meta
    slots, _ = parse_capacity(job["capacity"], geometry_of(trace).num_keys)
    timing = copy_only(build_timing(model=meta.model, num_layers=meta.num_layers, profile=job["profile"]))
    bound = replay_hits(trace, "belady", slots)
    prefetch = prefetch_config()
    hints = None
    if job["ahead"] is not None:
        prefetch = dataclasses.replace(prefetch, share=job["share"])
        ahead = None if job["ahead"] == "all" else int(job["ahead"])
        table = simulated_hints(trace, ahead, job["accuracy"])
        hints = table.__getitem__
    row = replay_timed(
        trace, "predictive", slots, timing, prefetch=prefetch, bound_loads=bound.accesses - bound.hits,
        hints=hints, round_trips=False,
    )  # fmt: skip
    p = row.prefetch or {}
    return {
        **job,
        "slots": slots,
        "tokens": row.tokens,
        "bound_ratio": row.bound_ratio,
        "hit_rate": row.hit_rate,
        "gb_per_token": row.bytes_moved / 1e9 / row.tokens,
        "stall_ms_per_token": row.stall_s_per_token * 1e3,
        "prefetches_used": p.get("prefetches_used", 0),
        "prefetches_wasted": p.get("prefetches_wasted", 0),
    }


def main() -> int:
    from expertd.daemon.core.defaults import prefetch_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", default="mixtral,llama4")
    parser.add_argument("--capacity", default="0.1")
    parser.add_argument("--profile", default="pcie4")
    parser.add_argument("--ahead", default="1,3,8,all", help="layers ahead of a hint; all: whole token")
    parser.add_argument("--accuracy", default="0.8,1.0", help="share of hinted experts that are right")
    parser.add_argument("--share", default="0.25,1.0", help="prefetch shares of the link for hinted rows")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    jobs = []
    for name in args.traces.split(","):
        if TUNE.get(name) == "":
            parser.error(f"{name} is all tuning data (docs/prefetch.md, 'The split'): no held-out part")
        base = {"trace": name, "capacity": args.capacity, "profile": args.profile}
        jobs.append({**base, "ahead": None, "accuracy": None, "share": prefetch_config().share})
        for ahead in args.ahead.split(","):
            for accuracy in args.accuracy.split(","):
                for share in args.share.split(","):
                    jobs.append({**base, "ahead": ahead, "accuracy": float(accuracy), "share": float(share)})
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = []
        for row in pool.map(run_one, jobs):
            rows.append(row)
            what = f"ahead={row['ahead']} accuracy={row['accuracy']} share={row['share']}"
            print(f"  {row['trace']} {what}: ratio {row['bound_ratio']:.3f}", file=sys.stderr)
    print(f"default configuration, held-out part, capacity {args.capacity}, profile {args.profile}")
    print()
    print("| trace | hints: layers ahead | accuracy | prefetch share | bound ratio | hit rate | GB / token "
          "| stall ms / token | hinted or predicted prefetches used / wasted |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ahead = "none" if r["ahead"] is None else r["ahead"]
        accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}"
        print(
            f"| {r['trace']} | {ahead} | {accuracy} | {r['share']:.2f} | **{r['bound_ratio']:.3f}** "
            f"| {r['hit_rate']:.3f} | {r['gb_per_token']:.2f} | {r['stall_ms_per_token']:.1f} "
            f"| {r['prefetches_used']:,} / {r['prefetches_wasted']:,} |"
        )
    print(f"\n({time.perf_counter() - started:.0f} s)")
    summary = {"bench": "hint_sensitivity", "capacity": args.capacity, "profile": args.profile, "rows": rows}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
