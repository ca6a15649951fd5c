"""The `.etrace` file: a versioned, chunked, streamable form of a routing `Trace`.

Byte layout (integers little-endian; traces/README.md describes every field)::

    magic    8 bytes  89 45 54 52 41 43 45 0a  (b"\\x89ETRACE\\n")
    header   u32 length, then a msgpack map: format version and the TraceMeta fields
    chunk*   b"C", u32 rows, u32 raw_len, u32 comp_len, u32 crc32(payload), then the payload:
             lz4.block(msgpack map: column name -> {dtype, shape, data}), raw_len bytes unpacked
    end      b"E", u32 length, then a msgpack map {rows, chunks, extra}; nothing may follow

Readers bound every length before allocating and validate every row (see `Trace.validate`).
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import lz4.block
import msgpack
import numpy as np

from expertd.traces.trace import (
    MAX_EXPERTS,
    MAX_LAYERS,
    MAX_TOP_K,
    PHASE_DECODE,
    PHASE_PREFILL,
    RowChecker,
    Trace,
    TraceFormatError,
    TraceMeta,
    check_extra,
)

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_EXPERTS",
    "MAX_LAYERS",
    "MAX_TOP_K",
    "PHASE_DECODE",
    "PHASE_PREFILL",
    "Trace",
    "TraceFormatError",
    "TraceMeta",
    "TraceWriter",
    "iter_chunks",
    "read_meta",
    "read_trace",
    "write_trace",
]

MAGIC = b"\x89ETRACE\n"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 << 20
MAX_END_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20  # the unpacked msgpack of one chunk
MAX_COMPRESSED_BYTES = MAX_CHUNK_BYTES + MAX_CHUNK_BYTES // 255 + 16  # lz4's worst case
MAX_CHUNK_ROWS = 1 << 20
DEFAULT_CHUNK_ROWS = 1 << 16
DEFAULT_MAX_ROWS = 1 << 28

_LEN = struct.Struct("<I")
_CHUNK = struct.Struct("<cIIII")  # tag, rows, raw_len, comp_len, crc32 of the payload
_TAG_CHUNK = b"C"
_TAG_END = b"E"
# Column name -> dtype in the file; scores may be either float width, one width per file.
_FILE_DTYPES = {"request": "<i4", "token": "<i4", "layer": "<i2", "experts": "<i2", "phase": "|u1"}
_SCORE_DTYPES = ("<f2", "<f4")
_COLUMN_NAMES = ("request", "token", "layer", "experts", "scores", "phase")  # Trace.columns()
# Header keys in the order they are written (a fixed order keeps files byte-reproducible).
_META_FIELDS = (
    "model", "num_layers", "num_experts", "top_k", "source", "license", "requests", "extra",
    "has_scores", "has_phase",
)  # fmt: skip
_HEADER_FIELDS = frozenset(("version", *_META_FIELDS))


def _row_bytes(meta: TraceMeta) -> int:
    """Upper bound of one row's bytes in a chunk (float32 scores)."""
    return 4 + 4 + 2 + 2 * meta.top_k + 4 * meta.top_k * meta.has_scores + meta.has_phase


def _meta_header(meta: TraceMeta) -> dict[str, Any]:
    header = {name: getattr(meta, name) for name in _META_FIELDS}
    return {"version": FORMAT_VERSION, **header}


def _encode_chunk(batch: Trace) -> bytes:
    payload = {}
    for name, column in zip(_COLUMN_NAMES, batch.columns(), strict=True):
        if column is None:
            continue
        dtype = column.dtype.newbyteorder("<").str if name == "scores" else _FILE_DTYPES[name]
        data = column.astype(dtype, copy=False).tobytes()
        payload[name] = {"dtype": dtype, "shape": list(column.shape), "data": data}
    raw = msgpack.packb(payload, use_bin_type=True)
    compressed = lz4.block.compress(raw, store_size=False)
    head = _CHUNK.pack(_TAG_CHUNK, len(batch), len(raw), len(compressed), zlib.crc32(compressed))
    return head + compressed


