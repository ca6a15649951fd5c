"""The timing model of `replay --timed`: hardware profiles and models' expert sizes.

Stated and never kinder than reality (DESIGN.md, "Timing model"): each link moves
one expert at a time at the profile's bandwidth; a layer computes for
``compute_s`` once its experts are resident; a token's layers run in order.
Per-layer compute comes from the profile: the bytes one token touches (its
active parameters) over the MoE layers, divided by device memory bandwidth,
plus a fixed per-layer overhead -- or a fixed ``--layer-ms``.

Host compute (issue 15): an expert placed on the host is computed by the CPU from RAM in
``expert bytes / host_gbps`` seconds (a batch-1 pass reads the expert once; the host's
experts of one layer run one after another, each on all ``host_cores``), while the device
computes the rest of the layer (the layer's time less those experts' device passes); the
layer ends when both end. Each acquire of expertd's rows pays a client/daemon round trip
(``acquire_hit_us`` when every expert was ready on the device, else ``acquire_socket_us``).

Where each figure comes from (docs/benchmarks.md has the runs):
- h2d: PCIe 4.0 x16 is 31.5 GB/s raw per direction; 25 GB/s is what pinned copies reach
  (bench/h2d_bandwidth.py on the H100 reached its PCIe 5.0 figure, docs/gpu.md).
- host_gbps: a batch-1 expert pass is bound by reading the expert from RAM. Peak RAM
  bandwidth is the JEDEC transfer rate x 8 bytes x channels: dual-channel DDR5-5600 (a
  desktop) 89.6 GB/s, 8-channel DDR5-4800 (a server) 307 GB/s. We take 60% of peak as
  what the pass reaches (bench/cpu_expert.py on this shared 2-core VM measured a
  Mixtral-shaped bf16 pass at 0.59x its own buffer-copy bandwidth); run that bench on the
  target machine and pass ``--host-gbps`` to replace it.
- acquire_*_us: bench/acquire_latency.py's p50 acquire + release through `ExpertClient`
  on this machine (docs/benchmarks.md: echo 165-190 us x ratio 1.23-1.46, so ~230 us;
  loaded). Until the shared-memory hit path (issue 17) lands, a hit pays the same.
"""

from __future__ import annotations

import dataclasses

from expertd.daemon.core.placement import PlacementConfig

GB = 1e9
MB = 1e6


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """Bandwidths of one machine; the numbers are public spec-sheet or measured figures."""

    name: str
    description: str
    h2d_gbps: float | None  # host -> device link; None: no device tier (compute from RAM)
    nvme_gbps: float  # store -> host reads
    mem_gbps: float  # memory bandwidth of whatever runs the experts
    layer_overhead_ms: float  # launch and non-bandwidth cost per layer
    host_gbps: float | None = None  # a batch-1 expert pass on the host CPU; None: no host compute
    host_cores: int = 0  # the cores that pass runs on
    host_knee_tokens: float = 4.0  # tokens a host pass takes before it is compute-bound
    acquire_socket_us: float = 0.0  # one acquire's client/daemon round trip over the socket
    acquire_hit_us: float = 0.0  # ... when every expert is ready on the device (the hit path)

    def describe(self) -> str:
        h2d = f"h2d {self.h2d_gbps:g} GB/s" if self.h2d_gbps else "no device tier"
        host = f", host {self.host_gbps:g} GB/s on {self.host_cores} cores" if self.host_gbps else ""
        return (
            f"{self.name}: {self.description}; {h2d}, NVMe {self.nvme_gbps:g} GB/s, "
            f"memory {self.mem_gbps:g} GB/s, +{self.layer_overhead_ms:g} ms/layer{host}, "
            f"acquire {self.acquire_socket_us:g} us"
        )


DESKTOP_DDR5_GBPS = 2 * 8 * 5.6  # dual-channel DDR5-5600: 89.6 GB/s peak
SERVER_DDR5_GBPS = 8 * 8 * 4.8  # 8-channel DDR5-4800: 307.2 GB/s peak
HOST_PASS_SHARE = 0.6  # of peak RAM bandwidth a batch-1 expert pass reaches (see above)
ACQUIRE_US = 230.0  # bench/acquire_latency.py p50 on this machine (see above)


PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        HardwareProfile(
            "pcie4",
            "consumer GPU on PCIe 4.0 x16 (RTX 4090 class, 1 TB/s GDDR6X), PCIe 4.0 NVMe, "
            "16-core desktop CPU on dual-channel DDR5-5600",
            h2d_gbps=25.0,
            nvme_gbps=7.0,
            mem_gbps=1000.0,
            layer_overhead_ms=0.05,
            host_gbps=round(HOST_PASS_SHARE * DESKTOP_DDR5_GBPS, 1),
            host_cores=16,
            acquire_socket_us=ACQUIRE_US,
            acquire_hit_us=ACQUIRE_US,
        ),
        HardwareProfile(
            "h100-pcie5",
            "H100 PCIe on PCIe 5.0 x16 (2.0 TB/s HBM2e), PCIe 5.0 NVMe, "
            "server CPU (32 cores) on 8-channel DDR5-4800",
            h2d_gbps=55.0,
            nvme_gbps=14.0,
            mem_gbps=2000.0,
            layer_overhead_ms=0.02,
            host_gbps=round(HOST_PASS_SHARE * SERVER_DDR5_GBPS, 1),
            host_cores=32,
            host_knee_tokens=8.0,
            acquire_socket_us=ACQUIRE_US,
            acquire_hit_us=ACQUIRE_US,
        ),
        HardwareProfile(
            "cpu-nvme",
            "CPU-only host (dual-channel DDR5) computing from RAM, reading a PCIe 4.0 NVMe",
            h2d_gbps=None,
            nvme_gbps=7.0,
            mem_gbps=80.0,
            layer_overhead_ms=0.05,
        ),
    )
}
DEFAULT_PROFILE = "pcie4"


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Byte sizes of a model that a trace's geometry alone does not give."""

    expert_bytes: int  # one routed expert, as the checkpoint stores it
    active_bytes_per_token: int  # every weight byte one token touches (experts included)
    note: str


# Keyed by a lowercase substring of the trace's model name; first match wins.
MODEL_SIZES: dict[str, ModelSize] = {
    "llama-4-maverick": ModelSize(
        3 * 5120 * 8192 * 2, 17_000_000_000 * 2, "hidden 5120, expert ffn 8192, bf16; 17B active"
    ),
    "mixtral-8x7b": ModelSize(
        3 * 4096 * 14336 * 1,
        12_900_000_000 * 1,
        "hidden 4096, ffn 14336, FP8 experts (the trace's neuralmagic FP8 model); 12.9B active",
    ),
    "granite-3.0-1b-a400m": ModelSize(
        3 * 1024 * 512 * 2, 400_000_000 * 2, "hidden 1024, expert ffn 512, f16; 400M active"
    ),
    "deepseek-v2-lite": ModelSize(
        3 * 2048 * 1408 * 2,
        2_400_000_000 * 2,
        "hidden 2048, expert ffn 1408, bf16; 2.4B active (2 shared + 6 of 64 routed experts)",
    ),
}


def model_size(model: str) -> ModelSize | None:
    """The known sizes of ``model`` (matched by substring), or None."""
    lowered = model.lower()
    for pattern, size in MODEL_SIZES.items():
        if pattern in lowered:
            return size
    return None


@dataclasses.dataclass(frozen=True)
class TimingModel:
    """Everything `replay --timed` needs besides the trace and the policy."""

    expert_bytes: int
    h2d_gbps: float | None  # None: no device tier; acquires are served from host slots
    nvme_gbps: float
    layer_s: float  # compute time of one MoE layer for one token
    host_slots: int | None = None  # None: the host holds every expert, warm from the start
    host_gbps: float | None = None  # a batch-1 host pass over an expert; None: no host compute
    device_gbps: float = 1000.0  # device memory bandwidth (an expert's pass on the device)
    host_knee_tokens: float = 4.0
    acquire_socket_s: float = 0.0  # an acquire's round trip over the socket
    acquire_hit_s: float = 0.0  # ... when every expert was ready on the device

    def __post_init__(self) -> None:
        if self.expert_bytes <= 0:
            raise ValueError(f"expert size must be positive, got {self.expert_bytes} bytes")
        if self.h2d_gbps is not None and self.h2d_gbps <= 0:
            raise ValueError(f"h2d bandwidth must be positive, got {self.h2d_gbps} GB/s")
        if self.nvme_gbps <= 0:
            raise ValueError(f"NVMe bandwidth must be positive, got {self.nvme_gbps} GB/s")
        if self.layer_s < 0:
            raise ValueError(f"layer time must be >= 0, got {self.layer_s} s")
        if self.host_gbps is not None and self.host_gbps <= 0:
            raise ValueError(f"host compute bandwidth must be positive, got {self.host_gbps} GB/s")
        if self.device_gbps <= 0:
            raise ValueError(f"device bandwidth must be positive, got {self.device_gbps} GB/s")
        if self.acquire_socket_s < 0 or self.acquire_hit_s < 0:
            raise ValueError("acquire round trips must be >= 0")

    @property
    def has_host_compute(self) -> bool:
        return self.host_gbps is not None and self.h2d_gbps is not None

    def host_expert_s(self) -> float:
        """One batch-1 host pass over an expert."""
        assert self.host_gbps is not None
        return self.expert_bytes / (self.host_gbps * GB)

    def device_expert_s(self) -> float:
        """One batch-1 device pass over an expert (part of ``layer_s``)."""
        return self.expert_bytes / (self.device_gbps * GB)

    def layer_end_s(self, host_experts: int) -> float:
        """A layer with ``host_experts`` computed on the host: device and host overlap."""
        if not host_experts:
            return self.layer_s
        device = max(0.0, self.layer_s - host_experts * self.device_expert_s())
        return max(device, host_experts * self.host_expert_s())

    def placement(self) -> PlacementConfig:
        """The cost model the cache manager places ``auto`` acquires with, on this hardware."""
        assert self.h2d_gbps is not None and self.host_gbps is not None
        return PlacementConfig(
            h2d_gbps=self.h2d_gbps,
            host_gbps=self.host_gbps,
            device_gbps=self.device_gbps,
            host_knee_tokens=self.host_knee_tokens,
        )

    @property
    def has_device(self) -> bool:
        return self.h2d_gbps is not None

    def h2d_s(self) -> float:
        assert self.h2d_gbps is not None
        return self.expert_bytes / (self.h2d_gbps * GB)

    def load_s(self) -> float:
        return self.expert_bytes / (self.nvme_gbps * GB)


