"""Start-up: everything the daemon opens before it serves, in order, undone in reverse on failure.

The store is opened, the slabs allocated (never more than the configured sizes), the cache
manager built over them, the sockets bound and the transfer engine started, all before
systemd hears ``READY=1``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from expertd.daemon.core import defaults
from expertd.daemon.core.cache_core import CacheCore
from expertd.daemon.core.events import DEVICE, HOST
from expertd.daemon.core.manager import ManagerConfig
from expertd.daemon.core.partitions import PartitionError, Partitions
from expertd.daemon.core.prefetch import PrefetchConfig
from expertd.daemon.service.calibration import HostCompute, calibrate, placement_config
from expertd.daemon.service.config import ServeConfig
from expertd.daemon.service.engine import TransferEngine, cpu_copier, cuda_copier
from expertd.daemon.service.faults import read_errors_from_env
from expertd.daemon.service.listener import Listener, StartupError, listen, share_slabs
from expertd.daemon.service.residency import Residency, void_stale_tables
from expertd.daemon.service.slabs import CpuDeviceSlab, CudaDeviceSlab, HostSlab, SlabError, clean_stale
from expertd.daemon.store.manifest import StoreManifest
from expertd.daemon.store.reader import StoreReader
from expertd.policies.base import Geometry

log = logging.getLogger("expertd")

TICK_S = 0.1  # lease expiry and watchdog granularity


@dataclasses.dataclass
class Parts:
    """What a started daemon holds; None until started (a start can fail half-way)."""

    closers: list[Any]  # undone in reverse at close
    reader: StoreReader | None = None
    manifest: StoreManifest | None = None
    host: HostSlab | None = None
    device: CpuDeviceSlab | CudaDeviceSlab | None = None
    core: CacheCore | None = None
    context: zmq.Context | None = None
    listener: Listener | None = None
    engine: TransferEngine | None = None
    metrics: Any = None  # the Prometheus endpoint, with [metrics] port
    host_compute: HostCompute | None = None  # what tier="auto" placement weighs ([placement])
    residency: Residency | None = None  # shared-memory hits: ipc:// and shared tenants only


def prefetch_settings(cfg: ServeConfig, hybrid: bool = False) -> PrefetchConfig:
    """The [prefetch] keys as the cache manager takes them (ValueError names a bad one).

    ``hybrid`` (host placement on): a ``share`` left at its default becomes the hybrid default's
    (`expertd.daemon.core.defaults.HYBRID_PREFETCH`): the link is idle while the host computes.
    """
    if hybrid and cfg.prefetch_share == defaults.PREFETCH["share"]:
        return PrefetchConfig.from_settings(cfg, share=defaults.HYBRID_PREFETCH["share"])
    return PrefetchConfig.from_settings(cfg)


def _top_k(manifest: Any) -> int:
    """Experts one token uses per layer, as the store recorded it (1 where it did not)."""
    top_k = manifest.source.get("top_k")
    if isinstance(top_k, int) and 0 < top_k <= manifest.num_experts:
        return top_k
    log.warning("the store does not record its model's top-k (packed by an older expertd): assuming 1")
    return 1


def tier_slots(key: str, size: Any, manifest: Any, top_k: int) -> int:
    """Slots of a tier of ``size``: at most one per expert of the store (logged when shrunk),
    and refused when one layer's top-k would not fit."""
    num_keys = manifest.num_layers * manifest.num_experts
    slot_bytes = manifest.slot_bytes
    asked = size.slots(slot_bytes)
    if asked < top_k:
        raise StartupError(
            f"[tiers] {key} {size} holds {asked} slot(s) of {slot_bytes} bytes; one layer's top-{top_k} "
            f"needs {top_k}: every acquire would fail"
        )
    if asked > num_keys:
        log.warning(
            "[tiers] %s %s is more than the store's %d experts (%.1f MiB): allocating %d slots",
            key, size, num_keys, num_keys * slot_bytes / 2**20, num_keys,
        )  # fmt: skip
        return num_keys
    return asked


def fast_path_allowed(cfg: ServeConfig) -> bool:
    """Shared-memory hits need a local client (ipc://) and no tenant that isolates its timing or
    its slots: a hit nobody sees would reopen the side channel `partitioned` and `private` close
    (docs/security.md)."""
    return cfg.address.startswith("ipc://") and all(t.isolation == "shared" for t in cfg.tenants.values())


