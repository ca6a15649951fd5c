"""Where each expert of an ``auto`` acquire is computed: on the device, or on the host from RAM.

A device miss can be copied over the host-to-device link and computed there (the
acquire waits for the copy), computed on the host's CPU straight from its host slot (no
wait: a batch-1 expert pass reads the expert once from RAM, faster than pushing it over
PCIe), or both: computed on the host now and copied in the background for later tokens.
`place` chooses from a cost model of one layer: the layer ends when the device part
(its wait for copies, then its compute) and the host part (the host-placed experts, one
after another: they share the host's memory bandwidth) both end. A batch of tokens is
compute-bound on a CPU (``host_knee_tokens``) and belongs on the device; a one-off miss
belongs on the host; a miss expected back soon is copied while the host computes it.
Pure: numbers in, a decision out; `plan_auto` applies it to the cache manager's tiers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from expertd.daemon.core.events import DEVICE, H2D, HOST

if TYPE_CHECKING:
    from expertd.daemon.core.manager import CacheManager

GB = 1e9
COPY = "copy"  # copy to the device and wait, compute there
ON_HOST = "host"  # compute on the host now
HOST_AND_COPY = "host+copy"  # compute on the host now, copy to the device in the background
DECISIONS = (COPY, ON_HOST, HOST_AND_COPY)


@dataclasses.dataclass(frozen=True)
class PlacementConfig:
    """The bandwidths placement weighs; ``host_gbps`` 0 (the default): auto places on the device.

    ``host_gbps`` is measured (bench/cpu_expert.py's `measure_host_gbps`, or the daemon's
    calibration at start), never assumed: the bytes of one expert over the seconds of one
    batch-1 pass of it on ``host_threads`` threads.
    """

    h2d_gbps: float = 25.0  # host -> device link
    host_gbps: float = 0.0  # batch-1 expert pass on the host, expert bytes / second
    device_gbps: float = 1000.0  # device memory bandwidth (a batch-1 pass on the device)
    host_knee_tokens: float = 1.0  # tokens one host pass takes at ``host_gbps`` before compute binds
    device_knee_tokens: float = 64.0  # the same on the device
    reuse_tokens: float = 8.0  # copy in the background when the next use is expected within this many tokens
    host_threads: int = 0  # threads the host pass ran on (reported only; 0: unknown)

    def __post_init__(self) -> None:
        for name in ("h2d_gbps", "device_gbps", "host_knee_tokens", "device_knee_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"placement {name} must be > 0, got {getattr(self, name)}")
        if not self.host_gbps >= 0:
            raise ValueError(f"placement host_gbps must be >= 0, got {self.host_gbps}")
        if not self.reuse_tokens >= 0:
            raise ValueError(f"placement reuse_tokens must be >= 0, got {self.reuse_tokens}")

    @property
    def enabled(self) -> bool:
        """Can anything be computed on the host at all?"""
        return self.host_gbps > 0

    def copy_s(self, expert_bytes: int) -> float:
        return expert_bytes / (self.h2d_gbps * GB)

    def host_s(self, expert_bytes: int, tokens: int = 1) -> float:
        """One host pass over an expert for ``tokens`` tokens (memory-bound up to the knee)."""
        if not self.enabled:
            return math.inf
        return expert_bytes / (self.host_gbps * GB) * max(1.0, tokens / self.host_knee_tokens)

    def device_s(self, expert_bytes: int, tokens: int = 1) -> float:
        return expert_bytes / (self.device_gbps * GB) * max(1.0, tokens / self.device_knee_tokens)


@dataclasses.dataclass(frozen=True)
class Miss:
    """One expert of an acquire that is not ready on the device."""

    key: int
    tokens: int = 1  # tokens routed to it in this pass
    wait: float = math.inf  # expected layer computations until its next use (inf: none foreseen)
    on_host: bool = True  # ready in a host slot (else it must be loaded first: it goes to the device)


def place(
    misses: Sequence[Miss],
    config: PlacementConfig,
    expert_bytes: int,
    *,
    device_busy_s: float = 0.0,
    link_backlog_s: float = 0.0,
    reuse_within: float | None = None,
) -> list[str]:
    """The decision (`COPY`, `ON_HOST` or `HOST_AND_COPY`) for each miss of one layer.

    ``device_busy_s``: device compute the layer has anyway (its hits); ``link_backlog_s``:
    link time queued ahead of a copy made now; ``reuse_within``: a host-placed miss whose
    next use is expected within this many layer computations is also copied in the background
    (None: none is).
    The copies are the misses dearest on the host (most tokens first); their number is the
    one that ends the layer soonest, fewest copies on a tie.
    """
    if not misses:
        return []
    copy = config.copy_s(expert_bytes)
    host = [config.host_s(expert_bytes, m.tokens) if m.on_host else math.inf for m in misses]
    device = [config.device_s(expert_bytes, m.tokens) for m in misses]
    order = sorted(range(len(misses)), key=lambda i: device[i] - host[i])  # dearest on the host first
    best_time, best_copies = math.inf, len(misses)
    for copies in range(len(misses) + 1):
        chosen, rest = order[:copies], order[copies:]
        host_total = sum(host[i] for i in rest)
        wait = link_backlog_s + copies * copy if copies else 0.0
        end = wait + max(device_busy_s + sum(device[i] for i in chosen), host_total)
        if end < best_time:
            best_time, best_copies = end, copies
    copied = set(order[:best_copies])
    soon = -math.inf if reuse_within is None else reuse_within
    return [
        COPY if i in copied else HOST_AND_COPY if miss.wait <= soon else ON_HOST
        for i, miss in enumerate(misses)
    ]


@dataclasses.dataclass
class AutoPlan:
    """An ``auto`` acquire's keys split by where they are computed."""

    device: list[int]  # keys computed on the device (ready there, or copied and waited for)
    host: dict[int, int]  # key -> host slot it is computed from
    background: list[int]  # host-placed keys to copy to the device for later uses


