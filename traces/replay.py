"""The replay simulator: run eviction policies over a routing trace.

Two modes. *Hit rate*: a policy alone acts as a single-object cache over the
trace's access sequence (libCacheSim's semantics); fast. *Timed*: the daemon's
own `CacheManager` is driven one acquire per trace row, with a virtual clock,
one transfer at a time per link and a fixed compute time per layer (see
`expertd.traces.timing`); it reports stalls, time per token and bytes moved.
Belady's MIN at the same capacity is always computed: it is the hit-rate bound,
and its load count gives the timed bound.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from expertd.daemon.core.defaults import resolve as resolve_default
from expertd.daemon.core.events import DEVICE, H2D, HOST, LOAD, ErrorReply, Predict, Reply, StartTransfer
from expertd.daemon.core.manager import CacheManager, ManagerConfig
from expertd.daemon.core.prefetch import PrefetchConfig
from expertd.policies.base import Geometry, PolicyError
from expertd.policies.registry import make_policy, parse_spec, policy_class
from expertd.traces.timing import TimingModel
from expertd.traces.trace import Trace

BOUND_POLICY = "belady"


class ReplayError(ValueError):
    """A replay cannot run as asked (capacity, policy or timing out of range)."""


@dataclasses.dataclass
class ReplayRow:
    """One policy at one capacity: the unit of `replay`'s table and JSON."""

    policy: str
    capacity: float  # fraction of all (layer, expert) objects
    slots: int
    accesses: int
    hits: int
    hit_rate: float
    seconds: float  # wall time of this run
    bound_hit_rate: float | None = None  # Belady at the same capacity
    # timed mode only
    tokens: int | None = None
    stall_s_per_token: float | None = None
    time_s_per_token: float | None = None
    tokens_per_s: float | None = None
    bytes_moved: int | None = None
    bytes_per_link: dict[str, int] | None = None
    bound_s_per_token: float | None = None
    bound_ratio: float | None = None
    error: str | None = None  # the policy cannot run at this capacity (the row has no results)
    prefetch: dict | None = None  # timed mode with a predictor: its precision, recall, waste

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def parse_capacity(spec: str | float | int, num_keys: int) -> tuple[int, float]:
    """``"0.05"`` (a fraction of all objects) or ``"120"`` (slots) -> (slots, fraction)."""
    text = str(spec).strip()
    try:
        value = float(text)
    except ValueError:
        raise ReplayError(f"capacity {text!r} is neither a fraction nor a slot count") from None
    is_fraction = "." in text or "e" in text.lower()
    if is_fraction:
        if not 0 < value <= 1:
            raise ReplayError(f"capacity fraction {text} must be in (0, 1]")
        slots = max(1, round(value * num_keys))
    else:
        if not value.is_integer() or not 1 <= value <= num_keys:
            raise ReplayError(f"capacity {text} slots must be an integer in [1, {num_keys}]")
        slots = int(value)
    return slots, slots / num_keys


def geometry_of(trace: Trace) -> Geometry:
    return Geometry(trace.meta.num_layers, trace.meta.num_experts)


def forward_ids(trace: Trace) -> np.ndarray:
    """The forward pass (token, across requests) each row belongs to: 0, 0, ..., 1, 1, ..."""
    if len(trace) == 0:
        return np.zeros(0, dtype=np.int64)
    new = (trace.request[1:] != trace.request[:-1]) | (trace.token[1:] != trace.token[:-1])
    return np.concatenate([[0], np.cumsum(new)]).astype(np.int64)


def steps_of(trace: Trace) -> Iterator[tuple[int, int, int]]:
    """``(t_start, forward, layer)`` per row, for `EvictionPolicy.replay`."""
    k = trace.meta.top_k
    t_start = (np.arange(len(trace), dtype=np.int64) * k).tolist()
    return zip(t_start, forward_ids(trace).tolist(), trace.layer.tolist(), strict=True)


def replay_hits(trace: Trace, policy: str, slots: int, keys: np.ndarray | None = None) -> ReplayRow:
    """Hit-rate mode: ``policy`` alone as a cache of ``slots`` objects."""
    geometry = geometry_of(trace)
    keys = trace.keys() if keys is None else keys
    started = time.perf_counter()
    cache = make_policy(policy, slots, geometry)
    if cache.offline:
        cache.prepare(keys)
    hits = cache.replay(keys, steps_of(trace))
    seconds = time.perf_counter() - started
    accesses = len(keys)
    return ReplayRow(
        policy=policy,
        capacity=slots / geometry.num_keys,
        slots=slots,
        accesses=accesses,
        hits=hits,
        hit_rate=hits / accesses if accesses else 0.0,
        seconds=seconds,
    )


