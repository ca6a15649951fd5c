"""Live: tokens/s of expertd vs the baselines a user would run, on the same RAM budget.

    .venv/bin/python bench/live_vs_mmap.py                       # the full matrix (root: ~1 h)
    .venv/bin/python bench/live_vs_mmap.py --quick               # seconds: a smoke run, no limits

Every system drives the same real routing trace (Granite's; Mixtral's with its experts
scaled down by ``--mixtral-scale`` to fit the disk) through the same SwiGLU compute, one
token at a time, over the same synthetic store on the real disk:

- ``expertd`` (and lever variants ``expertd-*``): a daemon whose host tier is the budget,
  reading with O_DIRECT; the client computes from host slots;
- ``mmap``: the store mmap'd, the page cache is the RAM tier (no advice);
- ``advised``: the same with MADV_RANDOM, and MADV_WILLNEED on each layer's routed experts
  as soon as they are chosen (`expertd.traces.live_sources.AdvisedMmapSource`);
- ``pread``: a client-side LRU of the budget's slots filled by O_DIRECT pread;
- ``llama.cpp``: llama-cpp-python over a GGUF of the same shapes whose router replays the
  trace (bench/llama_peer.py); skipped where llama_cpp does not import.

RAM is bounded with cgroup v1 memory limits where the machine allows (as root): the
daemon's group gets the budget plus its own slack, each client's group its idle footprint
(plus the budget for the clients that cache themselves). Budgets are fractions of all
experts. Each run starts cold (page cache of the store dropped, a fresh daemon); the first
``--cold-tokens`` are reported as the cold start, the rest as the steady state. The
reference "all in RAM" run (budget 1, one warm pass first) gives each system's slowdown.
Readahead (`read_ahead_kb` of the store's disk) is set per block of runs and always
restored. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_env import Cgroup, Readahead, load_average  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DAEMON_SLACK = 192 << 20  # the daemon's own memory besides its host tier (Python, numpy, zmq)
CLIENT_SLACK = 64 << 20
PRESETS = {"granite": "granite-3.0-1b-a400m", "mixtral": "mixtral-8x7b", "llama4": "llama-4-maverick"}
DEEP_PREFETCH = "[prefetch]\ndepth = 4\nmin_prob = 0.1\nbudget = 16\nwidth = 8\nshare = 1.0\n"
PREDICTIVE = ["--host-policy", "predictive"]  # evict by predicted next use (the device tier's default)
# name -> (client mode, daemon flags, prefetch TOML, store codec)
SYSTEMS: dict[str, tuple[str, list[str], str, str]] = {
    "expertd": ("expertd", [], "", "none"),
    "expertd-lru": ("expertd", ["--predictor", "none"], "", "none"),
    "expertd-deep": ("expertd", [], DEEP_PREFETCH, "none"),
    "expertd-evict": ("expertd", PREDICTIVE, "", "none"),
    "expertd-cross": ("expertd", ["--predictor", "cross-layer"], DEEP_PREFETCH, "none"),
    "expertd-predictive": ("expertd", PREDICTIVE, DEEP_PREFETCH, "none"),
    "expertd-threads8": ("expertd", [*PREDICTIVE, "--load-threads", "8"], DEEP_PREFETCH, "none"),
    "expertd-lz4": ("expertd", PREDICTIVE, DEEP_PREFETCH, "lz4-planes"),
    "mmap": ("mmap", [], "", "none"),
    "advised": ("advised", [], "", "none"),
    "pread": ("pread", [], "", "none"),
    "llama.cpp": ("llama", [], "", "none"),
}

CLIENT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from expertd.traces.live import ClientSource, MmapSource, drive
    from expertd.traces.live_sources import AdvisedMmapSource, PreadLruSource
    from expertd.daemon.cli.replay_cli import load_for_replay
    mode, target, trace_name = sys.argv[1], sys.argv[2], sys.argv[3]
    max_tokens, cold_tokens, warm, slots = (int(a) for a in sys.argv[4:8])
    trace = load_for_replay(trace_name, "all", max_tokens)
    client = None
    if mode == "expertd":
        from expertd.client import ExpertClient
        client = ExpertClient(target, name="bench-live")
        source = ClientSource(client, "host")
    else:
        source = {"mmap": MmapSource, "advised": AdvisedMmapSource}[mode](target) if mode != "pread" \\
            else PreadLruSource(target, slots)
        source.drop_page_cache()
    print("ready", flush=True)
    sys.stdin.readline()  # the parent has set this process's memory limit
    if warm:
        drive(trace, source)  # the reference run: everything fits, time a second pass
    io = lambda: int(open("/proc/self/io").read().split("read_bytes:")[1].split()[0])
    before = io()
    result = drive(trace, source, steady_from=0 if warm else cold_tokens).as_dict()
    result["read_bytes"] = io() - before  # from the disk, page-cache readahead included
    if client is not None:
        stats = client.stats()
        result["daemon_host"] = stats["tiers"]["host"]
        result["prefetch"] = stats.get("prefetch")
    print(json.dumps(result), flush=True)
    """
)


