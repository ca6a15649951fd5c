"""Host compute bandwidth of a batch-1 expert pass, against the machine's memory copy bandwidth.

    python bench/cpu_expert.py [--threads N] [--dtype bfloat16] [--passes 20] [--tokens 1,8]

For each real expert shape (Mixtral-8x7B, DeepSeek-V2-Lite, Qwen3-30B-A3B) it times a SwiGLU
expert pass on the CPU (`expertd.daemon.service.host_compute.measure_host_gbps`, the function
the daemon's calibration uses) and reports the expert's bytes over one pass's seconds, beside
the bytes per second of a plain buffer copy measured in the same run. ``--tokens`` adds
batched passes, whose bandwidth shows where the CPU turns compute-bound (the knee placement
uses). The timing profiles' ``host_gbps`` (expertd/traces/timing.py) rest on runs of this.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os

from expertd.daemon.service.host_compute import DTYPES, measure_host_gbps, measure_memory_gbps

SHAPES = {  # hidden size, expert ffn size (each model's config.json)
    "mixtral-8x7b": (4096, 14336),
    "deepseek-v2-lite": (2048, 1408),
    "qwen3-30b-a3b": (2048, 768),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--tokens", default="1,8", help="tokens per pass, comma-separated")
    parser.add_argument("--models", default=",".join(SHAPES))
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    load = os.getloadavg()
    copy_gbps = measure_memory_gbps()
    print(f"memory copy: {copy_gbps:.1f} GB/s (bytes copied per second); load {load[0]:.2f}")
    rows = []
    for model in args.models.split(","):
        if model not in SHAPES:
            parser.error(f"unknown model {model!r} (known: {', '.join(SHAPES)})")
        hidden, ffn = SHAPES[model]
        for count in tokens:
            run = measure_host_gbps(
                hidden, ffn, dtype=args.dtype, tokens=count, threads=args.threads, passes=args.passes
            )
            ratio = run.gbps / copy_gbps
            print(
                f"{model:18s} {hidden}x{ffn} {args.dtype} tokens {count:3d} threads {run.threads}: "
                f"{run.seconds * 1e3:8.2f} ms/pass, {run.gbps:6.1f} GB/s ({ratio:.2f}x copy), "
                f"expert {run.expert_bytes / 1e6:.1f} MB"
            )
            rows.append(
                {
                    "model": model,
                    "hidden": hidden,
                    "ffn": ffn,
                    "tokens": count,
                    "threads": run.threads,
                    "expert_bytes": run.expert_bytes,
                    "ms_per_pass": run.seconds * 1e3,
                    "host_gbps": run.gbps,
                    "vs_copy": ratio,
                }
            )
    summary = {
        "bench": "cpu_expert",
        "dtype": args.dtype,
        "copy_gbps": copy_gbps,
        "cpus": os.cpu_count(),
        "load": load[0],
        "rows": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
