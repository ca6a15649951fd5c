"""`expertd replay`: sweep policies x capacities over a trace, print the table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from expertd.daemon.cli.main import CliError
from expertd.traces.timing import DEFAULT_PROFILE, MODEL_SIZES, PROFILES

DEFAULT_CAPACITIES = "0.05,0.1,0.25,0.5"


def register(subparsers) -> None:
    profiles = "\n".join(f"  {p.describe()}" for p in PROFILES.values())
    sizes = "\n".join(
        f"  {name}: {s.expert_bytes / 1e6:.1f} MB/expert ({s.note})" for name, s in MODEL_SIZES.items()
    )
    parser = subparsers.add_parser(
        "replay",
        help="replay a routing trace through eviction policies",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Replay TRACE (an .etrace file, or the name of a shipped trace) through each policy\n"
            "at each capacity and print hit rates beside Belady's MIN, the best any cache can do.\n"
            "--timed drives the daemon's cache manager with a virtual clock and reports stalls,\n"
            "time per token and bytes moved, against the bound\n"
            "max(compute, Belady's loads / link bandwidth).\n\n"
            f"hardware profiles (--profile):\n{profiles}\n\nknown model sizes:\n{sizes}"
        ),
    )
    parser.add_argument(
        "trace",
        metavar="TRACE",
        help="trace file, a shipped trace's name, or llama4 / mixtral (from ../shared)",
    )
    parser.add_argument(
        "--policy",
        default=None,
        help="comma-separated policies (default: all registered); `default` is what "
        "`expertd serve` runs without flags: its device policy, predictor and prefetch settings",
    )
    parser.add_argument(
        "--capacity",
        default=DEFAULT_CAPACITIES,
        help="comma-separated capacities: fractions of all experts (0.1) or slot counts (300)",
    )
    parser.add_argument("--phase", choices=("all", "prefill", "decode"), default="all", help="rows to replay")
    parser.add_argument("--max-tokens", type=int, default=None, help="replay only the first N tokens")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the rows as JSON")
    parser.add_argument(
        "--plot", type=Path, default=None, metavar="OUT.png", help="plot hit rate vs capacity"
    )
    timed = parser.add_argument_group("timed mode")
    timed.add_argument("--timed", action="store_true", help="simulate time: stalls, tokens/s, bytes moved")
    live = parser.add_argument_group("live mode")
    live.add_argument(
        "--live",
        action="store_true",
        help="measure instead: a real daemon and client on synthetic weights of the trace's model shapes",
    )
    live.add_argument("--live-scale", type=float, default=4.0, help="divide the expert dims by this")
    live.add_argument(
        "--live-device", default="cpu", choices=("cpu", "cuda"),
        help="the daemon's device tier: cpu (a stand-in slab) or cuda (the GPU); default: %(default)s",
    )  # fmt: skip
    timed.add_argument(
        "--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES), help="hardware profile"
    )
    timed.add_argument("--expert-mb", type=float, default=None, help="bytes of one expert, in MB")
    timed.add_argument("--h2d-gbps", type=float, default=None, help="host->device bandwidth, GB/s")
    timed.add_argument("--nvme-gbps", type=float, default=None, help="store->host bandwidth, GB/s")
    timed.add_argument("--layer-ms", type=float, default=None, help="compute time of one layer, ms")
    timed.add_argument(
        "--host-gbps", type=float, default=None, help="a batch-1 expert pass on the host CPU, GB/s"
    )
    timed.add_argument("--acquire-us", type=float, default=None, help="one acquire's round trip, us")
    timed.add_argument(
        "--acquire-hit-us",
        type=float,
        default=None,
        help="the round trip of an acquire whose experts are all on the device, us (default: --acquire-us)",
    )
    timed.add_argument(
        "--predictor",
        default=None,
        help="prefetch with this predictor (default: none; `--policy default` brings its own)",
    )
    timed.add_argument("--prefetch-depth", type=int, default=2, help="layers ahead to prefetch")
    timed.add_argument("--prefetch-min-prob", type=float, default=0.2, help="skip guesses below this")
    timed.add_argument("--prefetch-budget", type=int, default=8, help="new prefetches per acquire at most")
    timed.add_argument("--prefetch-width", type=int, default=4, help="prefetches per layer at most")
    timed.add_argument(
        "--prefetch-share",
        type=float,
        default=1.0,
        help="most of a link's transfers prefetches may take (over any 32 in a row)",
    )
    timed.add_argument(
        "--save-state",
        type=Path,
        default=None,
        metavar="OUT",
        help="write the statistics the predictor (--predictor, else the default's) learns from the trace",
    )
    timed.add_argument(
        "--load-state",
        type=Path,
        default=None,
        metavar="FILE",
        help="start every run's predictor from these statistics (a warm start; see --save-state)",
    )
    timed.add_argument(
        "--tenants",
        default=None,
        metavar="NAME[:MODE[:SHARE]],...",
        help="deal the trace's requests to these tenants in turn, one client each, isolated as "
        "[tenants] in the daemon's config (MODE shared, partitioned or private; e.g. "
        "a,b:partitioned:0.5,c:private:0.25); the rows then count each tenant's hits",
    )
    timed.add_argument(
        "--host-capacity",
        default=None,
        help="host tier size (fraction or slots); default: RAM holds every expert, warm",
    )
    parser.set_defaults(func=run)


def resolve_trace(name: str) -> Path:
    """A trace path, or the path of the shipped trace called ``name`` (a unique prefix will do)."""
    path = Path(name)
    if path.exists():
        return path
    from expertd import traces
    from expertd.traces import corpus

    if name in corpus.NAMES:  # granite, llama4, mixtral: converted from ../shared on first use
        try:
            return corpus.path_of(name)
        except corpus.TraceUnavailable as exc:
            raise CliError(str(exc)) from None
    matches = [n for n in traces.list_shipped() if n == name or n.startswith(name)]
    if len(matches) != 1:
        shipped = ", ".join(traces.list_shipped()) or "none"
        raise CliError(f"{name}: no such file, and no shipped trace of that name (shipped: {shipped})")
    return traces.shipped(matches[0])


def load_for_replay(name: str, phase: str = "all", max_tokens: int | None = None):
    """Read and select the rows to replay; trace errors become one-line CLI errors."""
    from expertd.traces.format import read_trace
    from expertd.traces.replay import forward_ids
    from expertd.traces.trace import PHASE_DECODE, PHASE_PREFILL, TraceFormatError

    try:
        trace = read_trace(resolve_trace(name))
    except TraceFormatError as exc:
        raise CliError(str(exc)) from None
    if phase != "all":
        if trace.phase is None:
            raise CliError(f"{name}: this trace records no phase; use --phase all")
        trace = trace.select(trace.phase == (PHASE_DECODE if phase == "decode" else PHASE_PREFILL))
    if max_tokens is not None:
        if max_tokens < 1:
            raise CliError(f"--max-tokens must be at least 1, got {max_tokens}")
        trace = trace.select(forward_ids(trace) < max_tokens)
    if len(trace) == 0:
        raise CliError(f"{name}: no rows left to replay")
    return trace


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from expertd.policies.base import Geometry, PolicyError
    from expertd.policies.registry import available
    from expertd.traces.replay import ReplayError, parse_capacity, parse_tenants, sweep
    from expertd.traces.timing import build_timing

    trace = load_for_replay(args.trace, args.phase, args.max_tokens)
    if args.live:
        return run_live(args, trace)
    meta = trace.meta
    num_keys = meta.num_layers * meta.num_experts
    policies = [p.strip() for p in args.policy.split(",") if p.strip()] if args.policy else available()
    try:
        capacities = [parse_capacity(c, num_keys)[0] for c in args.capacity.split(",") if c.strip()]
        timing = None
        if args.timed:
            host_slots = None
            if args.host_capacity is not None:
                host_slots = parse_capacity(args.host_capacity, num_keys)[0]
            timing = build_timing(
                model=meta.model,
                num_layers=meta.num_layers,
                profile=args.profile,
                expert_mb=args.expert_mb,
                h2d_gbps=args.h2d_gbps,
                nvme_gbps=args.nvme_gbps,
                layer_ms=args.layer_ms,
                host_slots=host_slots,
                recorded_expert_bytes=_int_or_none(meta.extra.get("expert_bytes")),
                top_k=meta.top_k,
                host_gbps=args.host_gbps,
                acquire_us=args.acquire_us,
                acquire_hit_us=args.acquire_hit_us,
            )
        prefetch = None
        geometry = Geometry(meta.num_layers, meta.num_experts)
        if args.predictor:
            from expertd.daemon.core.prefetch import PrefetchConfig

            prefetch = PrefetchConfig.from_settings(args, predictor=args.predictor)
            if not args.timed:
                raise CliError("--predictor needs --timed (prefetching is a matter of time)")
        tenants = None
        if args.tenants is not None:
            if not args.timed:
                raise CliError("--tenants needs --timed (isolation is a matter of time)")
            tenants = parse_tenants(args.tenants)
        predictor_state = None
        if args.load_state is not None:
            from expertd.daemon.core.prefetch_state import StateError, read_state

            if not args.timed:
                raise CliError("--load-state needs --timed (only timed runs predict)")
            try:
                predictor_state = read_state(args.load_state, meta.model)
            except StateError as exc:
                raise CliError(str(exc)) from None
        bar = tqdm(
            total=len(policies) * len(capacities),
            desc="replay",
            unit="run",
            file=sys.stderr,
            leave=False,
        )
        rows = sweep(
            trace,
            policies,
            capacities,
            timing=timing,
            prefetch=prefetch,
            progress=lambda _: bar.update(),
            predictor_state=predictor_state,
            tenants=tenants,
        )
        bar.close()
        if args.save_state is not None:
            save_state(trace, args.predictor, geometry, args.save_state)
    except (ReplayError, PolicyError, ValueError) as exc:
        raise CliError(str(exc)) from None
    print(describe_trace(trace))
    print(format_table(rows, timed=timing is not None))
    if tenants:
        print(format_tenants(rows))
    if args.json:
        args.json.write_text(json.dumps([dict(row.as_dict(), trace=meta.model) for row in rows], indent=1))
    if args.plot:
        plot_rows(rows, args.plot, title=meta.model, timed=timing is not None)
    return 0


def save_state(trace, predictor: str | None, geometry, out: Path) -> None:
    """Learn ``predictor``'s statistics (the default's if None) from ``trace`` and write them to ``out``."""
    from expertd.daemon.core import defaults
    from expertd.daemon.core.prefetch_state import learn_state, write_state

    spec = predictor or defaults.PREFETCH["predictor"]
    assert spec is not None
    rows = zip(trace.request.tolist(), trace.layer.tolist(), trace.experts.tolist(), strict=True)
    write_state(out, learn_state(spec, geometry, rows), trace.meta.model)
    print(f"predictor {spec}: statistics of {trace.num_tokens():,} tokens written to {out}", file=sys.stderr)


def describe_trace(trace) -> str:
    meta = trace.meta
    tokens = trace.num_tokens()
    return (
        f"{meta.model}: {len(meta.requests)} requests, {tokens:,} tokens, "
        f"{meta.num_layers} layers x {meta.num_experts} experts, top-{meta.top_k} "
        f"({len(trace) * meta.top_k:,} accesses)"
    )


def format_table(rows, *, timed: bool) -> str:
    header = f"{'capacity':>8} {'slots':>6}  {'policy':<16} {'hit rate':>8} {'Belady':>7} {'gap':>7}"
    if timed:
        header += f" {'stall ms/tok':>12} {'ms/tok':>9} {'tok/s':>8} {'GB moved':>9}"
        header += f" {'bound ms':>9} {'ratio':>6}"
    hybrid = timed and any(row.host_computed is not None for row in rows)
    if hybrid:
        header += f" {'on host':>9} {'copied':>8}"
    header += f" {'seconds':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        if row.error:
            lines.append(f"{row.capacity:>8.1%} {row.slots:>6}  {row.policy:<16} n/a: {row.error}")
            continue
        line = (
            f"{row.capacity:>8.1%} {row.slots:>6}  {row.policy:<16} {row.hit_rate:>8.3f} "
            f"{row.bound_hit_rate:>7.3f} {row.hit_rate - row.bound_hit_rate:>+7.3f}"
        )
        if timed:
            line += (
                f" {row.stall_s_per_token * 1e3:>12.2f} {row.time_s_per_token * 1e3:>9.2f}"
                f" {row.tokens_per_s:>8.2f} {row.bytes_moved / 1e9:>9.2f}"
                f" {row.bound_s_per_token * 1e3:>9.2f} {row.bound_ratio:>6.2f}"
            )
        if hybrid:
            on_host, copied = row.host_computed, row.copied
            line += f" {'-' if on_host is None else on_host:>9} {'-' if copied is None else copied:>8}"
        line += f" {row.seconds:>8.2f}"
        if row.prefetch:
            p = row.prefetch
            line += (
                f"  [{p['predictor']}: precision {p['precision']:.2f} recall {p['recall']:.2f},"
                f" prefetches used {p['prefetches_used']} wasted {p['prefetches_wasted']}]"
            )
        lines.append(line)
    return "\n".join(lines)


def format_tenants(rows) -> str:
    """Each tenant's hit rate per row (replay --tenants)."""
    lines = []
    for row in rows:
        if row.tenants:
            parts = [
                f"{name} {c['hits']}/{c['accesses']} ({c['hit_rate']:.3f})" for name, c in row.tenants.items()
            ]
            lines.append(f"{row.capacity:>8.1%} {row.policy:<16} tenants: " + ", ".join(parts))
    return "\n".join(lines)