def client_command(system: str, target: str, trace: str, args: argparse.Namespace, slots: int, warm: bool):
    mode = SYSTEMS[system][0]
    numbers = [str(args.max_tokens), str(args.cold_tokens), str(int(warm)), str(slots)]
    if mode == "llama":
        return [sys.executable, str(REPO / "bench" / "llama_peer.py"), "run", target, trace, *numbers]
    return [sys.executable, "-c", CLIENT, mode, target, trace, *numbers]


def run_client(command: list[str], own_budget: int, group: Cgroup) -> dict:
    """Start a client, bound it to its idle footprint + ``own_budget``, let it run; its JSON."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        group.add(proc.pid)
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"client {command[-7]} failed to start: {line!r}")
        baseline = group.usage()
        group.limit(baseline + own_budget + CLIENT_SLACK)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = proc.stdout.readline()
        if not out:
            raise RuntimeError(f"client {command[-7]} died (exit {proc.wait(30)}): out of memory?")
        result = json.loads(out)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result["client_baseline_bytes"] = baseline
    result["client_peak_bytes"] = group.peak()
    return result


def one_run(system: str, store: Path, trace: str, args, slots: int, slot_bytes: int, warm: bool, tag: str):
    """One cold start of ``system`` at ``slots``: its result dict (tokens/s cold and steady)."""
    from expertd.traces.live import PrivateDaemon

    mode, flags, toml, _ = SYSTEMS[system]
    budget = slots * slot_bytes
    client_group = Cgroup(f"{tag}-client", args.cgroups)
    load_before = load_average()
    try:
        if mode != "expertd":
            own = budget if mode in ("mmap", "advised", "pread", "llama") else 0
            if mode == "llama":  # its attention and embedding weights too: the others have none
                own += max(0, store.stat().st_size - args.num_keys[trace] * slot_bytes)
            result = run_client(
                client_command(system, str(store), trace, args, slots, warm), own, client_group
            )
        else:
            daemon_group = Cgroup(f"{tag}-daemon", args.cgroups)
            try:
                workdir = Path(f"/tmp/{tag}")
                workdir.mkdir(parents=True, exist_ok=True)
                (workdir / "expertd.toml").write_text(toml)
                bounded = daemon_group.available
                wrapper = ["sh", "-c", f'echo $$ > {daemon_group.path}/cgroup.procs; exec "$@"', "sh"]
                daemon_group.limit(budget + DAEMON_SLACK)
                daemon_flags = ["--config", str(workdir / "expertd.toml"), "--host-size", f"{slots} slots"]
                daemon_flags += ["--device", "off", "--log-level", "warning", *flags]
                with PrivateDaemon(store, workdir, daemon_flags, launcher=wrapper if bounded else None) as d:
                    d.connect(name="bench-ready").close()
                    command = client_command(system, d.address, trace, args, slots, warm)
                    before = read_bytes(d.proc.pid)
                    result = run_client(command, 0, client_group)
                    result["read_bytes"] = read_bytes(d.proc.pid) - before  # its reader threads'
                result["daemon_peak_bytes"] = daemon_group.peak()
            finally:
                daemon_group.remove()
    finally:
        client_group.remove()
    result["load_average"] = [load_before, load_average()]
    return result


def ensure_store(args, trace_name: str, codec: str) -> Path:
    from expertd.daemon.store.pack import pack_synthetic

    scale = args.mixtral_scale if trace_name == "mixtral" else args.scale
    preset = PRESETS[trace_name]
    store = args.dir / f"{preset}-x{scale:g}-{codec}"
    if not (store / "manifest.json").exists():
        print(f"packing {preset} / {scale:g} ({codec}) into {store} (once)", file=sys.stderr)
        pack_synthetic(store, preset, scale=scale, codec=codec, force=True)
    return store


def read_bytes(pid: int) -> int:
    """Bytes process ``pid`` has had read from storage (``/proc/PID/io``; O_DIRECT reads included)."""
    text = Path(f"/proc/{pid}/io").read_text()
    return int(text.split("read_bytes:")[1].split()[0])


def log_run(args, obj: dict) -> None:
    """Append one run to ``--runs-log`` (JSON lines) as it ends: an interrupted matrix keeps its runs."""
    if args.runs_log is not None:
        with open(args.runs_log, "a") as f:
            f.write(json.dumps(obj) + "\n")


def read_runs(paths: list[Path]) -> tuple[list[dict], dict]:
    """Runs and reference runs from earlier stdout files (last line JSON) or ``--runs-log`` files."""
    rows: list[dict] = []
    reference: dict = {}
    for path in paths:
        tag = path.stem  # runs logged before tags were: one invocation per file
        for line in path.read_text().splitlines():
            if not line.startswith("{"):
                continue
            obj = json.loads(line)
            if obj.get("bench") == "live_vs_mmap":
                rows += [{"tag": tag, **r} for r in obj["runs"]]
                reference.update({f"{tag}:{k}": {"tokens_per_s": v} for k, v in obj["reference"].items()})
            elif "reference_key" in obj:
                reference[f"{obj.get('tag', tag)}:{obj['reference_key']}"] = {
                    "tokens_per_s": obj["tokens_per_s"]
                }
            elif "system" in obj:
                rows.append({"tag": tag, **obj})
    return rows, reference


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_matrix(args) -> tuple[list[dict], dict]:
    """Every (readahead, trace, budget, system, repetition): the rows, and the reference runs."""
    from expertd.daemon.cli.replay_cli import load_for_replay
    from expertd.daemon.store.manifest import load_manifest

    rows: list[dict] = []
    reference: dict = {}
    tag = f"expertd-bench-{os.getpid()}"
    readahead = Readahead(args.dir, enabled=args.readahead_change)
    print(f"store disk readahead: {readahead.describe()}", file=sys.stderr)
    try:
        for ra in args.readahead:
            ra_kb = readahead.apply(ra)
            for trace_name in args.traces:
                trace = load_for_replay(trace_name, "all", args.max_tokens)
                num_keys = trace.meta.num_layers * trace.meta.num_experts
                args.num_keys[trace_name] = num_keys
                for system in args.systems:
                    codec = SYSTEMS[system][3]
                    store = ensure_store(args, trace_name, codec)
                    slot_bytes = load_manifest(store).slot_bytes
                    if SYSTEMS[system][0] == "llama":
                        from llama_peer import ensure_gguf

                        store = ensure_gguf(store, trace_name, args.max_tokens)
                    ref_key = f"{trace_name}/{system}"  # all in RAM: readahead plays no part
                    if args.reference and ref_key not in reference:
                        res = one_run(system, store, trace_name, args, num_keys, slot_bytes, True, tag)
                        reference[ref_key] = res
                        log_run(
                            args,
                            {"reference_key": ref_key, "tokens_per_s": res["tokens_per_s"], "tag": args.tag},
                        )
                        print(f"[{ref_key}] all in RAM: {res['tokens_per_s']:.2f} tokens/s", file=sys.stderr)
                    for budget in args.budgets:
                        slots = max(trace.meta.top_k, int(budget * num_keys))
                        for rep in range(args.repeats):
                            res = one_run(system, store, trace_name, args, slots, slot_bytes, False, tag)
                            res.update(
                                readahead=ra,
                                readahead_kb=ra_kb,
                                trace=trace_name,
                                system=system,
                                tag=args.tag,
                            )
                            res.update(budget=budget, slots=slots, rep=rep, budget_bytes=slots * slot_bytes)
                            rows.append(res)
                            log_run(args, res)
                            print(
                                f"[ra {ra_kb} KiB] {trace_name} {budget:.0%} {system:18s} rep {rep}: "
                                f"steady {res['steady_tokens_per_s']:7.2f}  "
                                f"cold {res['cold_tokens_per_s']:7.2f} tokens/s  "
                                f"(load {res['load_average'][0]:.2f})",
                                file=sys.stderr,
                            )
    finally:
        readahead.restore()
        print(f"readahead restored: {readahead.describe()}", file=sys.stderr)
    return rows, reference


def aggregate(rows: list[dict], reference: dict) -> list[dict]:
    """Median and range per (readahead, trace, budget, system), with slowdowns vs all-in-RAM."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r.get("tag", ""), r["readahead"], r["trace"], r["budget"], r["system"])
        groups.setdefault(key, []).append(r)
    table = []
    for (tag, ra, trace, budget, system), rs in groups.items():
        ref = reference.get(f"{tag}:{trace}/{system}") or reference.get(f"{trace}/{system}")
        entry = {
            "tag": tag,  # one invocation: ratios are taken within it
            "readahead": ra,
            "readahead_kb": rs[0]["readahead_kb"],
            "trace": trace,
            "budget": budget,
            "system": system,
            "steady": summarize([r["steady_tokens_per_s"] for r in rs]),
            "cold": summarize([r["cold_tokens_per_s"] for r in rs]),
            "ram_tokens_per_s": ref["tokens_per_s"] if ref else None,
        }
        if ref:
            entry["slowdown"] = ref["tokens_per_s"] / entry["steady"]["median"]
        read = [r["read_bytes"] / r["tokens"] for r in rs if "read_bytes" in r]
        if read:
            entry["read_mb_per_token"] = statistics.median(read) / 1e6
        hits = [r["daemon_host"]["hit_rate"] for r in rs if r.get("daemon_host")]
        if hits:
            entry["hit_rate"] = statistics.median(hits)
        prefetch = [r["prefetch"] for r in rs if r.get("prefetch")]
        if prefetch:
            entry["prefetch_precision"] = statistics.median(p.get("precision", 0.0) for p in prefetch)
            entry["prefetch_recall"] = statistics.median(p.get("recall", 0.0) for p in prefetch)
        table.append(entry)
    return table