class TraceWriter:
    """Streams rows into an `.etrace` file: a temp file beside `path`, renamed on `close()`.

    Rows must arrive in token order; every batch is validated as it is appended.
    """

    def __init__(
        self, path: str | os.PathLike[str], meta: TraceMeta, chunk_rows: int = DEFAULT_CHUNK_ROWS
    ) -> None:
        if not isinstance(chunk_rows, int) or not 1 <= chunk_rows <= MAX_CHUNK_ROWS:
            raise ValueError(f"chunk_rows must be in [1, {MAX_CHUNK_ROWS}], got {chunk_rows!r}")
        if chunk_rows * _row_bytes(meta) > MAX_CHUNK_BYTES - (1 << 16):
            raise ValueError(f"chunk_rows {chunk_rows} makes chunks over {MAX_CHUNK_BYTES} bytes")
        self.path = Path(path)
        self.meta = meta
        self.chunk_rows = chunk_rows
        self._checker = RowChecker(os.fspath(path), meta)
        self._pending: list[Trace] = []
        self._pending_rows = 0
        self._chunks = 0
        self._end_extra: dict[str, Any] = {}
        self._scores_dtype: np.dtype[Any] | None = None
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")
        header = msgpack.packb(_meta_header(meta), use_bin_type=True)
        if len(header) > MAX_HEADER_BYTES:
            self.abort()
            raise ValueError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES} bytes")
        self._file.write(MAGIC + _LEN.pack(len(header)) + header)

    @property
    def rows(self) -> int:
        """Rows appended so far."""
        return self._checker.rows

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(
        self,
        request: Any,
        token: Any,
        layer: Any,
        experts: Any,
        scores: Any = None,
        phase: Any = None,
    ) -> None:
        """Add a batch of rows (arrays of equal length; scalars broadcast over the batch)."""
        experts = np.asarray(experts)
        rows = experts.shape[0] if experts.ndim else 1

        def full(values: Any) -> Any:
            return np.full(rows, values) if np.ndim(values) == 0 else values

        if scores is not None and self._scores_dtype is not None:
            scores = np.asarray(scores).astype(self._scores_dtype, copy=False)
        try:
            batch = Trace(
                self.meta,
                full(request),
                full(token),
                full(layer),
                experts,
                scores,
                None if phase is None else full(phase),
            )
        except ValueError as exc:
            raise TraceFormatError(f"{self.path}: {exc} (at row {self.rows})") from None
        if batch.scores is not None:
            self._scores_dtype = batch.scores.dtype
        self._checker.check(batch)
        self._pending.append(batch)
        self._pending_rows += len(batch)
        if self._pending_rows >= self.chunk_rows:
            self._flush(final=False)

    def update_extra(self, extra: Mapping[str, Any]) -> None:
        """Add facts known only at the end (e.g. missing cells); read back in `meta.extra`."""
        merged = {**self._end_extra, **extra}
        try:
            check_extra(merged)
        except ValueError as exc:
            raise ValueError(f"update_extra: {exc}") from None
        self._end_extra = merged

    def _flush(self, final: bool) -> None:
        assert self._file is not None, "writer is closed"
        if not self._pending:
            return
        batch = Trace.concat(self.meta, self._pending)
        start = 0
        while len(batch) - start >= self.chunk_rows or (final and start < len(batch)):
            end = min(start + self.chunk_rows, len(batch))
            self._file.write(_encode_chunk(batch.slice(start, end)))
            self._chunks += 1
            start = end
        rest = batch.slice(start, len(batch))
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)

    def close(self) -> None:
        """Write the last chunk and the end record, then move the file into place."""
        if self._file is None:
            return
        try:
            self._flush(final=True)
            if not self.rows:
                raise TraceFormatError(f"{self.path}: empty trace (no rows)")
            end = {"rows": self.rows, "chunks": self._chunks, "extra": self._end_extra}
            body = msgpack.packb(end, use_bin_type=True)
            self._file.write(_TAG_END + _LEN.pack(len(body)) + body)
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self.abort()
            raise
        self._file.close()
        self._file = None
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop everything written; the target path is left untouched."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)


