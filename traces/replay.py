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
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from expertd.daemon.core.cache_core import CacheCore, Isolation
from expertd.daemon.core.defaults import DEFAULT_NAME
from expertd.daemon.core.defaults import resolve as resolve_default
from expertd.daemon.core.events import (
    AUTO,
    DEVICE,
    H2D,
    HOST,
    LOAD,
    Command,
    ErrorReply,
    Reply,
    StartTransfer,
)
from expertd.daemon.core.manager import ManagerConfig
from expertd.daemon.core.prefetch import PrefetchConfig
from expertd.policies.base import Geometry, PolicyError
from expertd.policies.registry import make_policy, parse_spec, policy_class
from expertd.traces.timing import TimingModel
from expertd.traces.trace import Trace

BOUND_POLICY = "belady"
REPLAY_CLIENT = "replay"  # the one client of a replay without tenants
PRIVATE_SEED = 0  # private tenants' drawn waits: reproducible in replay


class ReplayError(ValueError):
    """A replay cannot run as asked (capacity, policy or timing out of range)."""


class RowUnavailable(ReplayError):
    """One row cannot run here (e.g. a peer that computes on the CPU, on a profile without host
    compute): the row says why, the others run."""


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
    tenants: dict | None = None  # timed mode with tenants: each one's acquires, accesses, hits
    # ... and private tenants' replies timed to the grid: "drawn" (its own cache would have
    # missed what the shared one hit) and "real" (it missed for real)
    private_replies: dict | None = None
    # timed mode with host compute (a profile with host_gbps): where the experts were computed
    seconds_per_token: float | None = None  # = time_s_per_token
    host_computed: int | None = None  # expert passes computed on the host
    copied: int | None = None  # experts copied host -> device
    copy_bound_ratio: float | None = None  # against the copy-only bound (bound_ratio: the hybrid oracle)

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
    placement: bool = False,
    round_trips: bool = True,
    tenants: Mapping[str, Isolation] | None = None,
    observe: Callable[[str, Reply], None] | None = None,
) -> ReplayRow:
    """Timed mode: the cache manager, a virtual clock and the links of ``timing``.

    ``prefetch``: the manager's predictor and prefetch settings (None: demand loads only);
    ``predictor_state``: statistics its predictor starts from (a warm start);
    ``hints``: client gate hints, ``hints(row)`` -> the ``(layer, experts)`` the client
    hints right after row ``row``'s acquire (as a client does once it has the layer's
    hidden state). Recorded traces carry no hidden states, so only a simulation can supply
    them (bench/hint_sensitivity.py).
    ``placement``: acquire ``auto``, the manager placing each expert with ``timing``'s cost model;
    host-placed experts compute on the host while the device computes the rest of the layer.
    ``round_trips``: each acquire pays ``timing``'s client/daemon round trip (an in-process
    system, such as the peers in `expertd.traces.peers`, pays none).
    ``tenants``: name -> isolation; the trace's requests are dealt to them in turn (request
    r to the (r mod n)-th), one client each, as a daemon with those ``[tenants]`` would
    serve them (`CacheCore`); None: one shared client. ``observe(client, reply)``: every
    reply, in the order the acquires were answered.
    """
    prefetch = prefetch or PrefetchConfig()
    geometry = geometry_of(trace)
    keys = trace.keys()
    num_keys = geometry.num_keys
    tier = DEVICE if timing.has_device else HOST
    if placement and not timing.has_host_compute:
        raise ReplayError("placing experts on the host needs a profile with host compute and a device")
    if timing.has_device:
        host_slots = timing.host_slots or num_keys
        config = ManagerConfig(
            geometry, host_slots=host_slots, device_slots=slots, host_policy=host_policy,
            device_policy=policy, load_depth=1, h2d_depth=1, lease_timeout_s=math.inf,
            expert_bytes=timing.expert_bytes, prefetch=prefetch,
            **({"placement": timing.placement()} if placement else {}),
        )  # fmt: skip
    else:
        config = ManagerConfig(
            geometry, host_slots=slots, host_policy=policy, load_depth=1,
            lease_timeout_s=math.inf, expert_bytes=timing.expert_bytes, prefetch=prefetch,
        )  # fmt: skip
    _check_tenants(tenants, timing)
    started = time.perf_counter()
    clock = [0.0]  # the virtual time of the event being handled
    core = CacheCore(config, tenants, clock=lambda: clock[0], rng=random.Random(PRIVATE_SEED))
    clients = list(tenants) if tenants else [REPLAY_CLIENT]
    for client in clients:
        core.connect(client, client if tenants else "default", 0.0)
    if predictor_state is not None and config.prefetch.predictor:
        core.partitions.load_predictor_state(predictor_state)
    if timing.has_device and timing.host_slots is None:
        core.partitions.shared.preload(HOST, range(num_keys))  # warm host: RAM holds every expert
    cache = core.tiers[tier].policy
    if cache.offline:
        cache.prepare(keys)

    duration = {LOAD: timing.load_s(), H2D: timing.h2d_s() if timing.has_device else 0.0}
    events: list[tuple[float, int, int]] = []  # (finish time, seq, transfer id)
    replies: list[Reply] = []
    seq = 0

    def run(commands: Iterable[Command], at: float) -> None:
        nonlocal seq
        for command in commands:
            if isinstance(command, StartTransfer):
                seq += 1
                heapq.heappush(events, (at + duration[command.link], seq, command.transfer_id))
            elif isinstance(command, Reply):
                replies.append(command)
            elif isinstance(command, ErrorReply):
                raise ReplayError(f"replay acquire failed: {command.code}: {command.message}")

    def finish_next() -> float:
        """The next transfer finishes or held reply leaves, whichever comes first: its time."""
        due = core.next_due()
        if events and (due is None or events[0][0] <= due):
            at, _, transfer_id = heapq.heappop(events)
            clock[0] = at
            run(core.transfer_done(transfer_id, True, "", at), at)
            return at
        assert due is not None
        clock[0] = due
        for reply, release in core.due(due):
            replies.append(reply)
            core.sent(release, due)
        return due

    layers = trace.layer.tolist()
    experts = trace.experts.tolist()
    requests = trace.request.tolist()
    now = stall = 0.0
    host_computed = 0
    asked = AUTO if placement else tier
    hit_s, socket_s = (timing.acquire_hit_s, timing.acquire_socket_s) if round_trips else (0.0, 0.0)
    leases: dict[str, list[int]] = {client: [] for client in clients}
    for row, (layer, row_experts, request) in enumerate(zip(layers, experts, requests, strict=True)):
        while events and events[0][0] <= now:
            finish_next()
        clock[0] = now
        client = clients[request % len(clients)]
        if row and request != requests[row - 1]:
            previous = requests[row - 1]
            core.end_generation(clients[previous % len(clients)], previous)
        run(core.acquire(client, row, layer, row_experts, asked, now, leases[client], request), now)
        if hints is not None:
            for hint_layer, hint_experts in hints(row):
                run(core.hint(client, hint_layer, hint_experts, now, generation=request), now)
        ready = now
        while not replies:
            if not events and core.next_due() is None:
                raise ReplayError(f"row {row}: acquire cannot complete (capacity {slots} too small?)")
            ready = finish_next()
        reply = replies.pop()
        if observe is not None:
            observe(client, reply)
        leases[client] = [reply.lease_id]
        stall += ready - now
        on_host = reply.host_computed if placement else 0  # without a device, layer_s is the host's
        host_computed += on_host
        trip = hit_s if reply.hits == len(row_experts) and ready == now else socket_s
        now = ready + trip + timing.layer_end_s(on_host)
    seconds = time.perf_counter() - started

    stats = core.stats()
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
        tenants=core.tenant_stats() if tenants else None,
        private_replies={k: n for k, (n, _) in core.timing.grid_points.items()} if tenants else None,
    )
    if timing.has_device:
        row_out.seconds_per_token = row_out.time_s_per_token
        row_out.host_computed = host_computed
        row_out.copied = stats["links"][H2D]["started"]
    if bound_loads is not None:
        set_bound(row_out, trace, timing, bound_loads, now)
    return row_out


