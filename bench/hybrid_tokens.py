"""Tokens/s of a Mixtral-shaped model on a 10% device tier: hybrid, copy, n-cpu-moe, all on the device.

    python bench/hybrid_tokens.py [--scale 2] [--layers 8] [--tokens 32] [--warmup 4] [--device-share 0.1]

A store of ``--layers`` Mixtral-8x7B MoE layers (8 experts, top-2; every dimension divided by
``--scale``: 2 makes each expert a quarter of the real 352 MB) is served by a fresh daemon per
row, its host tier holding every expert (warmed before timing), its device tier
``--device-share`` of them. A stack of `MoEBlock`s decodes ``--tokens`` tokens one at a time
(batch 1, residual, no attention: only the experts differ between rows). Rows, in one run:

- ``hybrid``: ``tier="auto"``: the daemon places each expert (calibrated at its start), the
  client computes host-placed ones on CPU threads while the device computes its own;
- ``copy``: ``tier="device"``: every miss is copied to the device and waited for (the default
  before protocol 3);
- ``n-cpu-moe``: llama.cpp's static split: the first N layers' experts fixed on the device (N as
  large as the device tier allows), every other layer's experts computed on the CPU from the host tier;
- ``device``: a device tier holding every expert (the ceiling).

On CUDA (``--device cuda``, the default when there is one) each row's output is compared with the
ceiling's (``max_abs_diff``); on the CPU stand-in (``--device cpu``: a shared-memory slab plays the
GPU) the rows must agree bit for bit, and tests/test_hybrid_bench.py runs it tiny. The last line of
stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROWS = ("hybrid", "copy", "n-cpu-moe", "device")
PRESET = "mixtral-8x7b"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=2, help="divide every expert dimension by this")
    parser.add_argument("--layers", type=int, default=8, help="MoE layers (Mixtral has 32)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens timed per row")
    parser.add_argument("--warmup", type=int, default=4, help="tokens decoded before timing")
    parser.add_argument("--device-share", type=float, default=0.1, help="device tier / all experts")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if present")
    parser.add_argument("--threads", type=int, default=None, help="host compute threads (default: the rule)")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the store goes (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)} (known: {', '.join(ROWS)})")
    args.rows = rows
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory(prefix="exd-hyb-", dir=args.workdir or "/tmp") as tmp:
        result = run(args, Path(tmp))
    for row in result["rows"]:
        print(
            f"{row['row']:<10} {row['tokens_per_s']:8.2f} tokens/s  host-computed {row['host_computed']:5d}  "
            f"copied {row['copied']:5d}  device hit rate {row['device_hit_rate']:.1%}  "
            f"max |diff| vs device {row['max_abs_diff']:.3g}"
        )
    print(json.dumps(result))
    return 0


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from expertd.daemon.store.pack import pack_synthetic

    started = time.perf_counter()
    manifest = pack_synthetic(tmp / "store", PRESET, scale=args.scale, layers=args.layers)
    pack_s = time.perf_counter() - started
    num_keys = manifest.num_layers * manifest.num_experts
    top_k = int(manifest.source["top_k"])
    device_slots = max(top_k, round(args.device_share * num_keys))
    hidden = next(t.shape[1] for t in manifest.tensors if t.name == "w1")  # w1 [F, D]
    x = torch.randn(args.warmup + args.tokens, hidden, generator=torch.Generator().manual_seed(0))
    outputs: dict[str, torch.Tensor] = {}
    rows = []
    for name in args.rows:
        row, out = run_row(name, args, tmp, manifest, device_slots, x.to(torch.bfloat16))
        rows.append(row)
        outputs[name] = out
    reference = outputs.get("device")
    for row in rows:
        out = outputs[row["row"]]
        diff = (out.float() - reference.float()).abs().max().item() if reference is not None else float("nan")
        row["max_abs_diff"] = diff
        row["bit_equal"] = bool(reference is not None and torch.equal(out, reference))
    return {
        "bench": "hybrid_tokens",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu stand-in",
        "model": f"{PRESET} / {args.scale:g}, {args.layers} layers",
        "expert_bytes": manifest.raw_bytes,
        "experts": num_keys,
        "device_slots": device_slots,
        "host_slots": num_keys,
        "tokens": args.tokens,
        "load": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "pack_s": pack_s,
        "rows": rows,
    }


def daemon_flags(name: str, args: argparse.Namespace, num_keys: int, device_slots: int) -> list[str]:
    slots = num_keys if name == "device" else device_slots
    flags = ["--device", args.device, "--device-size", f"{slots} slots", "--host-size", f"{num_keys} slots"]
    flags += ["--max-pinned-share", "1", "--calibrate", "on" if name == "hybrid" else "off"]
    return flags


def run_row(
    name: str, args: argparse.Namespace, tmp: Path, manifest: Any, device_slots: int, x: torch.Tensor
) -> tuple[dict[str, Any], torch.Tensor]:
    from expertd.client import ClientExperts, MoEBlock, MoEConfig
    from expertd.client.host_compute import HostCompute
    from expertd.traces.live import PrivateDaemon

    num_layers, num_experts = manifest.num_layers, manifest.num_experts
    num_keys = num_layers * num_experts
    config = MoEConfig(hidden_size=x.shape[1], num_experts=num_experts, top_k=int(manifest.source["top_k"]))
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    on_device_layers = device_slots // num_experts  # n-cpu-moe: whole layers that fit the device tier
    with PrivateDaemon(
        tmp / "store", tmp / f"d-{name}", daemon_flags(name, args, num_keys, device_slots)
    ) as daemon:
        client = daemon.connect()
        host = HostCompute(args.threads, hello_info=client.info, address=client.address)
        try:
            warm(client, name, num_layers, num_experts, on_device_layers)
            torch.manual_seed(1)  # the same routers in every row
            blocks = []
            for layer in range(num_layers):
                tier = {"hybrid": "auto", "copy": "device", "device": "device"}.get(name)
                if tier is None:  # n-cpu-moe
                    tier = "device" if layer < on_device_layers else "host"
                blocks.append(MoEBlock(config, layer, ClientExperts(client, tier), host=host).to(device))
            out = decode(blocks, x[: args.warmup].to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            before = client.stats()  # the timed tokens' counters only
            started = time.perf_counter()
            out = torch.cat([out, decode(blocks, x[args.warmup :].to(device))])
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            after = client.stats()
        finally:
            host.close()
            client.close()
    placed = {
        k: after.get("placed", {}).get(k, 0) - before.get("placed", {}).get(k, 0) for k in ("host", "device")
    }
    device_tier = {
        k: after["tiers"]["device"][k] - before["tiers"]["device"][k] for k in ("accesses", "hits")
    }
    host_tier_uses = sum(after["tiers"]["host"]["layer_accesses"][on_device_layers:]) - sum(
        before["tiers"]["host"]["layer_accesses"][on_device_layers:]
    )  # n-cpu-moe: its host layers' experts, each computed on the CPU
    row = {
        "row": name,
        "tokens_per_s": args.tokens / seconds,
        "seconds": seconds,
        "host_computed": host_tier_uses if name == "n-cpu-moe" else placed["host"],
        "copied": after["links"]["h2d"]["started"] - before["links"]["h2d"]["started"],
        "device_hit_rate": device_tier["hits"] / device_tier["accesses"] if device_tier["accesses"] else 0.0,
        "host_threads": host.threads,
        "host_compute": after.get("host_compute"),
        "on_device_layers": on_device_layers if name == "n-cpu-moe" else None,
    }
    return row, out.cpu()


def warm(client: Any, name: str, num_layers: int, num_experts: int, on_device_layers: int) -> None:
    """Every expert into the host tier (it holds them all); the device rows fill what they keep."""
    for layer in range(num_layers):
        for expert in range(num_experts):
            client.acquire(layer, [expert], "host").release()
    if name in ("device", "n-cpu-moe"):
        layers = num_layers if name == "device" else on_device_layers
        for layer in range(layers):
            for expert in range(num_experts):
                client.acquire(layer, [expert], "device").release()


@torch.inference_mode()
def decode(blocks: list[Any], x: torch.Tensor) -> torch.Tensor:
    """One token at a time through every block, with residual connections: [T, D] -> [T, D]."""
    outputs = []
    for token in x:
        h = token[None]  # [1, D]
        for block in blocks:
            h = h + block(h)
        outputs.append(h)
    return torch.cat(outputs)


if __name__ == "__main__":
    sys.exit(main())
