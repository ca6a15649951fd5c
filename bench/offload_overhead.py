"""What offloading costs when nothing misses: every expert resident, offloaded vs unmodified.

    .venv/bin/python bench/offload_overhead.py [--tokens 16] [--runs 5] [--layers 4]

Two models, each timed in one run against its own unmodified twin (interleaved, median of
``--runs``, each run in a rotated order), with a real daemon whose device tier (a CPU
stand-in) holds every expert:

1. a tiny Qwen3-MoE (`expertd.client.hf_tiny`, ``--layers`` MoE layers, 32 experts, top-4):
   ``model.generate`` of ``--tokens`` tokens unmodified, then through `expertd.client.hf.offload`
   with the shared-memory hit path (default) and with every acquire on the socket;
2. a Mixtral-shaped `MoEBlock` stack (8 experts, top-2, a synthetic store at 1/64 of the
   dimensions, ``--layers`` blocks) decoding one token at a time, experts from `MemoryExperts`
   (in memory) vs `ClientExperts` (leased from the daemon), fast path and socket.

For each: milliseconds per token, and the added time per MoE layer per token (goal <= 50 us).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from daemon_util import DaemonProcess  # noqa: E402

from expertd.client import ClientExperts, ExpertClient, MemoryExperts, MoEBlock, MoEConfig  # noqa: E402
from expertd.daemon.store.pack import pack_synthetic  # noqa: E402
from expertd.daemon.store.reader import StoreReader  # noqa: E402

GOAL_US = 50.0


def median_ms(fn: Callable[[], None], runs: int, per: int) -> float:
    """Median over ``runs`` of ``fn``'s time, per unit (``per`` units each)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) / per * 1e3)
    return statistics.median(times)


def serve(store: Path, work: Path, keys: int) -> DaemonProcess:
    flags = ["--host-size", f"{keys} slots", "--device", "cpu", "--device-size", f"{keys} slots"]
    return DaemonProcess(store, work, *flags, "--max-pinned-share", "1", "--log-level", "warning")


def hf_case(args: argparse.Namespace, work: Path) -> dict:
    import transformers

    from expertd.client.hf import offload
    from expertd.client.hf_tiny import byte_prompt, tiny_model
    from expertd.daemon.store.pack_hf import pack_hf

    model_dir, store = work / "qwen3", work / "qwen3-store"
    tiny_model("qwen3_moe", layers=args.layers, dtype=torch.float32).save_pretrained(model_dir)
    manifest = pack_hf(model_dir, store)
    keys = manifest.num_layers * manifest.num_experts
    prompt = byte_prompt("expertd offload overhead")
    generate = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "do_sample": False}
    load = transformers.AutoModelForCausalLM.from_pretrained
    reference = load(model_dir).eval()
    daemon = serve(store, work / "hf-daemon", keys)
    try:
        with ExpertClient(daemon.address) as fast, ExpertClient(daemon.address, fast_path=False) as socket:
            fast_model, socket_model = load(model_dir).eval(), load(model_dir).eval()
            offload(fast_model, fast)
            offload(socket_model, socket)
            models = {"unmodified": reference, "fast": fast_model, "socket": socket_model}
            with torch.no_grad():
                want = reference.generate(prompt, **generate)
                for name, model in models.items():  # warm: every expert resident, every view made
                    assert torch.equal(model.generate(prompt, **generate), want), name
                times: dict[str, list[float]] = {name: [] for name in models}
                for run in range(
                    args.runs
                ):  # interleaved, each run in a rotated order: the machine is shared
                    for name, model in rotated(models, run):
                        times[name].append(
                            median_ms(lambda m=model: m.generate(prompt, **generate), 1, args.tokens)
                        )
            hits = fast._fast.hits if fast._fast is not None else 0
    finally:
        daemon.terminate()
    return summarize("qwen3_moe (hf.offload)", {k: statistics.median(v) for k, v in times.items()},
                     manifest.num_layers, extra={"fast_hits": hits, "tokens": args.tokens})  # fmt: skip


def moe_case(args: argparse.Namespace, work: Path) -> dict:
    store = work / "mixtral-store"
    manifest = pack_synthetic(store, "mixtral-8x7b", scale=64, layers=args.layers)
    hidden = dict(manifest.tensors[0].to_json()).get("shape", [0, 0])[1]
    config = MoEConfig(
        hidden_size=int(hidden), num_experts=manifest.num_experts, top_k=2, norm_topk_prob=True
    )
    keys = manifest.num_layers * manifest.num_experts
    memory = MemoryExperts.from_store(StoreReader(store), range(manifest.num_layers))
    daemon = serve(store, work / "moe-daemon", keys)
    torch.manual_seed(0)
    try:
        with ExpertClient(daemon.address) as fast, ExpertClient(daemon.address, fast_path=False) as socket:
            sources = {"unmodified": memory, "fast": ClientExperts(fast, "device"),
                       "socket": ClientExperts(socket, "device")}  # fmt: skip
            stacks = {
                name: make_stack(config, manifest.num_layers, source) for name, source in sources.items()
            }
            xs = [torch.randn(1, config.hidden_size, dtype=torch.bfloat16) for _ in range(args.tokens)]

            def decode(stack: list[MoEBlock]) -> None:
                for x in xs:
                    for block in stack:
                        x = block(x)

            with torch.no_grad():
                for stack in stacks.values():
                    decode(stack)  # warm
                times: dict[str, list[float]] = {name: [] for name in stacks}
                for run in range(args.runs):
                    for name, stack in rotated(stacks, run):
                        times[name].append(median_ms(lambda s=stack: decode(s), 1, args.tokens))
            hits = fast._fast.hits if fast._fast is not None else 0
    finally:
        daemon.terminate()
    return summarize("Mixtral-shaped MoEBlock stack", {k: statistics.median(v) for k, v in times.items()},
                     manifest.num_layers, extra={"fast_hits": hits, "tokens": args.tokens})  # fmt: skip


def rotated(items: dict, run: int) -> list:
    """``items``' pairs starting at the ``run``-th: no variant always goes first."""
    pairs = list(items.items())
    start = run % len(pairs)
    return pairs[start:] + pairs[:start]


def make_stack(config: MoEConfig, layers: int, source) -> list[MoEBlock]:
    """``layers`` blocks; routers seeded alike, so every stack routes every token the same way."""
    stack = []
    for layer in range(layers):
        torch.manual_seed(1000 + layer)
        stack.append(MoEBlock(config, layer, source).eval())
    return stack


def summarize(label: str, per_token_ms: dict[str, float], layers: int, extra: dict) -> dict:
    base = per_token_ms["unmodified"]
    out = {"case": label, "moe_layers": layers, "ms_per_token": per_token_ms, **extra}
    print(f"-- {label}: {layers} MoE layers, every expert resident")
    for name in ("unmodified", "fast", "socket"):
        added_us = (per_token_ms[name] - base) / layers * 1e3
        out[f"added_us_per_layer_token_{name}"] = added_us
        relative = per_token_ms[name] / base
        print(
            f"{name:<11} {per_token_ms[name]:8.3f} ms/token  x{relative:5.2f}  "
            f"added {added_us:8.1f} us/layer/token"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="exd-ovh-", dir="/tmp"))
    cases = [hf_case(args, work), moe_case(args, work)]
    load = os.getloadavg()
    print(f"load average (uptime): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; "
          f"goal: added <= {GOAL_US:g} us per MoE layer per token (fast path)")  # fmt: skip
    print(
        json.dumps({"bench": "offload_overhead", "goal_us": GOAL_US, "cases": cases, "loadavg": list(load)})
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