def set_bound(row: ReplayRow, trace: Trace, timing: TimingModel, bound_loads: int, total_s: float) -> None:
    """``row``'s bound: the hybrid oracle where the host computes, else the copy-only bound."""
    from expertd.traces.peers import hybrid_oracle_s

    tokens = row.tokens or 1
    bound = copy_bound = timed_bound(trace, timing, bound_loads)
    if timing.has_host_compute:
        bound = hybrid_oracle_s(trace, timing, row.slots)
        row.copy_bound_ratio = total_s / copy_bound if copy_bound else math.inf
    row.bound_s_per_token = bound / tokens
    row.bound_ratio = total_s / bound if bound else math.inf


def _check_tenants(tenants: Mapping[str, Isolation] | None, timing: TimingModel) -> None:
    partitioned = any(p.isolation == "partitioned" for p in (tenants or {}).values())
    if partitioned and timing.has_device and timing.host_slots is None:
        raise ReplayError("partitioned tenants need a host tier of a given size (--host-capacity)")


def parse_tenants(spec: str) -> dict[str, Isolation]:
    """``"a,b:partitioned:0.5,c:private"`` -> name -> isolation (shared, share 1 unless given)."""
    out: dict[str, Isolation] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, rest = item.partition(":")
        mode, _, share = rest.partition(":")
        if not name or name in out:
            raise ReplayError(
                f"--tenants {item!r}: each tenant needs a name of its own (NAME[:MODE[:SHARE]])"
            )
        try:
            out[name] = Isolation(mode or "shared", float(share) if share else 1.0)
        except ValueError as exc:  # a share that is no number, a mode that is none
            raise ReplayError(f"--tenants {item!r}: {exc}") from None
    if not out:
        raise ReplayError(f"--tenants {spec!r} names no tenant")
    return out


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


