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

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from expertd.daemon.protocol import DTYPE_BYTES, ProtocolError, TensorSpec
from expertd.daemon.protocol.local import open_shm_readonly

SHM_KINDS = frozenset({"host", "cpu"})
_DTYPES = {name: getattr(torch, name) for name in DTYPE_BYTES}  # the contract's dtype names, as torch's


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `TensorSpec` dtype name."""
    return _DTYPES[name]


class SlabViews:
    """One tier's slab mapped into this process, and the per-slot tensor views made from it."""

    def __init__(self, handle: Mapping[str, Any], layout: tuple[TensorSpec, ...]) -> None:
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
                views[t.name] = self.flat[begin : begin + t.nbytes].view(_DTYPES[t.dtype]).view(t.shape)
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