def write_trace(path: str | os.PathLike[str], trace: Trace, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
    """Write a whole in-memory trace."""
    with TraceWriter(path, trace.meta, chunk_rows) as writer:
        writer.append(*trace.columns())


@dataclass(frozen=True)
class _ChunkRef:
    index: int
    offset: int  # of the payload
    rows: int
    raw_len: int
    comp_len: int
    crc: int


def _read_exact(file: IO[bytes], size: int, where: str, part: str) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise TraceFormatError(f"{where}: truncated in {part}")
    return data


def _unpack(data: bytes, where: str, part: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise TraceFormatError(f"{where}: bad {part} (not msgpack: {exc})") from None


def _read_header(file: IO[bytes], where: str) -> TraceMeta:
    magic = file.read(len(MAGIC))
    if magic != MAGIC:
        if not magic:
            raise TraceFormatError(f"{where}: empty file (not an expertd trace)")
        if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
            raise TraceFormatError(f"{where}: truncated in magic")
        raise TraceFormatError(f"{where}: bad magic (not an expertd trace)")
    (size,) = _LEN.unpack(_read_exact(file, _LEN.size, where, "header"))
    if not 1 <= size <= MAX_HEADER_BYTES:
        raise TraceFormatError(f"{where}: header length {size} not in [1, {MAX_HEADER_BYTES}]")
    header = _unpack(_read_exact(file, size, where, "header"), where, "header")
    if not isinstance(header, dict):
        raise TraceFormatError(f"{where}: bad header (not a map)")
    version = header.get("version")
    if version != FORMAT_VERSION:
        raise TraceFormatError(
            f"{where}: format version {version!r} is not supported (this expertd reads {FORMAT_VERSION})"
        )
    unknown = sorted(set(header) - _HEADER_FIELDS)
    missing = sorted(_HEADER_FIELDS - set(header))
    if unknown or missing:
        field_name = (unknown or missing)[0]
        raise TraceFormatError(
            f"{where}: bad header: {'unknown' if unknown else 'missing'} field {field_name!r}"
        )
    fields = {name: value for name, value in header.items() if name != "version"}
    try:
        return TraceMeta(**fields)
    except ValueError as exc:
        raise TraceFormatError(f"{where}: bad header: {exc}") from None


def _scan(file: IO[bytes], where: str, meta: TraceMeta) -> tuple[list[_ChunkRef], dict[str, Any]]:
    """Walk the chunk headers to the end record, so truncation shows before any row is used."""
    size = os.fstat(file.fileno()).st_size
    chunks: list[_ChunkRef] = []
    while True:
        index = len(chunks)
        tag = file.read(1)
        if not tag:
            raise TraceFormatError(
                f"{where}: truncated after chunk {index - 1} (no end record)"
                if chunks
                else f"{where}: truncated after the header"
            )
        if tag == _TAG_END:
            break
        if tag != _TAG_CHUNK:
            raise TraceFormatError(f"{where}: bad record tag {tag!r} at chunk {index}")
        head = _read_exact(file, _CHUNK.size - 1, where, f"chunk {index}")
        _, rows, raw_len, comp_len, crc = _CHUNK.unpack(tag + head)
        for name, value, high in (
            ("rows", rows, MAX_CHUNK_ROWS),
            ("raw length", raw_len, MAX_CHUNK_BYTES),
            ("compressed length", comp_len, MAX_COMPRESSED_BYTES),
        ):
            if not 1 <= value <= high:
                raise TraceFormatError(f"{where}: chunk {index} {name} {value} not in [1, {high}]")
        offset = file.tell()
        if offset + comp_len > size:
            raise TraceFormatError(f"{where}: truncated in chunk {index}")
        chunks.append(_ChunkRef(index, offset, rows, raw_len, comp_len, crc))
        file.seek(comp_len, os.SEEK_CUR)
    (length,) = _LEN.unpack(_read_exact(file, _LEN.size, where, "end record"))
    if not 1 <= length <= MAX_END_BYTES:
        raise TraceFormatError(f"{where}: end record length {length} not in [1, {MAX_END_BYTES}]")
    end = _unpack(_read_exact(file, length, where, "end record"), where, "end record")
    trailing = size - file.tell()
    if trailing:
        raise TraceFormatError(f"{where}: {trailing} bytes after the end record")
    if not isinstance(end, dict) or set(end) != {"rows", "chunks", "extra"}:
        raise TraceFormatError(f"{where}: bad end record (expected rows, chunks, extra)")
    rows = sum(chunk.rows for chunk in chunks)
    if end["rows"] != rows or end["chunks"] != len(chunks):
        raise TraceFormatError(
            f"{where}: end record says {end['rows']!r} rows in "
            f"{end['chunks']!r} chunks, the file has {rows} in {len(chunks)}"
        )
    if not rows:
        raise TraceFormatError(f"{where}: empty trace (no rows)")
    try:
        check_extra(end["extra"])
    except ValueError as exc:
        raise TraceFormatError(f"{where}: bad end record: {exc}") from None
    return chunks, end["extra"]


def _open(path: str | os.PathLike[str], file: IO[bytes]) -> tuple[TraceMeta, list[_ChunkRef]]:
    where = os.fspath(path)
    meta = _read_header(file, where)
    chunks, extra = _scan(file, where, meta)
    return replace(meta, extra={**meta.extra, **extra}), chunks


def _decode_column(where: str, chunk: _ChunkRef, name: str, spec: Any, shape: tuple[int, ...]) -> np.ndarray:
    at = f"{where}: chunk {chunk.index} column {name!r}"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data"}:
        raise TraceFormatError(f"{at}: expected a map of dtype, shape, data")
    allowed = _SCORE_DTYPES if name == "scores" else (_FILE_DTYPES[name],)
    if spec["dtype"] not in allowed:
        raise TraceFormatError(f"{at}: dtype {spec['dtype']!r} is not {' or '.join(allowed)}")
    if spec["shape"] != list(shape):
        raise TraceFormatError(f"{at}: shape {spec['shape']!r}, expected {list(shape)}")
    dtype = np.dtype(spec["dtype"])
    data = spec["data"]
    if not isinstance(data, bytes) or len(data) != dtype.itemsize * int(np.prod(shape)):
        raise TraceFormatError(f"{at}: data is not {int(np.prod(shape))} x {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _read_chunk(file: IO[bytes], where: str, meta: TraceMeta, chunk: _ChunkRef) -> Trace:
    file.seek(chunk.offset)
    compressed = _read_exact(file, chunk.comp_len, where, f"chunk {chunk.index}")
    if zlib.crc32(compressed) != chunk.crc:
        raise TraceFormatError(f"{where}: checksum mismatch in chunk {chunk.index} (corrupt file)")
    try:
        raw = lz4.block.decompress(compressed, uncompressed_size=chunk.raw_len)
    except lz4.block.LZ4BlockError:
        raw = b""
    if len(raw) != chunk.raw_len:
        raise TraceFormatError(f"{where}: chunk {chunk.index} does not decompress (corrupt file)")
    payload = _unpack(raw, where, f"chunk {chunk.index}")
    names = {"request", "token", "layer", "experts"}
    names |= {"scores"} if meta.has_scores else set()
    names |= {"phase"} if meta.has_phase else set()
    if not isinstance(payload, dict) or set(payload) != names:
        raise TraceFormatError(f"{where}: chunk {chunk.index} columns are not {sorted(names)}")
    wide = (chunk.rows, meta.top_k)
    columns = {
        name: _decode_column(
            where,
            chunk,
            name,
            payload[name],
            wide if name in ("experts", "scores") else (chunk.rows,),
        )
        for name in payload
    }
    return Trace(meta, **columns)


def _batches(file: IO[bytes], where: str, meta: TraceMeta, chunks: list[_ChunkRef]) -> Iterator[Trace]:
    checker = RowChecker(where, meta)
    scores_dtype = None
    for chunk in chunks:
        batch = _read_chunk(file, where, meta, chunk)
        if batch.scores is not None:
            if scores_dtype not in (None, batch.scores.dtype):
                problem = f"scores are {batch.scores.dtype}, earlier chunks' {scores_dtype}"
                raise checker.fail(f"chunk {chunk.index} {problem}")
            scores_dtype = batch.scores.dtype
        checker.check(batch)
        yield batch


def read_meta(path: str | os.PathLike[str]) -> TraceMeta:
    """The metadata of a trace file; the file's structure is checked, its rows are not read."""
    with open(path, "rb") as file:
        return _open(path, file)[0]


def iter_chunks(path: str | os.PathLike[str]) -> Iterator[Trace]:
    """Yield the file's rows chunk by chunk, each a validated Trace carrying the file's meta.

    The whole file's structure (truncation, end record) is checked before the first chunk.
    """
    with open(path, "rb") as file:
        meta, chunks = _open(path, file)
        yield from _batches(file, os.fspath(path), meta, chunks)


def read_trace(path: str | os.PathLike[str], *, max_rows: int = DEFAULT_MAX_ROWS) -> Trace:
    """Read and validate a whole trace file; more than `max_rows` rows is an error."""
    where = os.fspath(path)
    with open(path, "rb") as file:
        meta, chunks = _open(path, file)
        rows = sum(chunk.rows for chunk in chunks)
        if rows > max_rows:
            raise TraceFormatError(f"{where}: {rows} rows exceed max_rows={max_rows}")
        return Trace.concat(meta, list(_batches(file, where, meta, chunks)))