def sweep(
    trace: Trace,
    policies: list[str],
    capacities: list[int],
    *,
    timing: TimingModel | None = None,
    prefetch: PrefetchConfig | None = None,
    progress: Callable[[str], None] | None = None,
    predictor_state: Mapping[str, Any] | None = None,
    tenants: Mapping[str, Isolation] | None = None,
) -> list[ReplayRow]:
    """Every policy at every capacity (slots), each row with its Belady bound.

    ``tenants`` (timed mode only): the trace's requests dealt to these tenants (`replay_timed`).

    ``default`` names expertd's default configuration (`expertd.daemon.core.defaults`): its
    device policy with its own prefetch settings; ``prefetch`` applies to the others. Timed
    on a profile with host compute, ``default`` acquires ``auto`` (the manager places each
    expert). The names in `expertd.traces.peers.PEERS` (timed only) are other systems' rows.
    """
    from expertd.traces.peers import PEERS, run_peer

    if tenants and timing is None:
        raise ReplayError("tenants need --timed: isolation is a matter of time and of shared slots")
    for spec in policies:
        if spec not in PEERS:
            policy_class(parse_spec(resolve_default(spec)[0])[0])  # fail early on unknown names
    keys = trace.keys()
    rows: list[ReplayRow] = []
    for slots in capacities:
        bound = replay_hits(trace, BOUND_POLICY, slots, keys)
        for spec in policies:
            if progress:
                progress(f"{spec} at {slots} slots")
            try:
                hybrid = spec == DEFAULT_NAME and timing is not None and timing.has_host_compute
                policy, own_prefetch = resolve_default(spec, hybrid)
                loads = bound.accesses - bound.hits
                if spec in PEERS:
                    if timing is None:
                        raise RowUnavailable(f"{spec} is another system's row: it needs --timed")
                    row = run_peer(spec, trace, slots, timing, loads)
                elif timing is None:
                    row = bound if spec == BOUND_POLICY else replay_hits(trace, policy, slots, keys)
                else:
                    row = replay_timed(
                        trace, policy, slots, timing, prefetch=own_prefetch or prefetch, bound_loads=loads,
                        predictor_state=predictor_state, tenants=tenants, placement=hybrid,
                    )  # fmt: skip
                row.policy = spec
            except (PolicyError, RowUnavailable) as exc:  # e.g. lru-per-layer with fewer slots than layers
                fraction = slots / geometry_of(trace).num_keys
                row = ReplayRow(spec, fraction, slots, len(keys), 0, 0.0, 0.0, error=str(exc))
            row.bound_hit_rate = bound.hit_rate
            rows.append(row)
    return rows