# live system -> the replay row that models it (`cpu-nvme`: the host tier serves from disk)
SIM_ROWS = {
    "expertd": "default",
    "expertd-evict": "default",
    "expertd-lru": "lru",
    "pread": "lru",
    "advised": "advised-mmap",
    "llama.cpp": "llama.cpp",
}


def simulate(args, table: list[dict], reference: dict) -> None:
    """Timed replay (`cpu-nvme`, this disk's bandwidth, the measured compute) beside each live row."""
    from expertd.daemon.cli.replay_cli import load_for_replay
    from expertd.daemon.store.manifest import load_manifest
    from expertd.traces.replay import sweep
    from expertd.traces.timing import build_timing

    for trace_name in args.traces:
        trace = load_for_replay(trace_name, "all", args.max_tokens)
        meta = trace.meta
        ref = next((v for k, v in reference.items() if k.endswith(f"{trace_name}/advised")), None)
        if ref is None:
            continue  # compute time per layer comes from a baseline's all-in-RAM run
        layer_ms = 1e3 / ref["tokens_per_s"] / meta.num_layers
        slot_bytes = load_manifest(ensure_store(args, trace_name, "none")).slot_bytes
        timing = build_timing(
            model=meta.model, num_layers=meta.num_layers, profile="cpu-nvme", expert_mb=slot_bytes / 1e6,
            nvme_gbps=args.sim_nvme_gbps, layer_ms=layer_ms,
        )  # fmt: skip
        num_keys = meta.num_layers * meta.num_experts
        for budget in args.budgets:
            slots = max(meta.top_k, int(budget * num_keys))
            rows = sweep(trace, list(SIM_ROWS.values()), [slots], timing=timing)
            simulated = {row.policy: row.tokens_per_s for row in rows}
            for t in table:
                if (t["trace"], t["budget"]) == (trace_name, budget) and t["system"] in SIM_ROWS:
                    t["simulated_tokens_per_s"] = simulated[SIM_ROWS[t["system"]]]
                    t["simulated_layer_ms"] = layer_ms