def build_timing(
    *,
    model: str,
    num_layers: int,
    profile: str = DEFAULT_PROFILE,
    expert_mb: float | None = None,
    h2d_gbps: float | None = None,
    nvme_gbps: float | None = None,
    layer_ms: float | None = None,
    host_slots: int | None = None,
    recorded_expert_bytes: int | None = None,
    top_k: int = 1,
    host_gbps: float | None = None,
    acquire_us: float | None = None,
    acquire_hit_us: float | None = None,
) -> TimingModel:
    """A `TimingModel` from a profile, the model's known sizes, and explicit overrides.

    ``recorded_expert_bytes``: the expert size a recorded trace carries (``expertd.traces.record``
    writes it); for a model not in `MODEL_SIZES`, compute is then estimated from the experts
    alone (``top_k`` experts' bytes per layer over memory bandwidth): a floor, since attention
    and dense layers are not counted. ``host_gbps`` / ``acquire_us`` replace the profile's host
    pass bandwidth and acquire round trip (both the socket's and the hit path's, unless
    ``acquire_hit_us`` gives the hit path's).
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (known: {', '.join(PROFILES)})")
    hw = PROFILES[profile]
    size = model_size(model)
    if expert_mb is not None:
        expert_bytes = int(expert_mb * MB)
    elif size is not None:
        expert_bytes = size.expert_bytes
    elif recorded_expert_bytes:
        expert_bytes = recorded_expert_bytes
    else:
        raise ValueError(f"expert size of model {model!r} is unknown: pass --expert-mb")
    if layer_ms is not None:
        layer_s = layer_ms / 1e3
    elif size is not None:
        layer_s = size.active_bytes_per_token / num_layers / (hw.mem_gbps * GB)
        layer_s += hw.layer_overhead_ms / 1e3
    elif recorded_expert_bytes:
        layer_s = top_k * expert_bytes / (hw.mem_gbps * GB) + hw.layer_overhead_ms / 1e3
    else:
        raise ValueError(f"compute time of model {model!r} is unknown: pass --layer-ms")
    return TimingModel(
        expert_bytes=expert_bytes,
        h2d_gbps=h2d_gbps if h2d_gbps is not None else hw.h2d_gbps,
        nvme_gbps=nvme_gbps if nvme_gbps is not None else hw.nvme_gbps,
        layer_s=layer_s,
        host_slots=host_slots,
        host_gbps=host_gbps if host_gbps is not None else hw.host_gbps,
        device_gbps=hw.mem_gbps,
        host_knee_tokens=hw.host_knee_tokens,
        acquire_socket_s=(acquire_us if acquire_us is not None else hw.acquire_socket_us) / 1e6,
        acquire_hit_s=_first(acquire_hit_us, acquire_us, hw.acquire_hit_us) / 1e6,
    )


def _first(*values: float | None) -> float:
    """The first of ``values`` that is not None."""
    return next(v for v in values if v is not None)


def copy_only(timing: TimingModel) -> TimingModel:
    """``timing`` without host compute: every miss is copied, rows are measured against the
    copy-only bound (the regime docs/prefetch.md's tables study; pair it with ``round_trips=False``
    for an in-process client, as they were measured)."""
    return dataclasses.replace(timing, host_gbps=None)
