"""What prediction costs per acquire: the default predictor's learning and planning, and the
expected waits a prediction-aware eviction reads, on a small and a Llama-4-sized geometry.

    .venv/bin/python bench/predict_cost.py [--acquires 5000]

Drives `Prefetcher.on_acquire` (what the daemon runs for every acquire, after a hit's reply)
with random top-2 routing, one request per 50 tokens, after a warm-up; then times
`Prefetcher.waits()` recomputed after each acquire (what an eviction pays once per
observation). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from expertd.daemon.core.defaults import prefetch_config
from expertd.daemon.core.prefetch import Prefetcher
from expertd.policies.base import Geometry

GEOMETRIES = {"4x8": Geometry(4, 8), "llama4 24x128": Geometry(24, 128)}


def measure(geometry: Geometry, acquires: int) -> dict[str, float]:
    prefetcher = Prefetcher(prefetch_config(), geometry)
    rng = random.Random(0)
    layers, experts = geometry.num_layers, geometry.num_experts

    def acquire(i: int) -> None:
        request = ("client", i // (layers * 50))
        prefetcher.on_acquire("tenant", request, i % layers, rng.sample(range(experts), 2))

    for i in range(2000):  # warm: tables and requests exist
        acquire(i)
    started = time.perf_counter()
    for i in range(2000, 2000 + acquires):
        acquire(i)
    on_acquire = (time.perf_counter() - started) / acquires
    waits_s = 0.0
    for i in range(2000 + acquires, 2000 + acquires + acquires // 10):
        acquire(i)
        started = time.perf_counter()
        prefetcher.waits()
        waits_s += time.perf_counter() - started
    return {"on_acquire_us": on_acquire * 1e6, "waits_us": waits_s / (acquires // 10) * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--acquires", type=int, default=5000)
    args = parser.parse_args()
    rows = {name: measure(geometry, args.acquires) for name, geometry in GEOMETRIES.items()}
    print(f"{'geometry':<16} {'on_acquire us':>14} {'waits() us':>11}")
    for name, row in rows.items():
        print(f"{name:<16} {row['on_acquire_us']:>14.1f} {row['waits_us']:>11.1f}")
    print(json.dumps({"bench": "predict_cost", "predictor": prefetch_config().predictor, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