def goals(table: list[dict]) -> list[dict]:
    """Each expertd variant / advised (steady medians, one invocation), its slowdown / llama.cpp's."""
    by = {(t["tag"], t["readahead"], t["trace"], t["budget"], t["system"]): t for t in table}
    out = []
    for (tag, ra, trace, budget, system), t in by.items():
        if not system.startswith("expertd"):
            continue
        row = {"tag": tag, "readahead": ra, "trace": trace, "budget": budget, "system": system}
        advised = by.get((tag, ra, trace, budget, "advised"))
        if advised:
            row["vs_advised"] = t["steady"]["median"] / advised["steady"]["median"]
        peer = by.get((tag, ra, trace, budget, "llama.cpp"))
        if peer and "slowdown" in peer and "slowdown" in t:
            row["slowdown_vs_llama"] = t["slowdown"] / peer["slowdown"]
        if len(row) > 5:  # a baseline to compare with ran in the same invocation
            out.append(row)
    return out


def plot(table: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = sorted({(t["trace"], t["readahead_kb"]) for t in table})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    systems = sorted({t["system"] for t in table})
    colour = {
        name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(systems)
    }  # the same in every panel
    for ax, (trace, ra_kb) in zip(axes[0], panels, strict=True):
        for system in systems:
            by_budget: dict[float, dict] = {}  # one point per budget: the first invocation's
            for t in table:
                if (t["trace"], t["readahead_kb"], t["system"]) == (trace, ra_kb, system):
                    by_budget.setdefault(t["budget"], t["steady"])
            pts = sorted(by_budget.items())
            if not pts:
                continue
            xs = [100 * b for b, _ in pts]
            ys = [s["median"] for _, s in pts]
            err = [[s["median"] - s["min"] for _, s in pts], [s["max"] - s["median"] for _, s in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=system, color=colour[system])
        ax.set_title(f"{trace}, readahead {ra_kb} KiB")
        ax.set_xlabel("RAM budget, % of experts")
        ax.set_ylabel("tokens/s (steady, median)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return str(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", default="granite,mixtral")
    parser.add_argument("--systems", default="expertd,advised,mmap,pread,llama.cpp")
    parser.add_argument("--budgets", default="0.25,0.5,0.75", help="RAM for experts, fractions of all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--readahead", default="machine,128", help="'machine' and/or KiB values")
    parser.add_argument("--max-tokens", type=int, default=60)
    parser.add_argument(
        "--cold-tokens", type=int, default=10, help="the first tokens, reported as cold start"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="Granite's expert shapes divided by")
    parser.add_argument("--mixtral-scale", type=float, default=8.0, help="Mixtral's expert shapes divided by")
    parser.add_argument("--sim-nvme-gbps", type=float, default=0.95, help="disk GB/s, timed replay rows")
    parser.add_argument(
        "--no-reference", dest="reference", action="store_false", help="skip the all-in-RAM runs"
    )
    parser.add_argument("--dir", type=Path, default=REPO / "out" / "bench-live", help="store location")
    parser.add_argument("--plot", type=Path, default=REPO / "out" / "bench-live" / "live_vs_mmap.png")
    parser.add_argument("--cleanup", action="store_true", help="delete the stores afterwards")
    parser.add_argument("--merge", type=Path, nargs="+", help="report earlier runs' stdout files as one")
    parser.add_argument("--runs-log", type=Path, help="append each run to this JSON-lines file as it ends")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny, one repetition, no limits")
    args = parser.parse_args(argv)
    args.traces = [t for t in args.traces.split(",") if t]
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in args.systems if s not in SYSTEMS] + [t for t in args.traces if t not in PRESETS]
    if unknown:
        parser.error(f"unknown system or trace: {', '.join(unknown)} (systems: {', '.join(SYSTEMS)})")
    args.budgets = [float(b) for b in args.budgets.split(",")]
    if any(not 0 < b <= 1 for b in args.budgets):
        parser.error(f"budgets must be in (0, 1], got {args.budgets}")
    args.readahead = [r.strip() for r in args.readahead.split(",") if r.strip()]
    args.num_keys = {}
    args.tag = f"run-{os.getpid()}"
    is_root = os.geteuid() == 0
    args.cgroups = is_root and not args.quick
    args.readahead_change = is_root and not args.quick
    if args.quick:
        args.traces, args.budgets, args.repeats, args.readahead = ["granite"], [0.5], 1, ["machine"]
        args.max_tokens, args.cold_tokens, args.scale = 4, 1, 8.0
        args.dir = args.dir.parent / "bench-live-quick"
    if not args.readahead_change:
        args.readahead = ["machine"]
    if "llama.cpp" in args.systems:
        from llama_peer import available

        reason = available()
        if reason:
            print(f"llama.cpp skipped: {reason}", file=sys.stderr)
            args.systems.remove("llama.cpp")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    if args.merge:  # the runs of earlier invocations (their stdout files), reported as one
        rows, reference = read_runs(args.merge)
        args.traces = sorted({r["trace"] for r in rows})
        args.budgets = sorted({r["budget"] for r in rows})
        args.systems = sorted({r["system"] for r in rows})
        args.max_tokens = max(r["tokens"] for r in rows)  # the simulated rows replay what ran
    else:
        rows, reference = run_matrix(args)
    table = aggregate(rows, reference)
    simulate(args, table, reference)
    checks = goals(table)
    plotted = plot(table, args.plot) if not args.quick else None
    print(f"load average at the end: {load_average():.2f} (shared machine: figures are loaded)")
    head = f"{'ra KiB':>6} {'trace':8} {'budget':>6} {'system':20} {'steady tok/s (range)':>24}"
    print(f"{head} {'cold':>7} {'slowdown':>8} {'simulated':>9} {'MB/token':>8} {'hit rate':>8} invocation")
    for t in sorted(table, key=lambda t: (t["tag"], t["readahead_kb"], t["trace"], t["budget"], t["system"])):
        s = t["steady"]
        slow = f"{t['slowdown']:.2f}" if "slowdown" in t else "-"
        sim = f"{t['simulated_tokens_per_s']:.2f}" if "simulated_tokens_per_s" in t else "-"
        print(
            f"{t['readahead_kb']:>6} {t['trace']:8} {t['budget']:>6.0%} {t['system']:20} "
            f"{s['median']:8.2f} ({s['min']:.2f}-{s['max']:.2f})".ljust(78)
            + f" {t['cold']['median']:7.2f} {slow:>8} {sim:>9}"
            + f" {t.get('read_mb_per_token', float('nan')):8.1f}"
            + f" {t.get('hit_rate', float('nan')):8.3f} {t['tag']}"
        )
    for c in checks:
        print(
            f"goal [{c['tag']}: {c['trace']}, ra {c['readahead']}, {c['budget']:.0%}]: "
            f"{c['system']} / advised "
            f"{c.get('vs_advised', float('nan')):.2f} (goal >= 1.5); slowdown vs llama.cpp "
            f"{c.get('slowdown_vs_llama', float('nan')):.2f} (goal <= 0.67)"
        )
    if args.cleanup:
        import shutil

        shutil.rmtree(args.dir, ignore_errors=True)
    summary = {
        "bench": "live_vs_mmap",
        "traces": args.traces,
        "systems": args.systems,
        "bounded_by_cgroup": args.cgroups,
        "readahead_changed": args.readahead_change,
        "seconds": time.time() - started,
        "plot": plotted,
        "goals": checks,
        "table": table,
        "reference": {k: v["tokens_per_s"] for k, v in reference.items()},
        "runs": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
