"""The lz4-planes codec: lossless on any input, ``none`` when it does not pay, strict on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertd.daemon.store.codec import (
    INTERLEAVE_CHUNK,
    LZ4_BACKEND,
    CodecError,
    PlaneDecoder,
    PlaneEncoder,
    decode_blob,
)


def bf16_normal(n: int, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy()


def stored_bytes(blob) -> np.ndarray:
    return np.frombuffer(b"".join(bytes(p) for p in blob.pieces), dtype=np.uint8)


def round_trip(raw: np.ndarray, level: int = 0) -> str:
    blob = PlaneEncoder(len(raw), level=level).encode(raw, "lz4-planes")
    if blob.codec == "lz4-planes":
        assert np.array_equal(decode_blob(stored_bytes(blob), blob.planes, len(raw)), raw)
    else:
        assert blob.codec == "none" and bytes(blob.pieces[0]) == raw.tobytes()
    return blob.codec


def test_lz4_decode_runs_through_ctypes() -> None:
    assert LZ4_BACKEND.startswith("ctypes:"), LZ4_BACKEND  # releases the GIL, no allocation


@pytest.mark.parametrize("level", [0, 3])
def test_bf16_weights_compress_in_the_high_plane_only(level: int) -> None:
    raw = bf16_normal(1 << 16)
    blob = PlaneEncoder(len(raw), level=level).encode(raw, "lz4-planes")
    assert blob.codec == "lz4-planes"
    low, high = blob.planes
    assert low == len(raw) // 2  # mantissa noise: stored raw
    assert high < 0.8 * len(raw) // 2
    assert round_trip(raw, level) == "lz4-planes"


def test_incompressible_blob_is_stored_raw() -> None:
    raw = np.random.default_rng(0).integers(0, 256, 1 << 14, dtype=np.uint8)
    assert round_trip(raw) == "none"


def test_both_planes_compressed_and_several_interleave_chunks() -> None:
    raw = np.zeros(2 * INTERLEAVE_CHUNK * 2 + 512, dtype=np.uint8)
    raw[::7] = 3
    blob = PlaneEncoder(len(raw)).encode(raw, "lz4-planes")
    assert all(p < len(raw) // 2 for p in blob.planes)
    assert round_trip(raw) == "lz4-planes"


def test_low_plane_compressed_high_plane_raw() -> None:
    raw = np.random.default_rng(1).integers(0, 256, 1 << 15, dtype=np.uint8)
    raw[0::2] = 9
    blob = PlaneEncoder(len(raw)).encode(raw, "lz4-planes")
    assert blob.planes[0] < len(raw) // 2 and blob.planes[1] == len(raw) // 2
    assert round_trip(raw) == "lz4-planes"


@settings(max_examples=60, deadline=None)
@given(
    words=st.integers(1, 5000),
    kind=st.sampled_from(["normal", "zeros", "small", "random"]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_lossless(words: int, kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = {
        "normal": lambda: bf16_normal(words, seed),
        "zeros": lambda: np.zeros(2 * words, dtype=np.uint8),
        "small": lambda: rng.integers(0, 4, 2 * words, dtype=np.uint8),
        "random": lambda: rng.integers(0, 256, 2 * words, dtype=np.uint8),
    }[kind]()
    round_trip(raw)


def test_decoder_reuses_one_target_and_scratch_across_blobs() -> None:
    decoder = PlaneDecoder()
    out = np.empty(1 << 15, dtype=np.uint8)
    for seed in range(3):
        raw = bf16_normal(len(out) // 2, seed)
        raw[: len(raw) // 4] = 0  # the low plane compresses too
        blob = PlaneEncoder(len(raw)).encode(raw, "lz4-planes")
        decoder.decode(stored_bytes(blob), blob.planes, out)
        assert np.array_equal(out, raw)


def test_malformed_stream_raises_and_never_overruns() -> None:
    raw = bf16_normal(1 << 14)
    blob = PlaneEncoder(len(raw)).encode(raw, "lz4-planes")
    stored = stored_bytes(blob).copy()
    fence = np.full(len(raw) + 64, 0xEE, dtype=np.uint8)
    with pytest.raises(CodecError):  # the high plane cut short
        PlaneDecoder().decode(stored[:-5], (blob.planes[0], blob.planes[1] - 5), fence[: len(raw)])
    assert (fence[len(raw) :] == 0xEE).all()
    garbage = np.full(blob.planes[1], 0xFF, dtype=np.uint8)
    with pytest.raises(CodecError):
        PlaneDecoder().decode(
            np.concatenate([stored[: blob.planes[0]], garbage]), blob.planes, fence[: len(raw)]
        )
    with pytest.raises(CodecError, match="do not describe"):
        PlaneDecoder().decode(stored, (1, 2), fence[: len(raw)])
