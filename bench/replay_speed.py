"""Hit-rate replay speed: expertd's LRU against libCacheSim's on the same access sequence.

    .venv/bin/python bench/replay_speed.py [--trace llama4] [--capacity 0.1] [--repeat 3]

Both replay the trace's flattened (layer, expert) access sequence as a plain cache of
unit-size objects; both must count the same hits. libCacheSim runs twice: natively
(``process_trace`` over the sequence written as an oracleGeneral binary trace: its C
speed) and through its Python binding (one ``get`` per access, as our oracle tests
drive it). Best of ``--repeat`` runs each, interleaved. The last line of stdout is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
from lcs_oracle import ORACLE_NAMES, lcs_hits  # noqa: E402 - the test oracle's libCacheSim driver

from expertd.policies.base import Geometry  # noqa: E402
from expertd.policies.registry import make_policy  # noqa: E402
from expertd.traces import corpus  # noqa: E402
from expertd.traces.replay import parse_capacity, steps_of  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", default="llama4", choices=corpus.NAMES)
    parser.add_argument("--capacity", default="0.1")
    parser.add_argument("--policy", default="lru")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    trace = corpus.load(args.trace)
    keys = trace.keys()
    geometry = Geometry(trace.meta.num_layers, trace.meta.num_experts)
    slots, fraction = parse_capacity(args.capacity, geometry.num_keys)
    with tempfile.TemporaryDirectory() as tmp:
        binary = write_oracle_general(keys, Path(tmp) / "trace.oracleGeneral")
        times: dict[str, list[float]] = {"ours": [], "native": [], "binding": []}
        hits: dict[str, int] = {}
        for _ in range(args.repeat):
            started = time.perf_counter()
            hits["ours"] = make_policy(args.policy, slots, geometry).replay(keys, steps_of(trace))
            times["ours"].append(time.perf_counter() - started)
            started = time.perf_counter()
            hits["native"] = lcs_native_hits(args.policy, binary, slots, len(keys))
            times["native"].append(time.perf_counter() - started)
            started = time.perf_counter()
            hits["binding"] = lcs_hits(args.policy, keys, slots)
            times["binding"].append(time.perf_counter() - started)
    rate = {name: len(keys) / min(t) for name, t in times.items()}
    same = len(set(hits.values())) == 1
    print(
        f"trace {trace.meta.model}: {len(keys):,} accesses, {args.policy} at {slots} slots ({fraction:.1%})"
    )
    print(f"expertd                      {rate['ours'] / 1e6:6.2f} M accesses/s  hits {hits['ours']:,}")
    print(f"libCacheSim, native          {rate['native'] / 1e6:6.2f} M accesses/s  hits {hits['native']:,}")
    print(f"libCacheSim, Python binding  {rate['binding'] / 1e6:6.2f} M accesses/s  hits {hits['binding']:,}")
    result = {
        "bench": "replay_speed",
        "trace": args.trace,
        "policy": args.policy,
        "accesses": len(keys),
        "slots": slots,
        "expertd_accesses_per_s": rate["ours"],
        "libcachesim_native_accesses_per_s": rate["native"],
        "libcachesim_binding_accesses_per_s": rate["binding"],
        "ratio_to_native": rate["ours"] / rate["native"],
        "ratio_to_binding": rate["ours"] / rate["binding"],
        "goal_accesses_per_s": 2e6,
        "meets_goal": rate["ours"] >= 2e6,
        "same_hits": same,
    }
    print(json.dumps(result))
    return 0 if same else 1


def write_oracle_general(keys: np.ndarray, path: Path) -> Path:
    """The keys as libCacheSim's oracleGeneral binary trace (24-byte records, unit sizes)."""
    record = np.dtype([("time", "<u4"), ("obj_id", "<u8"), ("size", "<u4"), ("next_vtime", "<i8")])
    rows = np.zeros(len(keys), dtype=record)
    rows["time"] = np.arange(len(keys))
    rows["obj_id"] = keys
    rows["size"] = 1
    rows["next_vtime"] = -1
    rows.tofile(path)
    return path


def lcs_native_hits(policy: str, binary: Path, slots: int, accesses: int) -> int:
    import libcachesim

    reader = libcachesim.TraceReader(str(binary), libcachesim.TraceType.ORACLE_GENERAL_TRACE)
    cache = getattr(libcachesim, ORACLE_NAMES[policy])(cache_size=slots)
    miss_ratio, _ = cache.process_trace(reader)
    return round((1 - miss_ratio) * accesses)


if __name__ == "__main__":
    sys.exit(main())