def start_parts(cfg: ServeConfig, parts: Parts, clock: Callable[[], float] = time.monotonic) -> None:
    """Open the store, allocate the slabs, build the manager, bind the sockets, start the workers.

    Fills ``parts`` as it goes and appends everything opened to ``parts.closers``, so that
    the caller can undo a start that failed half-way.
    """
    closers = parts.closers
    void_stale_tables()  # a dead daemon's clients stop pinning from its tables
    removed = clean_stale()
    if removed:
        log.warning("removed %d stale shared-memory file(s) of dead daemons", len(removed))
    direct = {"auto": None, "on": True, "off": False}[cfg.transfers_direct_io]
    try:
        parts.reader = StoreReader(cfg.store, direct=direct)
    except Exception as exc:
        raise StartupError(f"cannot open store {cfg.store}: {exc}") from None
    closers.append(parts.reader)
    manifest = parts.manifest = parts.reader.manifest
    slot_bytes = manifest.slot_bytes
    top_k = _top_k(manifest)
    host_slots = tier_slots("host_size", cfg.tiers_host_size, manifest, top_k)
    # before the tiers: its weights are freed before the slabs take the memory budget
    parts.host_compute = host_compute = calibrate(cfg, manifest, device=cfg.tiers_device)
    try:
        host = parts.host = HostSlab("host", host_slots, slot_bytes)
        closers.append(host)
        device: CpuDeviceSlab | CudaDeviceSlab | None = None
        if cfg.tiers_device != "off":
            device_slots = tier_slots("device_size", cfg.tiers_device_size, manifest, top_k)
            if cfg.tiers_device == "cpu":
                device = CpuDeviceSlab("device", device_slots, slot_bytes)
            else:
                device = CudaDeviceSlab(device_slots, slot_bytes, cfg.tiers_cuda_device)
                host.pin_for_cuda()
            closers.append(device)
        parts.device = device
        if fast_path_allowed(cfg):
            sizes = {HOST: host.num_slots, **({DEVICE: device.num_slots} if device else {})}
            num_keys = manifest.num_layers * manifest.num_experts
            parts.residency = Residency(sizes, num_keys, cfg.clients_lease_timeout_s)
            closers.append(parts.residency)
        if cfg.auth_socket_group:
            tables = parts.residency.tables.values() if parts.residency else ()
            share_slabs(cfg.auth_socket_group, (host, device, *(t.shm for t in tables)))
    except SlabError as exc:
        raise StartupError(str(exc)) from None
    from expertd.policies.registry import parse_spec, policy_class

    for key, spec in (("host", cfg.policy_host), ("device", cfg.policy_device)):
        policy = policy_class(parse_spec(spec)[0])
        if policy.offline:
            raise StartupError(f"[policy] {key} = {spec!r} needs the future: it is for replay only")
        if policy.wants_estimates and cfg.prefetch_predictor == "none":
            log.warning(
                "[policy] %s = %r with [prefetch] predictor = 'none': the policy learns with a "
                "predictor of its own inside every acquire (slower hits); without prediction, choose lru",
                key,
                spec,
            )
    try:
        prefetch = prefetch_settings(cfg, hybrid=host_compute.gbps > 0 and device is not None)
    except ValueError as exc:
        raise StartupError(f"[prefetch]: {exc}") from None
    manager_config = ManagerConfig(
        Geometry(manifest.num_layers, manifest.num_experts),
        host_slots=host_slots,
        device_slots=device.num_slots if device else 0,
        host_policy=cfg.policy_host,
        device_policy=cfg.policy_device,
        load_depth=cfg.transfers_load_threads or 1,
        h2d_depth=cfg.transfers_h2d_depth or 1,
        lease_timeout_s=cfg.clients_lease_timeout_s,
        max_pending_per_client=cfg.clients_max_pending or 1,
        max_queued_prefetches=cfg.transfers_max_queued_prefetches,
        expert_bytes=manifest.raw_bytes,
        max_pinned_share=cfg.clients_max_pinned_share,
        min_pinned=top_k,
        capacity_wait_s=cfg.clients_capacity_wait_s,
        prefetch=prefetch,
        placement=placement_config(cfg, host_compute),
    )
    try:
        parts.core = CacheCore(manager_config, cfg.tenants, clock=clock)
    except PartitionError as exc:
        raise StartupError(f"[tenants]: {exc}") from None
    if cfg.prefetch_state is not None:
        from expertd.daemon.core.prefetch_state import StateError

        try:
            load_predictor_state(parts.core.partitions, cfg.prefetch_state, manifest.model)
        except StateError as exc:
            raise StartupError(f"[prefetch] state: {exc}") from None
    context = parts.context = zmq.Context()
    closers.append(context)
    listener = parts.listener = listen(context, cfg.address, cfg, closers, TICK_S)
    copier = None
    if isinstance(device, CpuDeviceSlab):
        copier = cpu_copier(host.slot, device.slot)
    elif isinstance(device, CudaDeviceSlab):
        copier = cuda_copier(host, device)
    engine = parts.engine = TransferEngine(
        context,
        listener.completion_address,
        read_expert=_read_expert(parts.reader),
        num_experts=manifest.num_experts,
        host_slot=host.slot,
        copy_to_device=copier,
        raw_bytes=manifest.raw_bytes,
        load_threads=cfg.transfers_load_threads or 1,
        h2d_depth=cfg.transfers_h2d_depth or 1,
        prepare_thread=parts.reader.prepare_thread,
        curve=listener.engine_curve,
    )
    engine.start()
    closers.append(engine)
    if cfg.metrics_port:
        from expertd.daemon.service.metrics import MetricsExporter, MetricsUnavailable

        try:
            parts.metrics = MetricsExporter(cfg.metrics_port, cfg.metrics_address)
        except MetricsUnavailable as exc:
            raise StartupError(str(exc)) from None
        closers.append(parts.metrics)
        log.info("metrics at http://%s:%d/metrics", cfg.metrics_address, parts.metrics.port)


def _read_expert(reader: StoreReader):
    try:
        return read_errors_from_env(reader.read_expert)
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def load_predictor_state(manager: Partitions, path: Path, model: str) -> None:
    """The statistics every tenant's predictor starts from; `StateError` naming the problem."""
    from expertd.daemon.core.prefetch_state import StateError, read_state
    from expertd.policies.base import PolicyError

    if manager.config.prefetch.predictor is None:
        raise StateError(f"{path}: loading statistics needs a predictor ([prefetch] predictor)")
    try:
        manager.load_predictor_state(read_state(path, model))
    except PolicyError as exc:
        raise StateError(f"{path}: {exc}") from None
    log.info("predictor statistics loaded from %s", path)
