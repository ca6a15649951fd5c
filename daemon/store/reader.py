"""`StoreReader`: read one expert into a caller-owned buffer, verified, at disk speed.

Reads use ``O_DIRECT`` ``preadv`` when the data file's filesystem allows it (probed once at
open; tmpfs does not) and buffered ``preadv`` otherwise. A ``none`` blob is read straight
into the target; an ``lz4-planes`` blob is read into this thread's scratch buffer and
decoded into the target. The raw bytes' xxhash64 (and, for compressed blobs, the stored
bytes' one first) is checked before `read_expert` returns; on any mismatch, short read or
I/O error it raises `CorruptExpertError` and the target's content is unspecified.

Thread-safe: several threads may read at once (positional reads on shared descriptors,
per-thread scratch allocated on a thread's first compressed read and reused). The heavy
steps release the GIL: ``os.preadv``, lz4 via ctypes, numpy's interleave, and python-xxhash
(which drops the GIL while hashing). `close` must not race with reads in flight.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from expertd.daemon.store.codec import CodecError, PlaneDecoder
from expertd.daemon.store.manifest import (
    BLOB_ALIGN_BYTES,
    CODEC_LZ4_PLANES,
    CODEC_NONE,
    CorruptExpertError,
    ExpertEntry,
    StoreError,
    StoreManifest,
    StoreTruncatedError,
    load_manifest,
    round_up,
)

if TYPE_CHECKING:
    import torch

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def alloc_aligned(nbytes: int, *, populate: bool = True) -> np.ndarray:
    """A page-aligned uint8 buffer (anonymous mmap), pre-faulted so first use runs at copy speed."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    region = mmap.mmap(-1, max(nbytes, 1), flags=flags)
    return np.frombuffer(region, dtype=np.uint8, count=nbytes)


def _as_target(into: Any) -> np.ndarray:
    if isinstance(into, np.ndarray):
        if into.dtype != np.uint8 or into.ndim != 1 or not into.flags.c_contiguous:
            raise TypeError(f"into must be a 1-D contiguous uint8 array, got {into.dtype} {into.shape}")
        target = into
    else:
        target = np.frombuffer(into, dtype=np.uint8)
    if not target.flags.writeable:
        raise TypeError("into must be writable")
    return target


class _Scratch(threading.local):
    """One thread's buffers for compressed blobs: the stored bytes and the plane decoder."""

    def __init__(self) -> None:
        self.stored = np.empty(0, dtype=np.uint8)
        self.decoder: PlaneDecoder | None = None


