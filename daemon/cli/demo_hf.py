"""`expertd demo`: a real MoE architecture generating through expertd, built and served here.

1. builds a small random-init transformers model of a real MoE class (Qwen3-MoE by default:
   its router, its experts implementation, realistic expert counts, small dimensions) and
   saves it with ``save_pretrained``; 2. packs its routed experts (``pack --from-hf``);
3. starts a real daemon whose device tier (a CPU stand-in) holds a quarter of the experts;
4. loads the model as a user would, ``offload``s it, generates greedily with the model's own
   router while recording the routing, checks the tokens against the unmodified model,
5. prints tokens/s, hit rates, stall time and what the recorded routing says about other
   policies, and how to do the same with a real checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from expertd.daemon.cli.main import EXIT_FAILED, CliError

# The default model: Qwen3-MoE's shape of routing (64 experts, top-8) over 12 layers, tiny dims.
# Weights are drawn wider than the usual init (std 0.02): at that scale a random network's hidden
# state, and so its routing, is nearly the same for every token, which no trained model does.
DEMO_ARGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "hidden_size": 128, "moe_intermediate_size": 64, "num_experts": 64, "num_experts_per_tok": 8,
        "head_dim": 32,
    },
}  # fmt: skip
INIT_STD = 0.3
DEMO_LAYERS = 12
SWEEP_POLICIES = ("lru", "lfu", "s3fifo", "layer-distance", "predictive", "belady")
# Greedy, but no token twice: a random-weight model otherwise repeats one byte forever, and
# its routing with it. The vocabulary is 256 bytes, so that bounds the tokens.
GENERATE = {"do_sample": False, "no_repeat_ngram_size": 1}
MAX_TOKENS = 160


def _say(text: str = "") -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        import torch
        import transformers
    except ImportError:
        raise CliError("the demo needs transformers: pip install 'expertd[hf]' (make setup does)") from None
    from expertd.client.hf_tiny import TINY

    if args.model not in TINY:
        raise CliError(f"unknown --model {args.model!r} (known: {', '.join(TINY)})")
    if not 1 <= args.tokens <= MAX_TOKENS:
        raise CliError(f"--tokens must be in [1, {MAX_TOKENS}] (the demo model's vocabulary is bytes)")
    torch.set_num_threads(1)  # tiny matmuls: more threads only wait on each other
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="expertd-demo-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        _demo(args, workdir, torch, transformers)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _demo(args: argparse.Namespace, workdir: Path, torch: Any, transformers: Any) -> None:
    from expertd.client.hf import offload
    from expertd.client.hf_layers import find_moe_layers
    from expertd.client.hf_tiny import byte_prompt, tiny_model
    from expertd.daemon.cli.demo import demo_session
    from expertd.daemon.store.pack_hf import pack_hf
    from expertd.traces.format import read_trace
    from expertd.traces.live import PrivateDaemon
    from expertd.traces.record import record
    from expertd.traces.replay import replay_hits

    model_dir, store = workdir / "model", workdir / "store"
    started = time.perf_counter()
    shape = {"initializer_range": INIT_STD, **DEMO_ARGS.get(args.model, {})}
    built = tiny_model(args.model, layers=DEMO_LAYERS, dtype=torch.bfloat16, **shape)
    built.save_pretrained(model_dir)
    layers = find_moe_layers(built)
    num_layers, num_experts = len(layers), layers[0].num_experts
    expert_bytes = sum(x.experts.gate_up_proj.nbytes + x.experts.down_proj.nbytes for x in layers)
    all_bytes = sum(p.nbytes for p in built.parameters())
    top_k = built.config.num_experts_per_tok
    _say(
        f"1. built {type(built).__name__} (random weights, no download): {num_layers} MoE layers x "
        f"{num_experts} experts, top-{top_k}, bf16; experts are {expert_bytes / all_bytes:.0%} of "
        f"its {all_bytes / 2**20:.1f} MiB"
    )
    manifest = pack_hf(model_dir, store)
    num_keys = num_layers * num_experts
    _say(
        f"2. expertd pack --from-hf: {num_keys} experts of {manifest.raw_bytes / 2**10:.0f} KiB into a store"
    )
    device_slots = max(top_k, round(args.capacity * num_keys))
    flags = [
        "--host-size", f"{num_keys} slots", "--device", "cpu", "--device-size", f"{device_slots} slots",
        "--device-policy", args.policy, "--log-level", "warning",
    ]  # fmt: skip
    _say(
        f"3. expertd serve: device tier (CPU stand-in for GPU memory) {device_slots} slots = "
        f"{device_slots / num_keys:.0%} of the experts, policy {args.policy}; the host tier holds all"
    )
    prompt = byte_prompt(args.prompt)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        want = reference.generate(prompt, max_new_tokens=args.tokens, **GENERATE)
        memory_s = time.perf_counter() - t0
    del reference
    daemon = PrivateDaemon(store, workdir / "daemon", flags)
    with demo_session(daemon) as client:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        hint = not args.no_hint
        offloaded = offload(model, client, hint=hint)
        _say(
            f"4. from_pretrained + offload(model, client{', hint=True' if hint else ''}): "
            f"{offloaded.freed_bytes / 2**20:.1f} MiB of expert weights left the process"
        )
        with torch.no_grad(), record(model, workdir / "demo.etrace") as recorder:
            t0 = time.perf_counter()
            got = model.generate(prompt, max_new_tokens=args.tokens, **GENERATE)
            seconds = time.perf_counter() - t0
        status = client.stats()
        offloaded.close()
    same = bool(torch.equal(got, want))
    new = got[0, prompt.shape[1] :].tolist()
    _say(f'5. generated {len(new)} tokens after "{args.prompt}" (greedy, no token twice), through expertd:')
    _say(f"   {' '.join(map(str, new[:16]))} ...  (random weights: noise, but the model's own)")
    _say(f"   the same tokens as the model with its experts in memory: {'yes' if same else 'NO'}")
    trace = read_trace(recorder.path)
    _report(status, offloaded.stats, len(new), seconds, memory_s, hint)
    sweep = {p: replay_hits(trace, p, device_slots).hit_rate for p in SWEEP_POLICIES}
    _say(
        f"6. recorded this generation's routing ({len(trace):,} rows, {trace.num_tokens()} tokens); "
        f"replayed at {device_slots} slots, without prefetch:"
    )
    _say("   " + ", ".join(f"{p} {rate:.3f}" for p, rate in sweep.items()) + "  (belady: the bound)")
    _say(f"   ({time.perf_counter() - started:.1f} s in all; the daemon stopped, its shared memory is gone)")
    _say()
    _say("Next, a real checkpoint (docs/getting-started.md):")
    _say("  expertd pack --from-hf ~/models/Qwen3-30B-A3B /srv/expertd/qwen3")
    _say("  expertd serve --store /srv/expertd/qwen3 --host-size 48GiB --device cuda --device-size 12GiB")
    _say("  model = AutoModelForCausalLM.from_pretrained(..., dtype=torch.bfloat16, device_map='cuda')")
    _say("  offload(model, ExpertClient(), hint=True); model.generate(...)   # expertd.client.hf")
    _say("  with record(model, 'mine.etrace'): ...  then  expertd replay mine.etrace --timed")
    if not same:
        raise CliError("the tokens through expertd differ from the model's own", EXIT_FAILED)


def _report(
    status: dict, client_stats: Any, tokens: int, seconds: float, memory_s: float, hint: bool
) -> None:
    device, host = status["tiers"]["device"], status["tiers"]["host"]
    acquires = status["acquires"]
    links = status["links"]
    _say(
        f"   tokens/s              {tokens / seconds:8.1f}   (experts in memory, no expertd: "
        f"{tokens / memory_s:.1f})"
    )
    _say(
        f"   device hit rate       {device['hit_rate']:8.3f}   ({device['hits']:,} of {device['accesses']:,})"
    )
    _say(f"   host hit rate         {host['hit_rate']:8.3f}   (of the device's misses; it starts cold)")
    _say(
        f"   stall                 {acquires['stall_s'] / tokens * 1e3:8.2f} ms/token in the daemon "
        f"({acquires['waited']:,} of {acquires['count']:,} acquires waited for a copy)"
    )
    _say(f"   client wait           {client_stats.wait_s / tokens * 1e3:8.2f} ms/token for leases")
    if hint:
        used, wasted = device["prefetch_used"], device["prefetch_wasted"]
        hints = client_stats.hints
        _say(f"   gate hints            {hints:8,}   sent; prefetches used {used:,}, wasted {wasted:,}")
    moved = ", ".join(f"{name} {info['bytes'] / 2**20:.1f} MiB" for name, info in links.items())
    _say(f"   bytes moved           {moved}")
