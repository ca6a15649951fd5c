"""Zero-copy torch views of a tier's slab: each expert's tensors, made once per slot and reused.

Host and cpu-device slabs are shared-memory files mapped read-only: a write into a view
faults (SIGSEGV) instead of corrupting every client's weights, so views are immutable by
contract. A CUDA device slab is rebuilt from the daemon's CUDA IPC handle; CUDA cannot map
memory read-only, so writing there corrupts the shared weights: never do it.

Lifetime: every view holds a reference (through its storage) to the numpy array over the
mapping, and that array holds a buffer export of the ``mmap``, which can then neither be
closed nor freed. A mapping therefore lives exactly as long as its last view, even after the
client dropped it (a daemon restart remaps the new slabs): memory of a dead daemon's slab
stays mapped while any old view is alive, and is returned when the last one is collected.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from expertd.daemon.protocol import ProtocolError
from expertd.daemon.service.slabs import open_shm_readonly

SHM_KINDS = frozenset({"host", "cpu"})


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """One tensor inside a slot: name, torch dtype, shape, byte offset from the slot start."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_layout(tensors: Sequence[Mapping[str, Any]], slot_bytes: int) -> tuple[TensorLayout, ...]:
    """The hello reply's ``tensors`` as `TensorLayout`; `ProtocolError` names a bad entry."""
    out = []
    for spec in tensors:
        try:
            name, dtype_name, shape, offset = spec["name"], spec["dtype"], spec["shape"], spec["offset"]
            dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
            if not isinstance(dtype, torch.dtype):
                raise ProtocolError(f"layout tensor {name!r}: unknown dtype {dtype_name!r}")
            layout = TensorLayout(str(name), dtype, tuple(int(d) for d in shape), int(offset))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"layout tensor {spec!r:.80} is malformed ({exc})") from None
        if layout.offset < 0 or layout.offset + layout.nbytes > slot_bytes:
            raise ProtocolError(
                f"layout tensor {layout.name!r} spans bytes [{layout.offset}, "
                f"{layout.offset + layout.nbytes}) of a {slot_bytes}-byte slot"
            )
        if layout.offset % layout.dtype.itemsize:
            raise ProtocolError(f"layout tensor {layout.name!r} offset {layout.offset} is misaligned")
        out.append(layout)
    return tuple(out)


class SlabViews:
    """One tier's slab mapped into this process, and the per-slot tensor views made from it."""

    def __init__(self, handle: Mapping[str, Any], layout: tuple[TensorLayout, ...]) -> None:
        self.kind = str(handle.get("kind"))
        self.num_slots = int(handle["slots"])
        self.slot_bytes = int(handle["slot_bytes"])
        self.layout = layout
        if self.kind in SHM_KINDS:
            self.flat = _map_shm(handle)
        elif self.kind == "cuda":
            self.flat = _map_cuda(handle)
        else:
            raise ProtocolError(f"unknown tier kind {self.kind!r} (known: host, cpu, cuda)")
        self._slots: dict[int, dict[str, torch.Tensor]] = {}

    def tensors(self, slot: int) -> dict[str, torch.Tensor]:
        """The tensors in ``slot`` by name (views cached per slot; the dict is a fresh copy)."""
        views = self._slots.get(slot)
        if views is None:
            if not 0 <= slot < self.num_slots:
                raise ProtocolError(f"slot {slot} out of range [0, {self.num_slots}) of the {self.kind} slab")
            start = slot * self.slot_bytes
            views = {}
            for t in self.layout:
                begin = start + t.offset
                views[t.name] = self.flat[begin : begin + t.nbytes].view(t.dtype).view(t.shape)
            self._slots[slot] = views
        return dict(views)


def _map_shm(handle: Mapping[str, Any]) -> torch.Tensor:
    """The whole slab as one read-only uint8 tensor that keeps its mapping alive."""
    _mapping, array = open_shm_readonly(dict(handle))  # array holds the mmap (and an export of it)
    with warnings.catch_warnings():  # torch warns that the array is not writable: that is the point
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)  # [slots * slot_bytes]


def _map_cuda(handle: Mapping[str, Any]) -> torch.Tensor:
    """The daemon's CUDA slab, opened from its IPC handle, as one uint8 tensor."""
    device = torch.device("cuda", int(handle["device"]))
    torch.cuda._lazy_init()  # as torch.multiprocessing does before opening an IPC handle
    storage = torch.UntypedStorage._new_shared_cuda(*handle["ipc"])
    flat = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)  # [storage bytes]
    expected = int(handle["slots"]) * int(handle["slot_bytes"])
    if flat.numel() < expected:
        raise ProtocolError(f"CUDA slab holds {flat.numel()} bytes, the daemon said {expected}")
    return flat