def plan_auto(manager: CacheManager, keys: Sequence[int], tokens: int | Sequence[int] = 1) -> AutoPlan:
    """Place each of ``keys`` (one layer's) for an ``auto`` acquire on ``manager``'s tiers.

    Only a key ready in a host slot can be computed on the host; one the device has or is
    copying already stays on the device when waiting for it is no dearer than computing it.
    """
    config = manager.config.placement
    expert_bytes = manager.config.expert_bytes
    device, host = manager.tiers[DEVICE], manager.tiers[HOST]
    if not config.enabled or not expert_bytes:
        return AutoPlan(list(keys), {}, [])
    counts = [tokens] * len(keys) if isinstance(tokens, int) else list(tokens)
    if len(counts) != len(keys):
        raise ValueError(f"{len(counts)} token counts for {len(keys)} experts")
    waits = manager.prefetcher.waits() if manager.prefetcher is not None else None
    layers = manager.geometry.num_layers
    ready: list[int] = []
    busy = 0.0  # device compute of the experts ready there
    misses: list[Miss] = []
    for key, count in zip(keys, counts, strict=True):
        slot = device.slot_of.get(key)
        if slot is not None and slot not in device.filling:
            ready.append(key)
            busy += config.device_s(expert_bytes, count)
            continue
        wait = float(waits[key]) if waits is not None else math.inf
        misses.append(Miss(key, count, wait, host.ready(key)))
    backlog = manager.transfers.running[H2D] + manager.transfers.queued_demand(H2D)
    decisions = place(
        misses,
        config,
        expert_bytes,
        device_busy_s=busy,
        link_backlog_s=backlog * config.copy_s(expert_bytes),
        reuse_within=config.reuse_tokens * layers,
    )
    plan = AutoPlan(ready, {}, [])
    for miss, decision in zip(misses, decisions, strict=True):
        if decision == COPY:
            plan.device.append(miss.key)
        else:
            plan.host[miss.key] = host.slot_of[miss.key]
            if decision == HOST_AND_COPY and miss.key not in device.slot_of:
                plan.background.append(miss.key)
    return plan
