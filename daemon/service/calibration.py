"""Host compute calibration at start: how fast this machine's CPU threads run a batch-1 pass
of the store's expert shape (`expertd.daemon.service.host_compute.measure_host_gbps`), the
figure tier="auto" placement weighs against a copy.

``[placement] host_gbps`` gives it instead; ``calibrate`` says when to measure (auto: with a
CUDA device tier, where torch is loaded anyway). `expertd status` and the metrics show it.

Threads (`compute_threads`): the cores this process may run on, minus the reader threads
(``[transfers] load_threads``: they fill host slots while clients compute), minus one for
the thread that drives the device; never fewer than one. Clients on this machine default
to the same rule (`expertd.client.host_compute`), so the measured figure is theirs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from expertd.daemon.core.placement import PlacementConfig

log = logging.getLogger("expertd")


@dataclasses.dataclass(frozen=True)
class HostCompute:
    """The host compute figure the daemon places with, and where it came from."""

    gbps: float  # expert bytes per second of a batch-1 pass, in GB/s; 0: no host placement
    source: str  # "measured", "config", "off" or "failed"
    threads: int  # CPU threads a client computes host-placed experts on
    reader_threads: int  # the daemon's store readers, which clients must leave their cores
    seconds: float = 0.0  # how long the measurement took

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compute_threads(cfg: Any) -> int:
    """``[placement] threads``, or the cores the readers and the device's driver leave (>= 1)."""
    if cfg.placement_threads:
        return int(cfg.placement_threads)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - (cfg.transfers_load_threads or 1) - 1)


def expert_shape(tensors: Any) -> tuple[int, int]:
    """(hidden D, FFN F) of an expert from its store tensors: D is the dimension every matrix
    shares (gate/up [F, D], down [D, F], fused gate_up [2F, D] either way round; when both are
    shared, the first matrix is a gate [out F, in D]); F makes up the rest of the expert's
    elements as three D x F matrices."""
    matrices = [tuple(t.shape) for t in tensors if len(t.shape) == 2]
    if not matrices:
        raise ValueError("the store's expert has no 2-D tensor to calibrate a pass on")
    common = set(matrices[0]).intersection(*matrices[1:])
    hidden = common.pop() if len(common) == 1 else matrices[0][1]
    elements = sum(a * b for a, b in matrices)
    return hidden, max(1, round(elements / (3 * hidden)))


def calibrate(cfg: Any, manifest: Any, *, device: str, measure: Any = None) -> HostCompute:
    """The figure this daemon places with: configured, measured now, or none."""
    threads, readers = compute_threads(cfg), cfg.transfers_load_threads or 1
    if cfg.placement_host_gbps is not None:
        return HostCompute(float(cfg.placement_host_gbps), "config", threads, readers)
    wanted = cfg.placement_calibrate == "on" or (cfg.placement_calibrate == "auto" and device == "cuda")
    if not wanted or device == "off":
        return HostCompute(0.0, "off", threads, readers)
    hidden, ffn = expert_shape(manifest.tensors)
    if measure is None:
        from expertd.daemon.service.host_compute import measure_host_gbps as measure
    started = time.perf_counter()
    dtype = manifest.dtype if manifest.dtype in ("bfloat16", "float16", "float32") else "bfloat16"
    try:
        run = measure(
            hidden, ffn, dtype=dtype, threads=threads, passes=cfg.placement_calibrate_passes,
            working_set_bytes=cfg.placement_calibrate_mib << 20,
        )  # fmt: skip
        gbps = float(run.gbps)
    except Exception as exc:  # serve without host placement rather than not at all
        log.warning(
            "host compute calibration failed (%s: %s): auto acquires go to the device",
            type(exc).__name__,
            exc,
        )
        return HostCompute(0.0, "failed", threads, readers, time.perf_counter() - started)
    took = time.perf_counter() - started
    if not gbps > 0 or gbps != gbps or gbps == float("inf"):
        log.warning("host compute calibration measured %r GB/s: auto acquires go to the device", gbps)
        return HostCompute(0.0, "failed", threads, readers, took)
    log.info(
        "host compute: %.1f GB/s (a batch-1 pass of a %d x %d %s expert on %d thread(s), measured in %.2f s)",
        gbps, hidden, ffn, manifest.dtype, threads, took,
    )  # fmt: skip
    return HostCompute(gbps, "measured", threads, readers, took)


def placement_config(cfg: Any, host: HostCompute) -> PlacementConfig:
    """The cost model's bandwidths: the host figure, the configured link."""
    return PlacementConfig(
        h2d_gbps=cfg.placement_h2d_gbps,
        host_gbps=host.gbps,
        device_gbps=cfg.placement_device_gbps,
        host_threads=host.threads,
    )