class StoreReader:
    """Reads verified experts from a store directory; see the module docstring."""

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        *,
        direct: bool | None = None,
        allow_truncated: bool = False,
    ) -> None:
        """Open a store. ``direct``: None probes O_DIRECT, True requires it, False never uses it.

        A data file shorter than the manifest says raises `StoreTruncatedError` naming the
        first expert past its end, unless ``allow_truncated`` (for `store verify`, which then
        gets a `CorruptExpertError` per missing expert).
        """
        self.store_dir = Path(store_dir)
        self.manifest: StoreManifest = load_manifest(self.store_dir)
        self.data_path = self.store_dir / self.manifest.data_file
        self._fd = -1
        self._direct_fd = -1
        try:
            self._fd = os.open(self.data_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"{self.data_path}: cannot open: {exc.strerror}") from None
        try:
            self.file_bytes = os.fstat(self._fd).st_size
            if self.file_bytes < self.manifest.data_bytes and not allow_truncated:
                raise StoreTruncatedError(self._truncation_message())
            if direct is not False:
                self._direct_fd = self._open_direct()
                if direct and self._direct_fd < 0:
                    raise StoreError(f"{self.data_path}: O_DIRECT reads are not supported here")
            self._direct = self._direct_fd >= 0
            self._stored_scratch_bytes = round_up(
                max(
                    (e.stored_bytes for e in self.manifest.experts if e.codec != CODEC_NONE),
                    default=0,
                ),
                BLOB_ALIGN_BYTES,
            )
            compressed_low = [e for e in self.manifest.experts if e.planes and e.planes[0] < e.raw_bytes // 2]
            self._lo_plane_bytes = self.manifest.raw_bytes // 2 if compressed_low else 0
        except BaseException:
            self.close()
            raise
        self._scratch = _Scratch()

    @property
    def direct(self) -> bool:
        """Whether aligned reads bypass the page cache (decided at open)."""
        return self._direct

    def _truncation_message(self) -> str:
        past = [e for e in self.manifest.experts if e.offset + e.stored_bytes > self.file_bytes]
        first = min(past, key=lambda e: e.offset)
        return (
            f"{self.data_path} is truncated: {self.file_bytes} of {self.manifest.data_bytes} "
            f"bytes; expert (layer {first.layer}, expert {first.expert}) and {len(past) - 1} "
            "more lie past its end"
        )

    def _open_direct(self) -> int:
        """An O_DIRECT descriptor if a test read of one aligned block works, else -1."""
        if not _O_DIRECT or self.file_bytes < BLOB_ALIGN_BYTES:
            return -1
        try:
            fd = os.open(self.data_path, os.O_RDONLY | os.O_CLOEXEC | _O_DIRECT)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return -1  # tmpfs and friends
            raise StoreError(f"{self.data_path}: cannot open: {exc.strerror}") from None
        probe = alloc_aligned(BLOB_ALIGN_BYTES)
        try:
            os.preadv(fd, [probe.data], 0)
        except OSError:
            os.close(fd)
            return -1
        return fd

    # --- reading ---------------------------------------------------------------------------

    def prepare_thread(self) -> None:
        """Allocate the calling thread's scratch now, so that none of its reads allocates.

        Only stores with compressed experts need scratch (one stored blob, plus half a raw
        blob if a low plane is compressed); the daemon's workers call this once at start.
        """
        scratch = self._scratch
        if len(scratch.stored) < self._stored_scratch_bytes:
            scratch.stored = alloc_aligned(self._stored_scratch_bytes)
            scratch.decoder = PlaneDecoder(self._lo_plane_bytes)

    def read_expert(self, layer: int, expert: int, into: Any) -> int:
        """Fill ``into`` with the expert's raw blob, verified; returns the raw byte count.

        ``into``: a writable uint8 buffer of at least ``manifest.slot_bytes`` bytes, ideally
        4 KiB-aligned (an unaligned one is read through the page cache instead).
        """
        entry = self.manifest.entry(layer, expert)
        target = _as_target(into)
        if len(target) < self.manifest.slot_bytes:
            raise ValueError(
                f"into holds {len(target)} bytes; reading needs slot_bytes = {self.manifest.slot_bytes}"
            )
        if self._fd < 0:
            raise StoreError(f"{self.data_path}: reader is closed")
        if entry.codec == CODEC_NONE:
            self._read_blob(entry, target)
        else:
            self._read_compressed(entry, target)
        raw = target[: entry.raw_bytes]
        digest = xxhash.xxh64_intdigest(raw.data)
        if digest != entry.xxh64:
            raise CorruptExpertError(
                layer, expert, f"raw checksum {digest:016x}, manifest says {entry.xxh64:016x}"
            )
        return entry.raw_bytes

    def _read_blob(self, entry: ExpertEntry, buf: np.ndarray) -> None:
        """Read ``entry``'s stored bytes to the start of ``buf`` (aligned length when direct)."""
        aligned = self._direct_fd >= 0 and buf.ctypes.data % BLOB_ALIGN_BYTES == 0
        fd = self._direct_fd if aligned else self._fd
        want = round_up(entry.stored_bytes, BLOB_ALIGN_BYTES) if aligned else entry.stored_bytes
        if entry.offset + want > self.file_bytes:
            raise CorruptExpertError(
                entry.layer,
                entry.expert,
                f"blob ends at byte {entry.offset + want} but {self.data_path.name} "
                f"has {self.file_bytes} bytes (truncated)",
            )
        view = buf.data
        done = 0
        while done < want:
            try:
                got = os.preadv(fd, [view[done:want]], entry.offset + done)
            except OSError as exc:
                raise CorruptExpertError(entry.layer, entry.expert, f"read failed: {exc}") from None
            if got <= 0:
                raise CorruptExpertError(
                    entry.layer,
                    entry.expert,
                    f"short read: {done} of {want} bytes (file truncated?)",
                )
            done += got

    def _read_compressed(self, entry: ExpertEntry, target: np.ndarray) -> None:
        if entry.codec != CODEC_LZ4_PLANES:  # the manifest parser admits no others
            raise CorruptExpertError(entry.layer, entry.expert, f"unknown codec {entry.codec!r}")
        self.prepare_thread()
        scratch = self._scratch
        assert scratch.decoder is not None
        self._read_blob(entry, scratch.stored)
        stored = scratch.stored[: entry.stored_bytes]
        digest = xxhash.xxh64_intdigest(stored.data)
        if digest != entry.stored_xxh64:
            raise CorruptExpertError(
                entry.layer,
                entry.expert,
                f"stored checksum {digest:016x}, manifest says {entry.stored_xxh64:016x}",
            )
        try:
            scratch.decoder.decode(stored, entry.planes, target[: entry.raw_bytes])
        except CodecError as exc:
            raise CorruptExpertError(entry.layer, entry.expert, f"cannot decode: {exc}") from None

    def read_expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The expert's tensors by name, in a fresh buffer (allocates: for tests and tools)."""
        import torch

        buf = alloc_aligned(self.manifest.slot_bytes, populate=False)
        self.read_expert(layer, expert, buf)
        flat = torch.from_numpy(buf)
        out: dict[str, torch.Tensor] = {}
        for spec in self.manifest.tensors:
            dtype = getattr(torch, spec.dtype)
            piece = flat[spec.offset : spec.offset + spec.nbytes]
            out[spec.name] = piece.view(dtype).view(spec.shape)
        return out

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        for name in ("_direct_fd", "_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
