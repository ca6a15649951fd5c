"""Hit rates of caches that know more than any online policy can, for docs/prefetch.md.

    .venv/bin/python bench/oracles.py [--traces mixtral,llama4] [--capacity 0.1]

Per trace (Llama-4 and Mixtral from ../shared, whole and held-out part) at one capacity:

- **per-request static oracle**: each request's own most used experts, as many as the
  cache holds, known before the request starts and pinned for all of it (no load counted);
- **windowed oracle, W tokens**: the same for each window of W tokens of a request: the
  window's most used experts, known before it starts, swapped in between windows for free
  (no load counted). W = 1 knows the next token exactly; larger W knows less and less of
  which token uses what;
- **Belady's MIN**: the fewest loads of any cache (the demand bound);
- the default configuration's hit rate without prefetching (`predictive` alone, online).

The static oracle knows each request's whole routing and still misses what Belady hits:
what separates an online policy from the bound is *which* of a layer's experts the next
token picks, not which experts a request uses; the windowed oracles say how near in time
that knowledge has to be. Prints a markdown table; last line JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefetch_table import select_part  # noqa: E402

from expertd.traces import corpus  # noqa: E402
from expertd.traces.replay import forward_ids, geometry_of, parse_capacity, replay_hits  # noqa: E402


def static_oracle(trace, slots: int, window: int | None = None) -> float:
    """Hit rate when each request (each ``window`` tokens of it) pins its ``slots`` most used keys."""
    geometry = geometry_of(trace)
    k = trace.experts.shape[1]
    keys = (trace.layer.astype(np.int64)[:, None] * geometry.num_experts + trace.experts).reshape(-1)  # [N*k]
    requests = np.repeat(trace.request, k)  # [N*k]
    forward = np.repeat(forward_ids(trace), k)  # [N*k]: token order, across requests
    hits = 0
    for request in np.unique(requests):
        mine = requests == request
        its_keys = keys[mine]
        chunk = np.zeros(len(its_keys), dtype=np.int64)
        if window is not None:
            token = forward[mine]
            chunk = (token - token.min()) // window
        for part in np.unique(chunk):
            counts = np.bincount(its_keys[chunk == part], minlength=geometry.num_keys)
            hits += int(np.sort(counts)[::-1][:slots].sum())
    return hits / len(keys)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", default="mixtral,llama4")
    parser.add_argument("--capacity", default="0.1")
    parser.add_argument("--windows", default="8,32", help="tokens per window of the windowed oracles")
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    started = time.perf_counter()
    rows = []
    for name in args.traces.split(","):
        whole = corpus.load(name)
        for part, trace in (("whole", whole), ("held-out", select_part(whole, name, "held-out"))):
            slots, _ = parse_capacity(args.capacity, geometry_of(trace).num_keys)
            rows.append(
                {
                    "trace": name,
                    "part": part,
                    "slots": slots,
                    "static_oracle": round(static_oracle(trace, slots), 3),
                    "windowed_oracle": {w: round(static_oracle(trace, slots, w), 3) for w in windows},
                    "belady": round(replay_hits(trace, "belady", slots).hit_rate, 3),
                    "predictive": round(replay_hits(trace, "predictive", slots).hit_rate, 3),
                }
            )
            print(f"  {name} {part}: done", file=sys.stderr)
    print(f"capacity {args.capacity} of all experts; hit rates")
    print()
    heads = "".join(f" windowed oracle, {w} tokens |" for w in windows)
    online = "predictive (online, no prefetch)"
    print(f"| trace | part | slots | per-request static oracle |{heads} {online} | Belady |")
    print("|---|---|---|---|" + "---|" * len(windows) + "---|---|")
    for r in rows:
        cells = "".join(f" {r['windowed_oracle'][w]:.3f} |" for w in windows)
        print(
            f"| {r['trace']} | {r['part']} | {r['slots']} | {r['static_oracle']:.3f} |{cells}"
            f" {r['predictive']:.3f} | {r['belady']:.3f} |"
        )
    print(f"\n({time.perf_counter() - started:.0f} s)")
    print(json.dumps({"bench": "oracles", "capacity": args.capacity, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
