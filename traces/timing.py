"""The timing model of `replay --timed`: hardware profiles and models' expert sizes.

Stated and never kinder than reality (DESIGN.md, "Timing model"): each link moves
one expert at a time at the profile's bandwidth; a layer computes for
``compute_s`` once its experts are resident; a token's layers run in order.
Per-layer compute comes from the profile: the bytes one token touches (its
active parameters) over the MoE layers, divided by device memory bandwidth,
plus a fixed per-layer overhead -- or a fixed ``--layer-ms``.
"""

from __future__ import annotations

import dataclasses

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

    def describe(self) -> str:
        h2d = f"h2d {self.h2d_gbps:g} GB/s" if self.h2d_gbps else "no device tier"
        return (
            f"{self.name}: {self.description}; {h2d}, NVMe {self.nvme_gbps:g} GB/s, "
            f"memory {self.mem_gbps:g} GB/s, +{self.layer_overhead_ms:g} ms/layer"
        )


PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        HardwareProfile(
            "pcie4",
            "consumer GPU on PCIe 4.0 x16 (RTX 4090 class, 1 TB/s GDDR6X), PCIe 4.0 NVMe",
            h2d_gbps=25.0,
            nvme_gbps=7.0,
            mem_gbps=1000.0,
            layer_overhead_ms=0.05,
        ),
        HardwareProfile(
            "h100-pcie5",
            "H100 PCIe on PCIe 5.0 x16 (2.0 TB/s HBM2e), PCIe 5.0 NVMe",
            h2d_gbps=55.0,
            nvme_gbps=14.0,
            mem_gbps=2000.0,
            layer_overhead_ms=0.02,
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

    def __post_init__(self) -> None:
        if self.expert_bytes <= 0:
            raise ValueError(f"expert size must be positive, got {self.expert_bytes} bytes")
        if self.h2d_gbps is not None and self.h2d_gbps <= 0:
            raise ValueError(f"h2d bandwidth must be positive, got {self.h2d_gbps} GB/s")
        if self.nvme_gbps <= 0:
            raise ValueError(f"NVMe bandwidth must be positive, got {self.nvme_gbps} GB/s")
        if self.layer_s < 0:
            raise ValueError(f"layer time must be >= 0, got {self.layer_s} s")

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
) -> TimingModel:
    """A `TimingModel` from a profile, the model's known sizes, and explicit overrides.

    ``recorded_expert_bytes``: the expert size a recorded trace carries (``expertd.traces.record``
    writes it); for a model not in `MODEL_SIZES`, compute is then estimated from the experts
    alone (``top_k`` experts' bytes per layer over memory bandwidth): a floor, since attention
    and dense layers are not counted.
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
    )
