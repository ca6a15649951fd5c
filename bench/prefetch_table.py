"""The prefetch table of docs/prefetch.md: expertd's default vs the baselines, timed, on held-out data.

    .venv/bin/python bench/prefetch_table.py [--traces llama4,mixtral,granite] [--capacities 0.05,0.1,0.25]
        [--profile pcie4] [--jobs 2] [--doc docs/prefetch.md]

Timed replay (`expertd replay --timed`: the daemon's cache manager, a virtual clock, the
profile's links, the traces' real expert sizes) of each configuration at each capacity, on
each part of each trace:

- **tune**: what the default configuration was chosen on (Granite, all of it; Llama-4's
  abstract_algebra requests; Mixtral's gsm8k requests);
- **held-out**: the rest (Llama-4 anatomy + astronomy; Mixtral humaneval), never used to
  choose anything.

Configurations: ``default`` (what `expertd serve` runs), ``lru-per-layer`` without prefetch
(mixtral-offloading's policy), ``least-stale`` without prefetch (SpecMD),
``activation-matrix`` (MoE-Infinity's predictor, prefetching as MoE-Infinity does: every
guess of at least 0.2 up to 3 layers ahead, no share limit; evicting by the same
predictions), ``layer-distance`` without prefetch (our previous best), and ``belady`` without
prefetch (the demand bound). Plus the default on a trace format never tuned on: a
synthetic moe-beyond-csv directory (DeepSeek-V2-Lite's shape, top-6 of 64) converted with
`expertd trace convert`. Runs go to ``--jobs`` worker processes (each a fresh
``python bench/prefetch_table.py --one JOB``; results come back as JSON). Rewrites the
part of ``--doc`` between its table markers and prints every row as one JSON object on
the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- prefetch-table:begin -->", "<!-- prefetch-table:end -->"
CONFIGS = ("default", "activation-matrix", "layer-distance", "least-stale", "lru-per-layer", "belady")
LABELS = {
    "default": "**default** (predictive + combined, prefetch)",
    "activation-matrix": "activation-matrix (MoE-Infinity: its predictor, eager prefetch)",
    "layer-distance": "layer-distance, no prefetch",
    "least-stale": "least-stale, no prefetch (SpecMD)",
    "lru-per-layer": "lru-per-layer, no prefetch (mixtral-offloading)",
    "belady": "belady, no prefetch (demand bound)",
}
TUNE = {"llama4": "llama4-mmlu-abstract_algebra/", "mixtral": "gsm8k/", "granite": ""}
# MoE-Infinity prefetches its match's likely experts of the coming layers, nearest first, with
# no share limit: every guess of at least 0.2 up to 3 layers ahead, 4 per layer.
MOE_INFINITY = {"depth": 3, "min_prob": 0.2, "width": 4, "budget": 8, "share": 1.0}
CSV_SHAPE = {"layers": 26, "experts": 64, "top_k": 6, "expert_mb": 17.3, "layer_ms": 0.24}


def select_part(trace, name: str, part: str):
    """The tuning or held-out requests of trace ``name`` (Granite is all tuning)."""
    prefix = TUNE.get(name)
    if prefix is None:
        return trace if part == "held-out" else None
    tune = np.array([n.startswith(prefix) for n in trace.meta.requests])
    keep = tune if part == "tune" else ~tune
    return trace.select(keep[trace.request]) if keep.any() else None


def load(name: str):
    from expertd.traces import corpus
    from expertd.traces.format import read_trace

    return read_trace(Path(name)) if name.endswith(".etrace") else corpus.load(name)


def run_one(job: dict) -> dict:
    """One timed replay: ``job`` names trace, part, capacity, config, profile."""
    from expertd.daemon.core.defaults import prefetch_config
    from expertd.daemon.core.prefetch import PrefetchConfig
    from expertd.policies.base import PolicyError
    from expertd.traces.replay import geometry_of, parse_capacity, replay_hits, replay_timed
    from expertd.traces.timing import build_timing, copy_only

    trace = select_part(load(job["trace"]), job["name"], job["part"])
    meta = trace.meta
    slots, fraction = parse_capacity(job["capacity"], geometry_of(trace).num_keys)
    timing = build_timing(
        model=meta.model, num_layers=meta.num_layers, profile=job["profile"],
        expert_mb=job.get("expert_mb"), layer_ms=job.get("layer_ms"),
    )  # fmt: skip
    timing = copy_only(timing)
    bound = replay_hits(trace, "belady", slots)
    config, policy, prefetch = job["config"], job["config"], None
    if config == "default":
        policy, prefetch = "predictive", prefetch_config()
    elif config == "activation-matrix":
        policy, prefetch = "predictive", PrefetchConfig("activation-matrix", **MOE_INFINITY)
    started = time.process_time()
    try:
        row = replay_timed(
            trace,
            policy,
            slots,
            timing,
            prefetch=prefetch,
            bound_loads=bound.accesses - bound.hits,
            round_trips=False,
        )
    except PolicyError as exc:  # lru-per-layer below one slot per layer
        return {**job, "slots": slots, "error": str(exc)}
    out = {
        **job,
        "slots": slots,
        "fraction": fraction,
        "tokens": row.tokens,
        "hit_rate": row.hit_rate,
        "belady_hit_rate": bound.hit_rate,
        "bound_ratio": row.bound_ratio,
        "ms_per_token": row.time_s_per_token * 1e3,
        "stall_ms_per_token": row.stall_s_per_token * 1e3,
        "bound_ms_per_token": row.bound_s_per_token * 1e3,
        "compute_ms_per_token": len(trace) * timing.layer_s / row.tokens * 1e3,
        "tokens_per_s": row.tokens_per_s,
        "gb_moved": row.bytes_moved / 1e9,
        "gb_per_token": row.bytes_moved / 1e9 / row.tokens,
        "cpu_s": time.process_time() - started,
    }
    if row.prefetch:
        p = row.prefetch
        out.update(
            precision=p["precision"], recall=p["recall"], prefetches_used=p["prefetches_used"],
            prefetches_wasted=p["prefetches_wasted"],
        )  # fmt: skip
    return out


def synthetic_csv(directory: Path, requests: int = 6, tokens: int = 120, seed: int = 0) -> None:
    """moe-beyond-csv files with plausible routing: per-request hot sets, reuse, layer affinity."""
    rng = np.random.default_rng(seed)
    layers, experts, k = CSV_SHAPE["layers"], CSV_SHAPE["experts"], CSV_SHAPE["top_k"]
    popularity = rng.dirichlet(np.full(experts, 0.3), size=layers)  # [L, E] the model's taste
    follow = rng.integers(0, experts, size=(layers, experts))  # expert e at l favours follow[l, e] at l+1
    for r in range(requests):
        hot = np.stack([rng.dirichlet(np.full(experts, 0.2)) for _ in range(layers)])  # [L, E]
        rows: dict[int, list[list[int]]] = {layer: [] for layer in range(layers)}
        previous = [None] * layers
        for _ in range(tokens):
            first = None
            for layer in range(layers):
                weights = 0.5 * popularity[layer] + 0.5 * hot[layer]
                if previous[layer] is not None:
                    weights[previous[layer]] += 0.3 / k  # temporal reuse
                if first is not None:
                    weights[follow[layer - 1, first]] += 0.4  # cross-layer affinity
                chosen = rng.choice(experts, size=k, replace=False, p=weights / weights.sum())
                rows[layer].append(sorted(int(e) for e in chosen))
                previous[layer], first = list(chosen), int(chosen[0])
        lines = ["Layer ID,Batch Number,Token,Activated Expert IDs"]
        for layer in range(layers):
            lines += [f'{layer + 1},0,t{i},"{ids}"' for i, ids in enumerate(rows[layer])]
        (directory / f"request{r}.csv").write_text("\n".join(lines) + "\n")


def csv_trace(workdir: Path) -> Path:
    src, out = workdir / "csv", workdir / "deepseek-synthetic.etrace"
    src.mkdir(parents=True, exist_ok=True)
    synthetic_csv(src)
    subprocess.run(
        [sys.executable, "-m", "expertd.daemon", "trace", "convert", "--format", "moe-beyond-csv",
         "--experts", str(CSV_SHAPE["experts"]), "-o", str(out), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def jobs_for(args, workdir: Path) -> list[dict]:
    jobs = []
    for name in args.traces.split(","):
        parts = ("tune",) if name == "granite" else ("tune", "held-out")
        for part in parts:
            for capacity in args.capacities.split(","):
                for config in CONFIGS:
                    jobs.append(dict(trace=name, name=name, part=part, capacity=capacity, config=config,
                                     profile=args.profile))  # fmt: skip
    if args.csv:
        path = str(csv_trace(workdir))
        for config in ("default", "layer-distance", "belady"):
            jobs.append(dict(trace=path, name="moe-beyond-csv", part="held-out", capacity="0.1",
                             config=config, profile=args.profile, expert_mb=CSV_SHAPE["expert_mb"],
                             layer_ms=CSV_SHAPE["layer_ms"]))  # fmt: skip
    # The slow ones first, so the workers finish together.
    slow = ("default", "activation-matrix")
    return sorted(jobs, key=lambda j: (j["name"] != "llama4", j["config"] not in slow))


def run_all(jobs: list[dict], workers: int) -> list[dict]:
    pending, running, results = list(jobs), [], []
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop(0)
            proc = subprocess.Popen(
                [sys.executable, __file__, "--one", json.dumps(job)], stdout=subprocess.PIPE, text=True
            )
            running.append(proc)
        for proc in list(running):
            if proc.poll() is not None:
                running.remove(proc)
                out = proc.stdout.read() if proc.stdout else ""
                if proc.returncode:
                    raise SystemExit(f"a replay failed (exit {proc.returncode})")
                results.append(json.loads(out.strip().splitlines()[-1]))
                r = results[-1]
                what = r["error"] if "error" in r else f"ratio {r['bound_ratio']:.3f} ({r['cpu_s']:.0f} s)"
                print(f"  {r['name']} {r['part']} {r['capacity']} {r['config']}: {what}", file=sys.stderr)
        time.sleep(0.2)
    return results


def fmt_row(r: dict) -> str:
    if "error" in r:
        return f"| {LABELS.get(r['config'], r['config'])} | n/a: {r['error']} |" + " |" * 7
    pr = f"{r['precision']:.2f} / {r['recall']:.2f}" if "precision" in r else "-"
    waste = f"{r['prefetches_used']:,} / {r['prefetches_wasted']:,}" if "precision" in r else "-"
    return (
        f"| {LABELS.get(r['config'], r['config'])} | **{r['bound_ratio']:.3f}** | {r['hit_rate']:.3f} "
        f"| {r['gb_per_token']:.2f} | {r['stall_ms_per_token']:.1f} | {r['ms_per_token']:.1f} "
        f"| {r['tokens_per_s']:.2f} | {pr} | {waste} |"
    )


def tables(results: list[dict]) -> list[str]:
    header = (
        "| configuration | bound ratio | hit rate | GB moved / token | stall ms / token | ms / token "
        "| tokens/s | precision / recall | prefetches used / wasted |"
    )
    lines: list[str] = []
    order = {c: i for i, c in enumerate(CONFIGS)}
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["name"], r["part"], float(r["capacity"])), []).append(r)
    names = ["llama4", "mixtral", "granite", "moe-beyond-csv"]
    for key in sorted(groups, key=lambda k: (names.index(k[0]), k[1] != "held-out", k[2])):
        rows = sorted(groups[key], key=lambda r: order.get(r["config"], 99))
        first = next(r for r in rows if "error" not in r)
        lines += [
            f"### {key[0]}, {key[1]}, {key[2]:.0%} of experts ({first['slots']} slots)",
            "",
            f"{first['tokens']:,} tokens; bound {first['bound_ms_per_token']:.1f} ms/token "
            f"(compute {first['compute_ms_per_token']:.1f} ms/token; "
            f"Belady hit rate {first['belady_hit_rate']:.3f}).",
            "",
            header,
            "|---" * 9 + "|",
            *[fmt_row(r) for r in rows],
            "",
        ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", default="llama4,mixtral,granite")
    parser.add_argument("--capacities", default="0.05,0.1,0.25")
    parser.add_argument("--profile", default="pcie4")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-csv", dest="csv", action="store_false", help="skip the moe-beyond-csv trace")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "prefetch.md")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        results = run_all(jobs_for(args, Path(workdir)), args.jobs)
    command = "python bench/prefetch_table.py " + " ".join(sys.argv[1:])
    lines = [
        f"Generated by `{command.strip()}` on {time.strftime('%Y-%m-%d')}, profile {args.profile}, "
        f"in {time.perf_counter() - started:.0f} s.",
        "",
        *tables(results),
    ]
    if args.doc.exists():
        text = args.doc.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            args.doc.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail)
    print("\n".join(lines))
    print(json.dumps({"profile": args.profile, "rows": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