def replay_timed(
    trace: Trace,
    policy: str,
    slots: int,
    timing: TimingModel,
    *,
    host_policy: str = "lru",
    prefetch: PrefetchConfig | None = None,
    bound_loads: int | None = None,
    predictor_state: Mapping[str, Any] | None = None,
    hints: Callable[[int], Iterable[tuple[int, Sequence[int]]]] | None = None,
) -> ReplayRow:
    """Timed mode: the cache manager, a virtual clock and the links of ``timing``.

    ``prefetch``: the manager's predictor and prefetch settings (None: demand loads only);
    ``predictor_state``: statistics its predictor starts from (a warm start);
    ``hints``: client gate hints, ``hints(row)`` -> the ``(layer, experts)`` the client
    hints right after row ``row``'s acquire (as a client does once it has the layer's
    hidden state). Recorded traces carry no hidden states, so only a simulation can supply
    them (bench/hint_sensitivity.py).
    """
    prefetch = prefetch or PrefetchConfig()
    geometry = geometry_of(trace)
    keys = trace.keys()
    num_keys = geometry.num_keys
    tier = DEVICE if timing.has_device else HOST
    if timing.has_device:
        host_slots = timing.host_slots or num_keys
        config = ManagerConfig(
            geometry, host_slots=host_slots, device_slots=slots, host_policy=host_policy,
            device_policy=policy, load_depth=1, h2d_depth=1, lease_timeout_s=math.inf,
            expert_bytes=timing.expert_bytes, prefetch=prefetch,
        )  # fmt: skip
    else:
        config = ManagerConfig(
            geometry, host_slots=slots, host_policy=policy, load_depth=1,
            lease_timeout_s=math.inf, expert_bytes=timing.expert_bytes, prefetch=prefetch,
        )  # fmt: skip
    started = time.perf_counter()
    manager = CacheManager(config)
    if predictor_state is not None and manager.prefetcher is not None:
        manager.prefetcher.load_state(predictor_state)
    if timing.has_device and timing.host_slots is None:
        manager.preload(HOST, range(num_keys))  # warm host: RAM holds every expert
    cache = manager.tiers[tier].policy
    if cache.offline:
        cache.prepare(keys)

    duration = {LOAD: timing.load_s(), H2D: timing.h2d_s() if timing.has_device else 0.0}
    events: list[tuple[float, int, int]] = []  # (finish time, seq, transfer id)
    replies: list[Reply] = []
    seq = 0

    def run(commands: list, at: float) -> None:
        nonlocal seq
        for command in commands:
            if isinstance(command, StartTransfer):
                seq += 1
                heapq.heappush(events, (at + duration[command.link], seq, command.transfer_id))
            elif isinstance(command, Reply):
                replies.append(command)
            elif isinstance(command, Predict):
                run(manager.predict(command), at)
            elif isinstance(command, ErrorReply):
                raise ReplayError(f"replay acquire failed: {command.code}: {command.message}")

    layers = trace.layer.tolist()
    experts = trace.experts.tolist()
    requests = trace.request.tolist()
    now = stall = 0.0
    lease: list[int] = []
    for row, (layer, row_experts, request) in enumerate(zip(layers, experts, requests, strict=True)):
        while events and events[0][0] <= now:
            finish, _, transfer_id = heapq.heappop(events)
            run(manager.transfer_done(transfer_id, True), finish)
        if row and request != requests[row - 1]:
            manager.end_generation("replay", requests[row - 1])
        run(manager.acquire("replay", row, layer, row_experts, tier, now, lease, request), now)
        if hints is not None:
            for hint_layer, hint_experts in hints(row):
                run(manager.hint("replay", hint_layer, hint_experts, now, generation=request), now)
        ready = now
        while not replies:
            if not events:
                raise ReplayError(f"row {row}: acquire cannot complete (capacity {slots} too small?)")
            ready, _, transfer_id = heapq.heappop(events)
            run(manager.transfer_done(transfer_id, True), ready)
        reply = replies.pop()
        lease = [reply.lease_id]
        stall += ready - now
        now = ready + timing.layer_s
    seconds = time.perf_counter() - started

    stats = manager.stats()
    tokens = int(forward_ids(trace)[-1]) + 1 if len(trace) else 0
    per_link = {link: info["bytes"] for link, info in stats["links"].items()}
    counters = stats["tiers"][tier]
    row_out = ReplayRow(
        policy=policy,
        capacity=slots / num_keys,
        slots=slots,
        accesses=counters["accesses"],
        hits=counters["hits"],
        hit_rate=counters["hits"] / counters["accesses"] if counters["accesses"] else 0.0,
        seconds=seconds,
        tokens=tokens,
        stall_s_per_token=stall / tokens,
        time_s_per_token=now / tokens,
        tokens_per_s=tokens / now if now else math.inf,
        bytes_moved=sum(per_link.values()),
        bytes_per_link=per_link,
        prefetch=_prefetch_summary(stats, tier),
    )
    if bound_loads is not None:
        bound = timed_bound(trace, timing, bound_loads)
        row_out.bound_s_per_token = bound / tokens
        row_out.bound_ratio = now / bound if bound else math.inf
    return row_out


