"""Expert blob codecs: ``none`` and ``lz4-planes`` (byte-plane split, then lz4 per plane).

A bf16/fp16 word's high byte holds the sign and the exponent, which trained weights use
sparingly: that plane compresses (about 1.5x with lz4, 1.9x with lz4-HC). The low byte is
mantissa noise and barely compresses, so it is usually stored raw. ``lz4-planes`` stores
plane 0 (byte 0 of every 16-bit word, the low byte on little-endian) then plane 1, each
either as one lz4 block or raw when lz4 does not shrink it; the manifest records each
plane's stored size (a plane whose stored size equals its raw size is raw). A blob whose
overall ratio is below `MIN_COMPRESSION_RATIO` is stored with codec ``none``.

Decoding runs without the GIL: ``LZ4_decompress_safe`` is called through ctypes (which
releases the GIL) from the shared object of python-lz4's ``lz4.block._block`` extension
(it exports the liblz4 symbols), else from the system liblz4; only if neither is found
does it fall back to ``lz4.block.decompress``, which releases the GIL too but allocates a
bytes object per plane. The interleave is numpy ufuncs over cache-sized chunks, which
also release the GIL. See docs/store.md for the measured ratios and speeds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from dataclasses import dataclass

import lz4.block
import numpy as np

from expertd.daemon.store.manifest import CODEC_LZ4_PLANES, CODEC_NONE, PLANE_COUNT

MIN_COMPRESSION_RATIO = 1.05  # below this a blob is stored raw: decoding costs CPU
LZ4_MAX_INPUT_BYTES = 0x7E000000  # LZ4_MAX_INPUT_SIZE: larger planes are stored raw
LZ4_HC_MAX_LEVEL = 12
INTERLEAVE_CHUNK = 512 << 10  # 16-bit words per interleave step: temps stay in L2

_U16 = np.dtype("<u2")  # the planes are bytes 0 and 1 of little-endian words


class CodecError(ValueError):
    """A stored blob that does not decode to the expected size."""


def _find_lz4_decompress() -> tuple[Callable[..., int] | None, str]:
    """LZ4_decompress_safe as a GIL-releasing ctypes function, and where it came from."""
    candidates: list[str] = []
    try:
        import lz4.block._block as block_ext

        if block_ext.__file__:
            candidates.append(block_ext.__file__)
    except ImportError:  # pragma: no cover - python-lz4 without its extension
        pass
    system = ctypes.util.find_library("lz4")
    if system:
        candidates.append(system)
    for path in candidates:
        try:
            func = ctypes.CDLL(path).LZ4_decompress_safe
        except (OSError, AttributeError):
            continue
        func.restype = ctypes.c_int
        func.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        return func, f"ctypes:{path}"
    return None, "lz4.block.decompress"


_LZ4_DECOMPRESS, LZ4_BACKEND = _find_lz4_decompress()


def _addr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def lz4_decompress_into(src: np.ndarray, dst: np.ndarray) -> int:
    """Decode one lz4 block from ``src`` into ``dst`` (both uint8); returns bytes written.

    Raises `CodecError` on a malformed block; never writes past ``dst``.
    """
    if len(src) > LZ4_MAX_INPUT_BYTES or len(dst) > LZ4_MAX_INPUT_BYTES:
        raise CodecError(f"lz4 block of {len(src)} -> {len(dst)} bytes exceeds LZ4_MAX_INPUT_SIZE")
    if _LZ4_DECOMPRESS is not None:
        n = _LZ4_DECOMPRESS(_addr(src), _addr(dst), len(src), len(dst))
        if n < 0:
            raise CodecError(f"malformed lz4 block (error at input byte {-n - 1})")
        return int(n)
    try:  # documented fallback: allocates, still releases the GIL inside python-lz4
        out = lz4.block.decompress(src, uncompressed_size=len(dst))
    except lz4.block.LZ4BlockError as exc:
        raise CodecError(f"malformed lz4 block: {exc}") from None
    dst[: len(out)] = np.frombuffer(out, dtype=np.uint8)
    return len(out)


@dataclass(frozen=True)
class EncodedBlob:
    """One expert as stored: codec, per-plane stored sizes, and the pieces to write in order."""

    codec: str
    planes: tuple[int, ...]
    pieces: tuple[memoryview, ...]

    @property
    def stored_bytes(self) -> int:
        return sum(len(p) for p in self.pieces)


class PlaneEncoder:
    """Encodes blobs of up to ``raw_bytes``; its plane buffers are allocated once."""

    def __init__(self, raw_bytes: int, *, level: int = 0) -> None:
        if not 0 <= level <= LZ4_HC_MAX_LEVEL:
            raise ValueError(f"lz4 level must be 0 (fast) or 1..{LZ4_HC_MAX_LEVEL} (HC), got {level}")
        self.level = level
        self._planes = np.empty((PLANE_COUNT, raw_bytes // PLANE_COUNT), dtype=np.uint8)

    def encode(self, raw: np.ndarray, codec: str) -> EncodedBlob:
        """The stored form of ``raw`` (uint8) under ``codec``, or ``none`` where it does not pay."""
        plain = EncodedBlob(CODEC_NONE, (), (raw.data,))
        if codec == CODEC_NONE:
            return plain
        if codec != CODEC_LZ4_PLANES:
            raise ValueError(f"unknown codec {codec!r}")
        plane_bytes = len(raw) // PLANE_COUNT
        if len(raw) % PLANE_COUNT or plane_bytes > LZ4_MAX_INPUT_BYTES:
            return plain
        words = raw.reshape(-1, PLANE_COUNT)
        pieces: list[memoryview] = []
        for i in range(PLANE_COUNT):
            plane = self._planes[i, :plane_bytes]
            np.copyto(plane, words[:, i])
            if self.level:
                packed = lz4.block.compress(
                    plane, store_size=False, mode="high_compression", compression=self.level
                )
            else:
                packed = lz4.block.compress(plane, store_size=False)
            pieces.append(memoryview(packed) if len(packed) < plane_bytes else plane.data)
        blob = EncodedBlob(CODEC_LZ4_PLANES, tuple(len(p) for p in pieces), tuple(pieces))
        if len(raw) < MIN_COMPRESSION_RATIO * blob.stored_bytes:
            return plain
        return blob


class PlaneDecoder:
    """Decodes ``lz4-planes`` blobs straight into a target; one per thread (holds scratch).

    Scratch is allocated once: two small interleave temps, and a low-plane buffer (given
    up front, or at the first blob whose low plane is compressed: rare for trained weights).
    """

    def __init__(self, lo_plane_bytes: int = 0) -> None:
        """``lo_plane_bytes``: preallocate for compressed low planes of blobs up to twice this."""
        self._hi = np.empty(INTERLEAVE_CHUNK, dtype=np.uint8)
        self._wide = np.empty(INTERLEAVE_CHUNK, dtype=_U16)
        self._lo_plane = np.empty(lo_plane_bytes, dtype=np.uint8)

    def decode(self, stored: np.ndarray, planes: tuple[int, ...], out: np.ndarray) -> None:
        """Fill ``out`` (uint8, the raw length) from ``stored`` (uint8, exactly the stored bytes).

        The high plane is decoded into the upper half of ``out`` itself and interleaved
        forward in place: word i is written to bytes [2i, 2i+2), which never overtakes
        the high bytes still to be read at offset m+j for j >= i.
        """
        m = len(out) // PLANE_COUNT
        if len(out) % PLANE_COUNT or len(planes) != PLANE_COUNT or sum(planes) != len(stored):
            raise CodecError(f"planes {planes} do not describe {len(stored)} stored bytes")
        lo_stored = stored[: planes[0]]
        hi_stored = stored[planes[0] :]
        if planes[1] == m:
            hi = hi_stored
        else:
            hi = out[m : 2 * m]
            n = lz4_decompress_into(hi_stored, hi)
            if n != m:
                raise CodecError(f"high plane decoded to {n} bytes, expected {m}")
        if planes[0] == m:
            lo = lo_stored
        else:
            if len(self._lo_plane) < m:
                self._lo_plane = np.empty(m, dtype=np.uint8)
            lo = self._lo_plane[:m]
            n = lz4_decompress_into(lo_stored, lo)
            if n != m:
                raise CodecError(f"low plane decoded to {n} bytes, expected {m}")
        self._interleave(lo, hi, out[: 2 * m].view(_U16))

    def _interleave(self, lo: np.ndarray, hi: np.ndarray, words: np.ndarray) -> None:
        m = len(words)
        for a in range(0, m, INTERLEAVE_CHUNK):
            b = min(m, a + INTERLEAVE_CHUNK)
            k = b - a
            hi_chunk = self._hi[:k]
            np.copyto(hi_chunk, hi[a:b])  # read before the writes below may overlap it
            wide = self._wide[:k]
            np.left_shift(hi_chunk, 8, out=wide, dtype=_U16)
            np.bitwise_or(wide, lo[a:b], out=words[a:b])


def decode_blob(stored: np.ndarray, planes: tuple[int, ...], raw_bytes: int) -> np.ndarray:
    """Allocating convenience for tests and tools: the raw bytes of an ``lz4-planes`` blob."""
    out = np.empty(raw_bytes, dtype=np.uint8)
    PlaneDecoder().decode(stored, planes, out)
    return out
