"""The baselines a user without expertd would run, as `ExpertSource`s for `traces.live.drive`.

- `AdvisedMmapSource`: the store's data file mmap'd with ``MADV_RANDOM`` (no fault
  readahead past what an expert needs), and ``MADV_WILLNEED`` on the current layer's routed
  experts as soon as the router has chosen them: the best a client can do with the page
  cache alone. (The kernel caps one WILLNEED at the device's readahead window or its
  largest request, whichever is larger: a small ``read_ahead_kb`` weakens it.)
- `PreadLruSource`: the client's own cache: ``slots`` page-aligned buffers, LRU, filled by
  ``pread`` (``O_DIRECT`` where the filesystem allows, so the page cache holds no second
  copy) of each expert the layer misses.

The plain mmap (`traces.live.MmapSource`) is the third baseline.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from expertd.daemon.store.manifest import CODEC_NONE, StoreManifest, load_manifest
from expertd.daemon.store.reader import StoreReader, alloc_aligned
from expertd.traces.live import Weights

PAGE_BYTES = mmap.PAGESIZE


def _weights(manifest: StoreManifest, flat: np.ndarray, start: int) -> Weights:
    """The expert's tensors as views of ``flat[start:]`` (read-only views warn: silenced)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for spec in manifest.tensors:
            piece = torch.from_numpy(flat[start + spec.offset : start + spec.offset + spec.nbytes])
            out[spec.name] = piece.view(getattr(torch, spec.dtype)).view(spec.shape)
    return out


def _uncompressed(store_dir: Path) -> StoreManifest:
    manifest = load_manifest(store_dir)
    if any(e.codec != CODEC_NONE for e in manifest.experts):
        raise ValueError(f"{store_dir}: this baseline needs an uncompressed store (codec none)")
    return manifest


def drop_file_cache(path: Path) -> None:
    """Start cold: drop ``path``'s pages from the page cache (pages mapped somewhere stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class AdvisedMmapSource:
    """mmap + MADV_RANDOM on the map + MADV_WILLNEED on each layer's routed experts."""

    def __init__(self, store_dir: Path) -> None:
        self.manifest = manifest = _uncompressed(Path(store_dir))
        self.path = Path(store_dir) / manifest.data_file
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        self._map.madvise(mmap.MADV_RANDOM)
        self._flat = np.frombuffer(self._map, dtype=np.uint8)
        self.tensor_names = tuple(t.name for t in manifest.tensors)

    @contextlib.contextmanager
    def experts(self, layer: int, experts: list[int]) -> Iterator[list[tuple[int, Weights]]]:
        entries = [self.manifest.entry(layer, e) for e in experts]
        for entry in entries:  # all of the layer's reads are queued before the first is used
            start = entry.offset - entry.offset % PAGE_BYTES
            self._map.madvise(mmap.MADV_WILLNEED, start, entry.offset + entry.raw_bytes - start)
        yield [
            (e, _weights(self.manifest, self._flat, entry.offset))
            for e, entry in zip(experts, entries, strict=True)
        ]

    def drop_page_cache(self) -> None:
        drop_file_cache(self.path)


class PreadLruSource:
    """A client-side LRU of ``slots`` experts, filled by pread; see the module docstring."""

    def __init__(self, store_dir: Path, slots: int) -> None:
        self.manifest = _uncompressed(Path(store_dir))
        if slots < 1:
            raise ValueError(f"the LRU needs at least one slot, got {slots}")
        self.path = Path(store_dir) / self.manifest.data_file
        self.reader = StoreReader(store_dir)  # O_DIRECT where allowed, checksums verified
        self.slots = slots
        self._allocated = 0  # buffers are allocated on first use: memory grows as a real cache's
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.tensor_names = tuple(t.name for t in self.manifest.tensors)
        self.hits = self.misses = 0

    def _slot(self, keep: set[tuple[int, int]]) -> np.ndarray:
        if self._allocated < self.slots:
            self._allocated += 1
            return alloc_aligned(self.manifest.slot_bytes)
        victim = next((k for k in self._cache if k not in keep), None)  # least recent not in use now
        if victim is None:
            raise ValueError(f"an LRU of {self.slots} slots cannot hold one layer's {len(keep)} experts")
        return self._cache.pop(victim)

    @contextlib.contextmanager
    def experts(self, layer: int, experts: list[int]) -> Iterator[list[tuple[int, Weights]]]:
        keep = {(layer, e) for e in experts}
        out = []
        for expert in experts:
            key = (layer, expert)
            buf = self._cache.get(key)
            if buf is None:
                self.misses += 1
                buf = self._slot(keep)
                self.reader.read_expert(layer, expert, buf)
                self._cache[key] = buf
            else:
                self.hits += 1
                self._cache.move_to_end(key)
            out.append((expert, _weights(self.manifest, buf, 0)))
        yield out

    def drop_page_cache(self) -> None:
        drop_file_cache(self.path)
