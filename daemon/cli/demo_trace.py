"""`expertd demo --trace NAME`: the daemon driven by a shipped real routing trace (no model).

Packs a synthetic store with the shapes of the trace's model, starts a real daemon on a
private ipc:// socket with a device tier far smaller than the model, drives the MoE
client through the shipped trace's routing (every token's layers in order: acquire the
routed experts, run their SwiGLU FFNs on a hidden state, release), prints tokens/s, hit
rates and stall time, checks that the simulator predicted the daemon's device hit rate,
and stops the daemon cleanly.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from expertd.daemon.cli.main import CliError


def _say(text: str) -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    from expertd.daemon.cli.demo import demo_session
    from expertd.daemon.cli.replay_cli import load_for_replay
    from expertd.daemon.store.pack import pack_synthetic
    from expertd.traces.live import ClientSource, PrivateDaemon, drive, preset_for
    from expertd.traces.replay import replay_timed
    from expertd.traces.timing import TimingModel

    trace = load_for_replay(args.trace, "all", args.max_tokens)
    meta = trace.meta
    try:
        preset = preset_for(meta)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    num_keys = meta.num_layers * meta.num_experts
    device_slots = max(meta.top_k, round(args.capacity * num_keys))

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="expertd-demo-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "store"
    _say(f"1. packing a synthetic {preset} store (expert dims / {args.scale:g}) into {store}")
    manifest = pack_synthetic(store, preset, scale=args.scale, force=True)
    model_mib = manifest.raw_bytes * num_keys / 2**20
    _say(
        f"   {meta.num_layers} layers x {meta.num_experts} experts of {manifest.raw_bytes / 2**20:.2f} MiB "
        f"= {model_mib:.0f} MiB of experts"
    )
    _say(
        f"2. starting expertd: host tier holds every expert, device tier (CPU stand-in) {device_slots} "
        f"slots = {device_slots / num_keys:.0%} of the experts, policy {args.policy}"
    )
    # One store read at a time, as the timing model has it: with several, a token's misses
    # reach the device tier in whichever order the reads finish, and the comparison with the
    # simulator below would be only approximate.
    flags = [
        "--host-size", f"{num_keys} slots", "--device", "cpu", "--device-size", f"{device_slots} slots",
        "--device-policy", args.policy, "--load-threads", "1",
        "--predictor", "none",  # demand loads only: prefetches land on the daemon's clock, not replay's
    ]  # fmt: skip
    daemon = PrivateDaemon(store, workdir, flags)
    with demo_session(daemon) as client:
        run = drive(trace, ClientSource(client), progress=True)
        status = client.stats()
    # The simulator drives the daemon's own cache manager: one client, the same acquires.
    timing = TimingModel(expert_bytes=manifest.raw_bytes, h2d_gbps=10.0, nvme_gbps=1.0, layer_s=0.0)
    predicted = replay_timed(trace, args.policy, device_slots, timing)
    _report(meta, run, status, predicted)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _report(meta, run, status: dict, predicted) -> None:
    device, host = status["tiers"]["device"], status["tiers"]["host"]
    acquires = status["acquires"]
    tokens, elapsed = run.tokens, run.seconds
    _say(f"3. drove the MoE client through {meta.model}'s real routing: {tokens} tokens, {run.rows} layers")
    _say(f"   tokens/s              {tokens / elapsed:8.1f}   ({elapsed:.2f} s)")
    _say(
        f"   device hit rate       {device['hit_rate']:8.3f}   ({device['hits']:,} of {device['accesses']:,})"
    )
    _say(f"   host hit rate         {host['hit_rate']:8.3f}   (of the device's misses)")
    _say(
        f"   stall                 {acquires['stall_s'] / tokens * 1e3:8.2f} ms/token in the daemon "
        f"({acquires['waited']:,} acquires waited for a copy)"
    )
    _say(f"   acquire round trips   {run.wait_s / tokens * 1e3:8.2f} ms/token at the client")
    _say(f"   bytes moved           {status['links']['h2d']['bytes'] / 2**30:8.2f} GiB host->device")
    agree = "agrees" if predicted.hits == device["hits"] else "DISAGREES"
    _say(
        f"4. `expertd replay` predicted a device hit rate of {predicted.hit_rate:.3f} for this trace, "
        f"policy and capacity: it {agree} with the daemon's {device['hit_rate']:.3f}"
    )
    _say("5. stopped the daemon cleanly (its shared memory is gone).")
    _say("")
    _say("Next: expertd demo                        # a real model architecture, generating through expertd")
    _say("      expertd replay granite --timed      # which policy stalls least, and by how much")
    _say("      expertd pack --from-safetensors CHECKPOINT_DIR STORE   # your own model's experts")
    _say("      expertd serve --store STORE --device cuda --device-size 20GiB   # see docs/config.md")
