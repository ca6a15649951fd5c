"""The systems people run today, as rows of `replay --timed`, and the hybrid oracle bound.

Each peer is what that system does, on the same timing model (`expertd.traces.timing`)
and the same trace, in-process (no client/daemon round trip). docs/policies.md
describes each with its source:

- ``mixtral-offloading``: an LRU of experts per layer (capacity split evenly across
  layers; a layer with no slot copies every expert it uses through a staging buffer),
  every miss copied over the link and computed on the device.
- ``moe-infinity``: a frequency-ordered (LFU) device cache filled ahead by the
  `activation-matrix` predictor (no link share); every miss copied. Run through the cache
  manager.
- ``n-cpu-moe`` (llama.cpp ``--n-cpu-moe N``): the experts of as many whole layers as
  the capacity holds fixed on the device, every other expert computed on the CPU.
- ``fiddler``: the device holds the experts most used on the trace's tuning part (its
  first `TUNE_SHARE` of tokens); every miss computed on the CPU.
- ``default-copy``: expertd's default configuration acquiring ``device`` (copy every
  miss), as it was before placement: the baseline the hybrid default replaces.
- ``hybrid-oracle``: `hybrid_oracle_s`, a bound no schedule of copies and host passes
  beats, whatever it knows of the future.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict

import numpy as np

from expertd.daemon.core import defaults
from expertd.daemon.core.prefetch import PrefetchConfig
from expertd.traces.replay import (
    BOUND_POLICY,
    ReplayRow,
    RowUnavailable,
    forward_ids,
    replay_hits,
    replay_timed,
    set_bound,
)
from expertd.traces.timing import TimingModel
from expertd.traces.trace import Trace

PEERS = ("default-copy", "mixtral-offloading", "moe-infinity", "n-cpu-moe", "fiddler", "hybrid-oracle")
HOST_PEERS = ("n-cpu-moe", "fiddler")  # the peers that compute on the CPU
TUNE_SHARE = 0.2  # fiddler's profiling part: this share of the trace's tokens, from the start
# The best of the settings tried on Mixtral's first 200 tokens at 10% (/tmp runs, not shipped):
# deeper or likelier-only guessing did no better; LFU stands in for its frequency-aware cache.
MOE_INFINITY_PREFETCH = PrefetchConfig("activation-matrix", depth=1, min_prob=0.5, budget=2, width=2)
MOE_INFINITY_POLICY = "lfu"


def run_peer(name: str, trace: Trace, slots: int, timing: TimingModel, bound_loads: int) -> ReplayRow:
    """Peer ``name`` at ``slots`` device slots, timed, with its bound set."""
    if not timing.has_device:
        raise RowUnavailable(f"{name}: the peers need a profile with a device tier")
    if name == "default-copy":
        policy, prefetch = defaults.resolve(defaults.DEFAULT_NAME)
        row = replay_timed(trace, policy, slots, timing, prefetch=prefetch, bound_loads=bound_loads)
    elif name == "moe-infinity":
        row = replay_timed(
            trace, MOE_INFINITY_POLICY, slots, timing, prefetch=MOE_INFINITY_PREFETCH,
            bound_loads=bound_loads, round_trips=False,
        )  # fmt: skip
    elif name == "hybrid-oracle":
        row = _oracle_row(trace, slots, timing, bound_loads)
    else:
        if name in HOST_PEERS and not timing.has_host_compute:
            raise RowUnavailable(f"{name}: computes on the CPU; the profile has no host compute")
        started = time.perf_counter()
        if name == "mixtral-offloading":
            total, hits, copied = _per_layer_lru(trace, slots, timing)
            host = 0
        elif name == "n-cpu-moe":
            total, hits, host = _static(trace, _whole_layers(trace, slots), timing)
            copied = 0
        elif name == "fiddler":
            total, hits, host = _static(trace, _most_used(trace, slots), timing)
            copied = 0
        else:
            raise RowUnavailable(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
        row = _row(trace, slots, total, hits, host, copied, time.perf_counter() - started)
        row.stall_s_per_token = (total - len(trace) * timing.layer_s) / (row.tokens or 1)
        row.bytes_moved = copied * timing.expert_bytes
        set_bound(row, trace, timing, bound_loads, total)
    row.policy = name
    return row


def _row(
    trace: Trace, slots: int, total: float, hits: int, host: int, copied: int, seconds: float
) -> ReplayRow:
    accesses = trace.keys().size
    tokens = int(forward_ids(trace)[-1]) + 1 if len(trace) else 0
    num_keys = trace.meta.num_layers * trace.meta.num_experts
    return ReplayRow(
        policy="",
        capacity=slots / num_keys,
        slots=slots,
        accesses=accesses,
        hits=hits,
        hit_rate=hits / accesses if accesses else 0.0,
        seconds=seconds,
        tokens=tokens,
        time_s_per_token=total / tokens,
        tokens_per_s=tokens / total if total else math.inf,
        seconds_per_token=total / tokens,
        host_computed=host,
        copied=copied,
    )


def _per_layer_lru(trace: Trace, slots: int, timing: TimingModel) -> tuple[float, int, int]:
    """mixtral-offloading: per-layer LRU; a layer's misses are copied one after another, the
    hits computing meanwhile (the layer ends with its last expert's device pass)."""
    layers = trace.meta.num_layers
    share, extra = divmod(slots, layers)
    quota = [share + (1 if layer < extra else 0) for layer in range(layers)]
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(layers)]
    copy, expert = timing.h2d_s(), timing.device_expert_s()
    total, hits, copied = 0.0, 0, 0
    for layer, experts in zip(trace.layer.tolist(), trace.experts.tolist(), strict=True):
        cache, misses = caches[layer], 0
        for e in experts:
            if e in cache:
                cache.move_to_end(e)
                hits += 1
                continue
            misses += 1
            if quota[layer]:
                if len(cache) >= quota[layer]:
                    cache.popitem(last=False)
                cache[e] = None
        copied += misses
        total += max(timing.layer_s, misses * copy + expert) if misses else timing.layer_s
    return total, hits, copied