def plot_rows(rows, out: Path, *, title: str, timed: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install 'expertd[plot]'") from None
    panels = 2 if timed else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    by_policy: dict[str, list] = {}
    for row in rows:
        if not row.error:
            by_policy.setdefault(row.policy, []).append(row)
    for policy, series in sorted(by_policy.items()):
        xs = [r.capacity for r in series]
        style = "--" if policy == "belady" else "-"
        axes[0][0].plot(xs, [r.hit_rate for r in series], style, marker="o", label=policy)
        if timed:
            axes[0][1].plot(xs, [r.time_s_per_token * 1e3 for r in series], style, marker="o", label=policy)
    axes[0][0].set(xlabel="capacity (fraction of experts)", ylabel="hit rate", title=title)
    if timed:
        bound = sorted({(r.capacity, r.bound_s_per_token * 1e3) for r in rows})
        axes[0][1].plot([b[0] for b in bound], [b[1] for b in bound], "k:", label="bound")
        axes[0][1].set(xlabel="capacity (fraction of experts)", ylabel="ms per token", yscale="log")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def run_live(args: argparse.Namespace, trace) -> int:
    """`replay --live`: a real daemon per policy and capacity; measured stalls and tokens/s."""
    from expertd.daemon.core.defaults import DEFAULT_NAME
    from expertd.daemon.core.prefetch import PrefetchConfig
    from expertd.policies.base import PolicyError
    from expertd.policies.registry import available
    from expertd.traces.live import live_sweep
    from expertd.traces.replay import ReplayError, parse_capacity

    meta = trace.meta
    num_keys = meta.num_layers * meta.num_experts
    policies = [p.strip() for p in args.policy.split(",") if p.strip()] if args.policy else ["lru"]
    config = ""
    try:
        if args.predictor:  # the same settings as --timed replays with
            config = prefetch_toml(PrefetchConfig.from_settings(args, predictor=args.predictor))
        capacities = [parse_capacity(c, num_keys)[0] for c in args.capacity.split(",") if c.strip()]
        unknown = [p for p in policies if p.split("(")[0] not in available() and p != DEFAULT_NAME]
        if config and DEFAULT_NAME in policies:
            raise PolicyError(f"`--policy {DEFAULT_NAME}` brings its own prefetch settings; drop --predictor")
        if unknown:
            raise PolicyError(f"unknown policy {unknown[0]!r} (known: {', '.join(available())})")
        rows = live_sweep(
            trace, policies, capacities, scale=args.live_scale, config=config, device=args.live_device
        )
    except (ReplayError, PolicyError, ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    print(describe_trace(trace))
    print(
        f"live: a real daemon each, device tier on {args.live_device}; "
        f"synthetic experts of the model's shapes / {args.live_scale:g}"
    )
    header = f"{'capacity':>8} {'slots':>6}  {'policy':<16} {'hit rate':>8} {'stall ms/tok':>12} {'tok/s':>8}"
    print(header + f" {'GB moved':>9}")
    print("-" * (len(header) + 10))
    for row in rows:
        print(
            f"{row['capacity']:>8.1%} {row['slots']:>6}  {row['policy']:<16} {row['hit_rate']:>8.3f} "
            f"{row['stall_s_per_token'] * 1e3:>12.2f} {row['tokens_per_s']:>8.2f}"
            f" {row['bytes_moved'] / 1e9:>9.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps([dict(row, trace=meta.model) for row in rows], indent=1))
    return 0


def prefetch_toml(prefetch) -> str:
    """The ``[prefetch]`` table of a daemon config that prefetches as ``prefetch`` says."""
    keys = ("predictor", "depth", "min_prob", "budget", "width", "share", "window")
    return "[prefetch]\n" + "".join(f"{key} = {getattr(prefetch, key)!r}\n" for key in keys)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
