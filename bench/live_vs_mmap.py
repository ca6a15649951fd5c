"""Live: tokens/s through expertd vs reading experts from an mmap of the store, same RAM budget.

    .venv/bin/python bench/live_vs_mmap.py [--trace granite] [--budget 0.5] [--max-tokens 120]

The baseline is llama.cpp's way: weights mmap'd, the OS page cache is the RAM tier. Both
runs drive the same real routing trace through the same SwiGLU compute (one token at a
time) over the same synthetic store (the trace model's real expert shapes, bf16, on the
real disk, bigger than the budget):

- expertd: a daemon whose host tier is ``budget`` x the experts' bytes (device tier off:
  the client computes from host slots), reading the store with O_DIRECT, with its
  default eviction policy and prefetcher;
- mmap: the client maps the store's data file; the page cache (dropped first) is bounded
  to the same budget.

RAM is bounded with cgroup v1 memory limits where the machine allows (each process's
own baseline memory is measured once it is idle and added to its limit); where it does
not, the output says so and the comparison is not meaningful. The last line of stdout
is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
DAEMON_SLACK = 192 << 20  # the daemon's own memory besides its host tier (Python, numpy, zmq)

CLIENT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from expertd.traces.live import ClientSource, MmapSource, drive
    from expertd.daemon.cli.replay_cli import load_for_replay
    mode, target, trace_name, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    trace = load_for_replay(trace_name, "all", max_tokens)
    if mode == "mmap":
        source = MmapSource(target)
        source.drop_page_cache()
    else:
        from expertd.client import ExpertClient
        client = ExpertClient(target, name="bench-live")
        source = ClientSource(client, "host")
    print("ready", flush=True)
    sys.stdin.readline()  # the parent has set this process's memory limit
    result = drive(trace, source)
    print(json.dumps(result.as_dict()), flush=True)
    """
)


class Cgroup:
    """A cgroup v1 memory group (None-safe: `available` False where it cannot be made)."""

    def __init__(self, name: str) -> None:
        self.path = CGROUP_ROOT / name
        try:
            self.path.mkdir(exist_ok=True)
            self.available = (self.path / "memory.limit_in_bytes").exists()
        except OSError:
            self.available = False

    def add(self, pid: int) -> None:
        if self.available:
            (self.path / "cgroup.procs").write_text(str(pid))

    def usage(self) -> int:
        return int((self.path / "memory.usage_in_bytes").read_text()) if self.available else 0

    def limit(self, nbytes: int) -> None:
        if self.available:
            (self.path / "memory.limit_in_bytes").write_text(str(nbytes))

    def peak(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text()) if self.available else 0

    def remove(self) -> None:
        if self.available:
            with contextlib.suppress(OSError):  # still busy: left for the next run to see
                self.path.rmdir()


def run_client(mode: str, target: str, args: argparse.Namespace, budget: int, group: Cgroup) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, mode, target, args.trace, str(args.max_tokens)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    group.add(proc.pid)
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"{mode} client failed to start: {line}")
    baseline = group.usage()
    group.limit(baseline + (budget if mode == "mmap" else 0) + (64 << 20))
    proc.stdin.write("go\n")
    proc.stdin.flush()
    result = json.loads(proc.stdout.readline())
    proc.wait(60)
    result["client_baseline_bytes"] = baseline
    result["client_peak_bytes"] = group.peak()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", default="granite")
    parser.add_argument("--budget", type=float, default=0.5, help="RAM for experts, fraction of all")
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--dir", type=Path, default=REPO / "out" / "bench-live", help="store location")
    args = parser.parse_args()

    from expertd.daemon.cli.replay_cli import load_for_replay
    from expertd.daemon.store.manifest import load_manifest
    from expertd.daemon.store.pack import pack_synthetic
    from expertd.traces.live import PrivateDaemon

    trace = load_for_replay(args.trace, "all", args.max_tokens)
    preset = {"granite": "granite-3.0-1b-a400m", "mixtral": "mixtral-8x7b"}.get(args.trace)
    if preset is None:
        raise SystemExit(f"no synthetic preset for trace {args.trace!r}")
    store = args.dir / preset
    if not (store / "manifest.json").exists():
        print(f"packing {preset} into {store} (once)", file=sys.stderr)
        pack_synthetic(store, preset, force=True, progress=True)
    manifest = load_manifest(store)
    num_keys = manifest.num_layers * manifest.num_experts
    slots = max(trace.meta.top_k, int(args.budget * num_keys))
    budget = slots * manifest.slot_bytes
    tag = f"expertd-bench-{os.getpid()}"
    daemon_group, client_group = Cgroup(f"{tag}-daemon"), Cgroup(f"{tag}-client")
    bounded = daemon_group.available and client_group.available
    results: dict = {}
    try:
        workdir = Path(f"/tmp/{tag}")
        wrapper = ["sh", "-c", f'echo $$ > {daemon_group.path}/cgroup.procs; exec "$@"', "sh"]
        daemon_group.limit(budget + DAEMON_SLACK)
        flags = ["--host-size", f"{slots} slots", "--device", "off", "--log-level", "warning"]
        daemon = PrivateDaemon(store, workdir, flags, launcher=wrapper if bounded else None)
        with daemon:
            results["expertd"] = run_client("expertd", daemon.address, args, budget, client_group)
            with daemon.connect(name="bench-stats") as client:
                results["expertd"]["daemon_stats"] = client.stats()["tiers"]["host"]
        results["expertd"]["daemon_peak_bytes"] = daemon_group.peak()
        mmap_group = Cgroup(f"{tag}-mmap")
        results["mmap"] = run_client("mmap", str(store), args, budget, mmap_group)
        mmap_group.remove()
    finally:
        daemon_group.remove()
        client_group.remove()
    ours, theirs = results["expertd"]["tokens_per_s"], results["mmap"]["tokens_per_s"]
    print(f"trace {trace.meta.model}, {results['expertd']['tokens']} tokens; store {store}")
    print(f"RAM budget for experts: {budget / 2**20:.0f} MiB = {slots} of {num_keys} experts")
    print(f"bounded by cgroup memory limits: {bounded}")
    print(f"expertd (O_DIRECT, host tier, default policy) {ours:8.2f} tokens/s")
    print(f"mmap + page cache                            {theirs:8.2f} tokens/s")
    print(f"ratio {ours / theirs:.2f}")
    summary = {
        "bench": "live_vs_mmap",
        "trace": args.trace,
        "budget_bytes": budget,
        "bounded_by_cgroup": bounded,
        "expertd_tokens_per_s": ours,
        "mmap_tokens_per_s": theirs,
        "ratio": ours / theirs,
        "runs": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
