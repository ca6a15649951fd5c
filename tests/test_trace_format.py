"""The .etrace format: round trips, streaming, and a one-line error for every kind of bad file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import lz4.block
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertd.traces.format import (
    FORMAT_VERSION,
    MAGIC,
    MAX_CHUNK_ROWS,
    MAX_HEADER_BYTES,
    PHASE_DECODE,
    PHASE_PREFILL,
    Trace,
    TraceFormatError,
    TraceMeta,
    TraceWriter,
    iter_chunks,
    read_meta,
    read_trace,
    write_trace,
)


def make_trace(
    requests: int = 2,
    tokens: int = 3,
    layers: int = 4,
    experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
    scores: bool = True,
    phase: bool = True,
) -> Trace:
    """A valid trace in token order: every token of every request visits every layer."""
    rng = np.random.default_rng(seed)
    rows = requests * tokens * layers
    meta = TraceMeta(
        "test-model",
        layers,
        experts,
        top_k,
        source="generated",
        license="MIT",
        requests=[f"r{i}" for i in range(requests)],
        has_scores=scores,
        has_phase=phase,
    )
    return Trace(
        meta,
        np.repeat(np.arange(requests), tokens * layers),
        np.tile(np.repeat(np.arange(tokens), layers), requests),
        np.tile(np.arange(layers), requests * tokens),
        np.stack([rng.permutation(experts)[:top_k] for _ in range(rows)]),
        rng.random((rows, top_k)).astype(np.float32) if scores else None,
        np.tile(np.repeat((np.arange(tokens) > 0).astype(np.uint8), layers), requests) if phase else None,
    )


def assert_same(a: Trace, b: Trace) -> None:
    assert a.meta == b.meta
    for left, right in zip(a.columns(), b.columns(), strict=True):
        assert (left is None) == (right is None)
        if left is not None:
            assert left.dtype == right.dtype
            np.testing.assert_array_equal(left, right)


# --- a hand-written writer that follows traces/README.md byte by byte, for crafting bad files ---


def raw_header(**overrides: object) -> dict:
    header = {
        "version": FORMAT_VERSION,
        "model": "m",
        "num_layers": 4,
        "num_experts": 32,
        "top_k": 2,
        "source": "",
        "license": "",
        "requests": ["a", "b"],
        "extra": {},
        "has_scores": False,
        "has_phase": False,
    }
    header.update(overrides)
    return header


def column(array: np.ndarray, dtype: str) -> dict:
    data = np.asarray(array).astype(dtype).tobytes()
    return {"dtype": dtype, "shape": list(np.shape(array)), "data": data}


def raw_chunk(**columns: dict) -> dict:
    """Columns of a 2-row chunk (request 0, token 0, layers 0 and 1), with `columns` replaced."""
    base = {
        "request": column([0, 0], "<i4"),
        "token": column([0, 0], "<i4"),
        "layer": column([0, 1], "<i2"),
        "experts": column([[1, 2], [3, 4]], "<i2"),
    }
    base.update(columns)
    return base


def chunk_bytes(payload: dict, rows: int = 2) -> bytes:
    raw = msgpack.packb(payload, use_bin_type=True)
    comp = lz4.block.compress(raw, store_size=False)
    return struct.pack("<cIIII", b"C", rows, len(raw), len(comp), zlib.crc32(comp)) + comp


def end_bytes(rows: int, chunks: int, extra: dict | None = None) -> bytes:
    body = msgpack.packb({"rows": rows, "chunks": chunks, "extra": extra or {}})
    return b"E" + struct.pack("<I", len(body)) + body


def header_bytes(header: dict) -> bytes:
    body = msgpack.packb(header, use_bin_type=True)
    return MAGIC + struct.pack("<I", len(body)) + body


def raw_file(path: Path, header: dict | None = None, chunks: list[dict] | None = None) -> Path:
    chunks = [raw_chunk()] if chunks is None else chunks
    rows = [len(np.frombuffer(c["request"]["data"], "<i4")) for c in chunks]
    body = b"".join(chunk_bytes(c, n) for c, n in zip(chunks, rows, strict=True))
    path.write_bytes(header_bytes(header or raw_header()) + body + end_bytes(sum(rows), len(rows)))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


# --- round trips ---


def test_round_trip_preserves_every_column_across_chunks(tmp_path: Path) -> None:
    trace = make_trace()
    write_trace(tmp_path / "t.etrace", trace, chunk_rows=5)
    assert_same(read_trace(tmp_path / "t.etrace"), trace)


def test_hand_written_file_following_the_readme_reads_back(tmp_path: Path) -> None:
    trace = read_trace(raw_file(tmp_path / "t.etrace"))
    assert trace.experts.tolist() == [[1, 2], [3, 4]]
    assert trace.meta.requests == ["a", "b"]


@st.composite
def traces(draw: st.DrawFn) -> tuple[Trace, int]:
    layers = draw(st.integers(1, 5))
    top_k = draw(st.integers(1, 4))
    experts = draw(st.integers(top_k, 12))
    requests = draw(st.integers(1, 3))
    scores = draw(st.sampled_from([None, np.float16, np.float32]))
    phase = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = []
    for request in range(requests):
        for token in range(draw(st.integers(0, 5))):
            # A token may miss layers (a profiler dropped them) but keeps their order.
            present = draw(st.lists(st.integers(0, layers - 1), min_size=1, unique=True))
            rows += [(request, token, layer) for layer in sorted(present)]
    if not rows:
        rows = [(0, 0, 0)]
    cols = np.array(rows)
    n = len(cols)
    meta = TraceMeta(
        "m",
        layers,
        experts,
        top_k,
        requests=[f"q{i}" for i in range(requests)],
        has_scores=scores is not None,
        has_phase=phase,
    )
    trace = Trace(
        meta,
        cols[:, 0],
        cols[:, 1],
        cols[:, 2],
        np.stack([rng.permutation(experts)[:top_k] for _ in range(n)]),
        None if scores is None else rng.normal(size=(n, top_k)).astype(scores),
        rng.integers(0, 2, n).astype(np.uint8) if phase else None,
    )
    return trace, draw(st.integers(1, 7))


@settings(max_examples=60, deadline=None)
@given(traces())
def test_any_valid_trace_round_trips_whole_and_streamed(tmp_path_factory, case) -> None:
    trace, chunk_rows = case
    path = tmp_path_factory.mktemp("h") / "t.etrace"
    write_trace(path, trace, chunk_rows=chunk_rows)
    assert_same(read_trace(path), trace)
    chunks = list(iter_chunks(path))
    assert [len(c) for c in chunks[:-1]] == [chunk_rows] * (len(chunks) - 1)
    assert_same(Trace.concat(trace.meta, chunks), trace)


def test_writer_appends_batches_and_broadcasts_scalars(tmp_path: Path) -> None:
    meta = TraceMeta("m", 2, 4, 1, requests=["a"], has_phase=True)
    with TraceWriter(tmp_path / "t.etrace", meta, chunk_rows=3) as writer:
        for token in range(4):
            writer.append(0, token, [0, 1], [[token % 4], [(token + 1) % 4]], phase=PHASE_DECODE)
        assert writer.rows == 8
    trace = read_trace(tmp_path / "t.etrace")
    assert trace.token.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert set(trace.phase.tolist()) == {PHASE_DECODE}


def test_end_record_extra_is_merged_into_meta(tmp_path: Path) -> None:
    trace = make_trace()
    with TraceWriter(tmp_path / "t.etrace", trace.meta) as writer:
        writer.append(*trace.columns())
        writer.update_extra({"missing_cells": 3})
    assert read_meta(tmp_path / "t.etrace").extra == {"missing_cells": 3}
    assert read_trace(tmp_path / "t.etrace").meta.extra == {"missing_cells": 3}


def test_failed_write_leaves_no_file_and_no_temp(tmp_path: Path) -> None:
    trace = make_trace()
    with pytest.raises(RuntimeError), TraceWriter(tmp_path / "t.etrace", trace.meta) as writer:
        writer.append(*trace.columns())
        raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_an_empty_trace(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="empty trace"):
        TraceWriter(tmp_path / "t.etrace", make_trace().meta).close()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_rows_out_of_token_order(tmp_path: Path) -> None:
    meta = TraceMeta("m", 2, 4, 1, requests=["a"])
    with (
        pytest.raises(TraceFormatError, match=r"row 1 is out of token order"),
        TraceWriter(tmp_path / "t.etrace", meta) as writer,
    ):
        writer.append(0, 0, [1, 0], [[0], [1]])


def test_writer_rejects_order_broken_across_batches(tmp_path: Path) -> None:
    meta = TraceMeta("m", 2, 4, 1, requests=["a"])
    with (
        pytest.raises(TraceFormatError, match=r"row 2 is out of token order"),
        TraceWriter(tmp_path / "t.etrace", meta) as writer,
    ):
        writer.append(0, 1, [0, 1], [[0], [1]])
        writer.append(0, 0, [0], [[2]])


# --- the Trace API ---


def test_keys_are_layer_times_experts_plus_expert_row_major() -> None:
    trace = make_trace(requests=1, tokens=1, layers=2, experts=8, top_k=2)
    expected = [layer * 8 + e for layer, row in zip(trace.layer, trace.experts, strict=True) for e in row]
    assert trace.keys().dtype == np.int64
    assert trace.keys().tolist() == expected


def test_num_tokens_counts_request_token_pairs() -> None:
    assert make_trace(requests=2, tokens=3).num_tokens() == 6


def test_select_keeps_decode_rows_and_meta() -> None:
    trace = make_trace(requests=2, tokens=3, layers=4)
    decode = trace.select(trace.phase == PHASE_DECODE)
    assert len(decode) == 2 * 2 * 4 and decode.num_tokens() == 4
    assert decode.meta is trace.meta
    decode.validate()


def test_prefill_and_decode_constants() -> None:
    assert (PHASE_PREFILL, PHASE_DECODE) == (0, 1)


def test_trace_rejects_values_that_do_not_fit_the_column_dtype() -> None:
    meta = TraceMeta("m", 2, 4, 1, requests=["a"])
    with pytest.raises(ValueError, match="layer value 70000 does not fit int16"):
        Trace(meta, [0], [0], [70000], [[1]])


def test_trace_rejects_scores_the_meta_does_not_declare() -> None:
    meta = TraceMeta("m", 2, 4, 1, requests=["a"])
    with pytest.raises(ValueError, match="has_scores"):
        Trace(meta, [0], [0], [0], [[1]], scores=[[0.5]])


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"model": ""}, "model must not be empty"),
        ({"num_layers": 0}, "num_layers must be an int in"),
        ({"num_experts": True}, "num_experts must be an int in"),
        ({"top_k": 9}, r"top_k must be an int in \[1, 8\]"),
        ({"requests": ["a", "a"]}, "request names must be unique"),
        ({"requests": "ab"}, "requests must be a list"),
        ({"extra": {"x": object()}}, "extra is not msgpack-serializable"),
        ({"has_scores": 1}, "has_scores must be a bool"),
    ],
)
def test_meta_is_validated_on_construction(fields: dict, problem: str) -> None:
    base = {"model": "m", "num_layers": 2, "num_experts": 8, "top_k": 2, "requests": ["a"]}
    with pytest.raises(ValueError, match=problem):
        TraceMeta(**{**base, **fields})


# --- every validation error ---


def test_truncation_at_every_record_boundary_and_inside_records(tmp_path: Path) -> None:
    good = tmp_path / "good.etrace"
    write_trace(good, make_trace(tokens=40), chunk_rows=100)
    data = good.read_bytes()
    cuts = sorted({1, 7, 8, 10, 12, 40, *range(len(data) - 1, len(data) - 40, -3)})
    cuts += [len(data) // 3, len(data) // 2]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.etrace"
        bad.write_bytes(data[:cut])
        assert "truncated" in error_of(bad), cut


def test_truncated_chunk_is_named(tmp_path: Path) -> None:
    good = tmp_path / "good.etrace"
    write_trace(good, make_trace(tokens=40), chunk_rows=100)
    data = good.read_bytes()
    (tmp_path / "t.etrace").write_bytes(data[: len(data) // 2])
    assert error_of(tmp_path / "t.etrace") == "truncated in chunk 1"


def test_missing_end_record_is_truncation(tmp_path: Path) -> None:
    path = tmp_path / "t.etrace"
    path.write_bytes(header_bytes(raw_header()) + chunk_bytes(raw_chunk()))
    assert error_of(path) == "truncated after chunk 0 (no end record)"


def test_empty_file_and_bad_magic(tmp_path: Path) -> None:
    (tmp_path / "empty.etrace").write_bytes(b"")
    assert error_of(tmp_path / "empty.etrace") == "empty file (not an expertd trace)"
    (tmp_path / "json.etrace").write_bytes(b'{"not": "a trace"}')
    assert error_of(tmp_path / "json.etrace") == "bad magic (not an expertd trace)"


def test_wrong_version(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "t.etrace", raw_header(version=7))
    assert error_of(path) == "format version 7 is not supported (this expertd reads 1)"


def test_empty_trace_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t.etrace"
    path.write_bytes(header_bytes(raw_header()) + end_bytes(0, 0))
    assert error_of(path) == "empty trace (no rows)"


@pytest.mark.parametrize(
    ("columns", "problem"),
    [
        ({"experts": column([[1, 2], [40, 3]], "<i2")}, r"expert id 40 out of range [0, 32) at row 1"),
        ({"experts": column([[1, 2], [3, -1]], "<i2")}, r"expert id -1 out of range [0, 32) at row 1"),
        ({"layer": column([0, 4], "<i2")}, "layer 4 out of range [0, 4) at row 1"),
        ({"request": column([2, 2], "<i4")}, "request id 2 out of range [0, 2) at row 0"),
        ({"token": column([-3, -3], "<i4")}, "token -3 is negative at row 0"),
        ({"experts": column([[1, 2], [5, 5]], "<i2")}, "duplicate expert id 5 at row 1"),
        (
            {"layer": column([1, 0], "<i2")},
            "row 1 is out of token order: (request, token, layer) (0, 0, 0) follows (0, 0, 1)",
        ),
        ({"layer": column([1, 1], "<i2")}, "row 1 is out of token order"),
        ({"layer": column([0, 1], "<i4")}, "chunk 0 column 'layer': dtype '<i4' is not <i2"),
        ({"layer": column([0, 1, 2], "<i2")}, "chunk 0 column 'layer': shape [3], expected [2]"),
        ({"experts": column([[1], [2]], "<i2")}, "shape [2, 1], expected [2, 2]"),
        ({"scores": column([[1, 2], [3, 4]], "<f4")}, "chunk 0 columns are not"),
        ({"token": {"dtype": "<i4", "shape": [2], "data": b"abc"}}, "data is not 2 x 4 bytes"),
    ],
)
def test_bad_rows_and_columns(tmp_path: Path, columns: dict, problem: str) -> None:
    path = raw_file(tmp_path / "t.etrace", chunks=[raw_chunk(**columns)])
    assert problem in error_of(path)


@pytest.mark.parametrize(
    ("columns", "problem"),
    [
        ({"scores": column([[0.5, np.nan], [1, 2]], "<f4")}, "score nan is not finite at row 0"),
        ({"scores": column([[0.5, 1], [np.inf, 2]], "<f2")}, "score inf is not finite at row 1"),
        ({"phase": column([0, 2], "|u1")}, "phase 2 at row 1 (expected 0 = prefill or 1 = decode)"),
    ],
)
def test_bad_scores_and_phase(tmp_path: Path, columns: dict, problem: str) -> None:
    header = raw_header(has_scores=True, has_phase=True)
    good = {"scores": column([[0.5, 0.5], [1, 2]], "<f4"), "phase": column([0, 0], "|u1")}
    path = raw_file(tmp_path / "t.etrace", header, [raw_chunk(**{**good, **columns})])
    assert error_of(path) == problem


def test_row_order_is_checked_across_chunks(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "t.etrace", chunks=[raw_chunk(), raw_chunk()])
    assert error_of(path).startswith("row 2 is out of token order")


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ({"top_k": 40}, "bad header: top_k must be an int in [1, 32], got 40"),
        ({"requests": [1, 2]}, "bad header: requests must be a list of non-empty str"),
        ({"colour": "red"}, "bad header: unknown field 'colour'"),
    ],
)
def test_bad_header_fields(tmp_path: Path, header: dict, problem: str) -> None:
    assert error_of(raw_file(tmp_path / "t.etrace", raw_header(**header))) == problem


def test_missing_header_field(tmp_path: Path) -> None:
    header = raw_header()
    del header["top_k"]
    assert error_of(raw_file(tmp_path / "t.etrace", header)) == "bad header: missing field 'top_k'"


def test_oversized_lengths_are_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "t.etrace"
    path.write_bytes(MAGIC + struct.pack("<I", MAX_HEADER_BYTES + 1))
    assert error_of(path) == f"header length {MAX_HEADER_BYTES + 1} not in [1, {MAX_HEADER_BYTES}]"
    chunk = struct.pack("<cIIII", b"C", MAX_CHUNK_ROWS + 1, 10, 10, 0) + bytes(10)
    path.write_bytes(header_bytes(raw_header()) + chunk)
    assert error_of(path) == f"chunk 0 rows {MAX_CHUNK_ROWS + 1} not in [1, {MAX_CHUNK_ROWS}]"
    chunk = struct.pack("<cIIII", b"C", 2, 0xFFFFFFFF, 10, 0) + bytes(10)
    path.write_bytes(header_bytes(raw_header()) + chunk)
    assert error_of(path).startswith("chunk 0 raw length 4294967295 not in")
    chunk = struct.pack("<cIIII", b"C", 2, 100, 1 << 26, 0) + bytes(10)
    path.write_bytes(header_bytes(raw_header()) + chunk)
    assert error_of(path) == "truncated in chunk 0"
    path.write_bytes(header_bytes(raw_header()) + b"E" + struct.pack("<I", 1 << 30))
    assert error_of(path) == "end record length 1073741824 not in [1, 1048576]"


def test_corrupt_payload_fails_its_checksum(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "t.etrace")
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # inside the chunk payload, before the end record
    path.write_bytes(bytes(data))
    assert error_of(path) == "checksum mismatch in chunk 0 (corrupt file)"


def test_trailing_bytes_and_wrong_end_counts(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "t.etrace")
    path.write_bytes(path.read_bytes() + b"x")
    assert error_of(path) == "1 bytes after the end record"
    path.write_bytes(header_bytes(raw_header()) + chunk_bytes(raw_chunk()) + end_bytes(3, 1))
    assert error_of(path) == "end record says 3 rows in 1 chunks, the file has 2 in 1"


def test_unknown_record_tag(tmp_path: Path) -> None:
    path = tmp_path / "t.etrace"
    path.write_bytes(header_bytes(raw_header()) + b"Z" + bytes(20))
    assert error_of(path) == "bad record tag b'Z' at chunk 0"


def test_max_rows_bounds_what_read_trace_allocates(tmp_path: Path) -> None:
    write_trace(tmp_path / "t.etrace", make_trace())
    with pytest.raises(TraceFormatError, match="24 rows exceed max_rows=10"):
        read_trace(tmp_path / "t.etrace", max_rows=10)


def test_iter_chunks_checks_the_whole_file_before_yielding(tmp_path: Path) -> None:
    good = tmp_path / "good.etrace"
    write_trace(good, make_trace(tokens=40), chunk_rows=10)
    bad = tmp_path / "bad.etrace"
    bad.write_bytes(good.read_bytes()[:-5])
    chunks = iter_chunks(bad)
    with pytest.raises(TraceFormatError, match="truncated in end record"):
        next(chunks)