def _prefetch_summary(stats: dict, tier: str) -> dict | None:
    """Prediction precision/recall and what the prefetches it caused were worth."""
    prefetch = stats["prefetch"]
    if "predictor" not in prefetch:
        return None
    counters = stats["tiers"][tier]
    used, wasted = counters["prefetch_used"], counters["prefetch_wasted"]
    misses = counters["accesses"] - counters["hits"]
    return {
        "predictor": prefetch["predictor"],
        "precision": prefetch["precision"],
        "recall": prefetch["recall"],
        "prefetches_used": used,
        "prefetches_wasted": wasted,
        "prefetches_cancelled": prefetch["cancelled"],
        "useful_share": used / (used + wasted) if used + wasted else 0.0,
        "coverage": used / (used + misses) if used + misses else 0.0,
    }


def timed_bound(trace: Trace, timing: TimingModel, bound_loads: int) -> float:
    """``max(total compute, Belady's loads x expert bytes / link bandwidth)`` in seconds.

    No schedule, prefetching or not, loads fewer experts than Belady's MIN at the
    same capacity, and the link moves one expert at a time; compute is serial.
    With a cold host tier of limited size, its NVMe loads bound the time as well.
    """
    compute = len(trace) * timing.layer_s
    link_s = timing.h2d_s() if timing.has_device else timing.load_s()
    bound = max(compute, bound_loads * link_s)
    if timing.has_device and timing.host_slots is not None:
        host = replay_hits(trace, BOUND_POLICY, timing.host_slots)
        bound = max(bound, (host.accesses - host.hits) * timing.load_s())
    return bound


# Peer systems' rows (`--policy advised-mmap`): what a user without expertd runs, as the same
# simulator sees it. An advised mmap and llama.cpp (mmap) read on demand into the page cache,
# whose eviction is LRU-like; neither prefetches past the layer in hand.
PEERS = {"advised-mmap": "lru", "llama.cpp": "lru"}


def resolve_spec(spec: str) -> tuple[str, PrefetchConfig | None]:
    """A row name as (policy, its own prefetch settings or None): peers, ``default``, policies."""
    if spec in PEERS:
        return PEERS[spec], PrefetchConfig()  # demand reads only, whatever --predictor says
    return resolve_default(spec)


def sweep(
    trace: Trace,
    policies: list[str],
    capacities: list[int],
    *,
    timing: TimingModel | None = None,
    prefetch: PrefetchConfig | None = None,
    progress: Callable[[str], None] | None = None,
    predictor_state: Mapping[str, Any] | None = None,
) -> list[ReplayRow]:
    """Every policy at every capacity (slots), each row with its Belady bound.

    ``default`` names expertd's default configuration (`expertd.daemon.core.defaults`): its
    device policy with its own prefetch settings; ``prefetch`` applies to the others.
    """
    for spec in policies:
        policy_class(parse_spec(resolve_spec(spec)[0])[0])  # fail early on unknown names
    keys = trace.keys()
    rows: list[ReplayRow] = []
    for slots in capacities:
        bound = replay_hits(trace, BOUND_POLICY, slots, keys)
        for spec in policies:
            if progress:
                progress(f"{spec} at {slots} slots")
            try:
                policy, own_prefetch = resolve_spec(spec)
                if timing is None:
                    row = bound if spec == BOUND_POLICY else replay_hits(trace, policy, slots, keys)
                else:
                    loads = bound.accesses - bound.hits
                    row = replay_timed(
                        trace, policy, slots, timing, prefetch=own_prefetch or prefetch, bound_loads=loads,
                        predictor_state=predictor_state,
                    )  # fmt: skip
                row.policy = spec
            except PolicyError as exc:  # e.g. lru-per-layer with fewer slots than layers
                fraction = slots / geometry_of(trace).num_keys
                row = ReplayRow(spec, fraction, slots, len(keys), 0, 0.0, 0.0, error=str(exc))
            row.bound_hit_rate = bound.hit_rate
            rows.append(row)
    return rows