def _static(trace: Trace, resident: np.ndarray, timing: TimingModel) -> tuple[float, int, int]:
    """A fixed device set (``resident`` [num_keys] bool); every other expert computed on the host."""
    keys = trace.keys().reshape(len(trace), -1)  # [N, k]
    on_host = (~resident[keys]).sum(axis=1)  # [N]
    counts = np.bincount(on_host, minlength=keys.shape[1] + 1)
    total = sum(int(c) * timing.layer_end_s(n) for n, c in enumerate(counts.tolist()))
    host = int(on_host.sum())
    return total, keys.size - host, host


def _whole_layers(trace: Trace, slots: int) -> np.ndarray:
    """n-cpu-moe: the last ``slots // E`` layers' experts on the device (llama.cpp keeps the
    first N layers' experts on the CPU, so the device holds the others)."""
    layers, experts = trace.meta.num_layers, trace.meta.num_experts
    on_device = min(layers, slots // experts)
    resident = np.zeros(layers * experts, dtype=bool)
    if on_device:
        resident[(layers - on_device) * experts :] = True
    return resident


def _most_used(trace: Trace, slots: int) -> np.ndarray:
    """fiddler: the ``slots`` keys most used in the first `TUNE_SHARE` of the trace's tokens."""
    forwards = forward_ids(trace)
    tune = forwards < max(1, int(math.ceil(TUNE_SHARE * (int(forwards[-1]) + 1))))
    num_keys = trace.meta.num_layers * trace.meta.num_experts
    counts = np.bincount(trace.select(tune).keys(), minlength=num_keys)
    resident = np.zeros(num_keys, dtype=bool)
    resident[np.argsort(-counts, kind="stable")[:slots]] = True
    return resident


def bypass_min_fetches(keys: np.ndarray, slots: int) -> int:
    """The fewest fetches any cache of ``slots`` needs when a miss may bypass it (be computed
    elsewhere, or staged, without taking a slot): Belady's MIN with bypass, started warm with
    the keys it would have loaded first for free."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    grouped = keys[order]
    same = grouped[1:] == grouped[:-1]
    nxt = np.full(n, n, dtype=np.int64)
    nxt[order[:-1][same]] = order[1:][same]
    next_use: dict[int, int] = {}  # resident key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), lazy
    fetches = 0
    for key, upcoming in zip(keys.tolist(), nxt.tolist(), strict=True):
        if key in next_use:
            next_use[key] = upcoming
            heapq.heappush(heap, (-upcoming, key))
            continue
        if len(next_use) < slots:
            # a warm start holds it already
            next_use[key] = upcoming
            heapq.heappush(heap, (-upcoming, key))
            continue
        fetches += 1
        while heap and next_use.get(heap[0][1]) != -heap[0][0]:
            heapq.heappop(heap)
        farthest, victim = -heap[0][0], heap[0][1]
        if upcoming < farthest:  # keep the incoming key instead of the one used last
            heapq.heappop(heap)
            del next_use[victim]
            next_use[key] = upcoming
            heapq.heappush(heap, (-upcoming, key))
    return fetches


def hybrid_oracle_s(trace: Trace, timing: TimingModel, slots: int) -> float:
    """Seconds no schedule of copies and host passes at ``slots`` device slots beats.

    Any schedule serves each access from a device slot or from a fetch that bypasses the
    cache (a host pass, a staged copy): copies I plus host passes H are at least F, the
    fetches of Belady's MIN with bypass, started warm (`bypass_min_fetches`). The link
    moves one expert at a time: time >= I x copy. A layer with n of its experts on the
    host takes f(n) = max(layer - n x device pass, n x host pass); f is convex, so R rows
    sharing H host passes take at least R x g(H / R), g the piecewise-linear interpolation
    of f, taken no lower than its minimum. The bound is the least over I of the larger of
    the two; no round trips are paid. A cold host tier smaller than the experts adds its
    loads' bound, as in the copy-only bound.
    """
    rows = len(trace)
    if not rows:
        return 0.0
    k = trace.meta.top_k
    ends = [timing.layer_end_s(n) for n in range(k + 1)]  # f(0..k)

    def host_time(passes: float) -> float:
        """Least time of ``rows`` rows sharing at least ``passes`` host passes."""
        per_row = passes / rows
        if per_row > k:
            return math.inf
        best = math.inf
        for n in range(k + 1):  # the least f over [per_row, k], f linear between integers
            if n >= per_row:
                best = min(best, ends[n])
        low = int(per_row)
        if low < k:
            frac = per_row - low
            best = min(best, ends[low] + frac * (ends[low + 1] - ends[low]))
        return rows * best

    fetches = bypass_min_fetches(trace.keys(), slots)
    copy = timing.h2d_s()
    lo, hi = 0.0, float(fetches)  # copies I: the link term rises with I, the host term falls
    for _ in range(100):
        mid = (lo + hi) / 2
        if mid * copy < host_time(fetches - mid):
            lo = mid
        else:
            hi = mid
    bound = min(max(i * copy, host_time(fetches - i)) for i in (lo, hi))
    if timing.host_slots is not None:
        host = replay_hits(trace, BOUND_POLICY, timing.host_slots)
        bound = max(bound, (host.accesses - host.hits) * timing.load_s())
    return bound


def _oracle_row(trace: Trace, slots: int, timing: TimingModel, bound_loads: int) -> ReplayRow:
    if not timing.has_host_compute:
        raise RowUnavailable("hybrid-oracle: the profile has no host compute")
    started = time.perf_counter()
    total = hybrid_oracle_s(trace, timing, slots)
    fetches = bypass_min_fetches(trace.keys(), slots)
    accesses = trace.keys().size
    row = _row(trace, slots, total, accesses - fetches, 0, 0, time.perf_counter() - started)
    row.host_computed = row.copied = None  # a bound: it splits its fetches, not its accesses
    row.stall_s_per_token = (total - len(trace) * timing.layer_s) / (row.tokens or 1)
    row.bytes_moved = 0
    set_bound(row, trace, timing, bound_loads, total)
    return row
