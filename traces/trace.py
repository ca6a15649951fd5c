"""Routing traces in memory: `TraceMeta`, `Trace` and the row checks every reader and writer runs.

Rows are in *token order*: sorted by request (ids numbered in order of first appearance), then
token, then layer. Each token visits its layers in order and every token, prefill tokens too, is
its own forward pass: the access order a cache replay uses. A token may lack some layers (rows a
profiler dropped); no row is ever invented.

Legend for shape comments: N rows, k = top_k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PHASE_PREFILL = 0
PHASE_DECODE = 1
MAX_TOP_K = 64
MAX_LAYERS = MAX_EXPERTS = int(np.iinfo(np.int16).max)


class TraceFormatError(ValueError):
    """A trace file (or trace data) that breaks the format; the message names file and problem."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_extra(extra: object) -> None:
    """Raise ValueError unless `extra` is a msgpack-serializable dict with str keys."""
    if not isinstance(extra, dict) or not all(isinstance(key, str) for key in extra):
        raise ValueError("extra must be a dict with str keys")
    try:
        msgpack.packb(extra, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"extra is not msgpack-serializable: {exc}") from None


@dataclass(frozen=True)
class TraceMeta:
    """What a trace is of: model geometry, provenance, request names (request id = index)."""

    model: str
    num_layers: int
    num_experts: int  # per layer
    top_k: int
    source: str = ""
    license: str = ""
    requests: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    has_scores: bool = False
    has_phase: bool = False

    def __post_init__(self) -> None:
        for name in ("model", "source", "license"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {getattr(self, name)!r}")
        if not self.model:
            raise ValueError("model must not be empty")
        for name, high in (("num_layers", MAX_LAYERS), ("num_experts", MAX_EXPERTS)):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an int in [1, {high}], got {value!r}")
        high_k = min(self.num_experts, MAX_TOP_K)
        if not _is_int(self.top_k) or not 1 <= self.top_k <= high_k:
            raise ValueError(f"top_k must be an int in [1, {high_k}], got {self.top_k!r}")
        if not isinstance(self.requests, list) or not all(
            isinstance(name, str) and name for name in self.requests
        ):
            raise ValueError("requests must be a list of non-empty str")
        if len(set(self.requests)) != len(self.requests):
            raise ValueError("request names must be unique")
        check_extra(self.extra)
        for name in ("has_scores", "has_phase"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


def _as_column(name: str, values: Any, dtype: np.dtype[Any], ndim: int) -> np.ndarray:
    """`values` as an array of `dtype`; integers are range-checked before narrowing."""
    array = np.asarray(values)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {list(array.shape)}")
    if array.dtype == dtype:
        return array
    if dtype.kind == "f":  # float16 stays float16; other numbers become `dtype`
        if array.dtype.kind not in "fiu":
            raise ValueError(f"{name} must be floats, got dtype {array.dtype}")
        return array if array.dtype == np.float16 else array.astype(dtype)
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        bad = array[(array < info.min) | (array > info.max)].flat[0]
        raise ValueError(f"{name} value {bad} does not fit {dtype}")
    return array.astype(dtype)


@dataclass(eq=False)
class Trace:
    """A routing trace: equal-length columns in token order (see the module docstring)."""

    meta: TraceMeta
    request: np.ndarray  # int32 [N]
    token: np.ndarray  # int32 [N], prompt positions 0..P-1 then decode steps P..
    layer: np.ndarray  # int16 [N], 0-based MoE layer index
    experts: np.ndarray  # int16 [N, k], highest gate first
    scores: np.ndarray | None = None  # float16 or float32 [N, k]
    phase: np.ndarray | None = None  # uint8 [N], PHASE_PREFILL or PHASE_DECODE

    def __post_init__(self) -> None:
        self.request = _as_column("request", self.request, np.dtype(np.int32), 1)
        self.token = _as_column("token", self.token, np.dtype(np.int32), 1)
        self.layer = _as_column("layer", self.layer, np.dtype(np.int16), 1)
        self.experts = _as_column("experts", self.experts, np.dtype(np.int16), 2)
        rows = len(self.request)
        shapes = {"token": self.token.shape, "layer": self.layer.shape}
        shapes["experts"] = self.experts.shape
        if self.meta.has_scores != (self.scores is not None):
            raise ValueError(
                f"scores given: {self.scores is not None}, meta.has_scores: {self.meta.has_scores}"
            )
        if self.meta.has_phase != (self.phase is not None):
            raise ValueError(f"phase given: {self.phase is not None}, meta.has_phase: {self.meta.has_phase}")
        if self.scores is not None:
            self.scores = _as_column("scores", self.scores, np.dtype(np.float32), 2)
            shapes["scores"] = self.scores.shape
        if self.phase is not None:
            self.phase = _as_column("phase", self.phase, np.dtype(np.uint8), 1)
            shapes["phase"] = self.phase.shape
        for name, shape in shapes.items():
            want = (rows, self.meta.top_k) if name in ("experts", "scores") else (rows,)
            if shape != want:
                raise ValueError(f"{name} has shape {list(shape)}, expected {list(want)}")

    def __len__(self) -> int:
        return len(self.request)

    def num_tokens(self) -> int:
        """Distinct (request, token) pairs."""
        pairs = (self.request.astype(np.int64) << 32) | self.token.astype(np.int64)
        steps = np.diff(pairs)
        if np.all(steps >= 0):
            return int(np.count_nonzero(steps)) + int(len(pairs) > 0)
        return len(np.unique(pairs))

    def keys(self) -> np.ndarray:
        """The access sequence: ``layer * num_experts + expert``, row-major, int64 [N*k]."""
        layer = self.layer.astype(np.int64)[:, None]  # [N, 1]
        return (layer * self.meta.num_experts + self.experts).ravel()

    def select(self, mask: np.ndarray) -> Trace:
        """The rows where the boolean `mask` [N] is true, same meta (e.g. ``phase == 1``)."""
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (len(self),):
            raise ValueError(f"mask must be bool of shape [{len(self)}], got {mask.dtype} {list(mask.shape)}")
        return self._map(lambda column: column[mask])

    def slice(self, start: int, stop: int) -> Trace:
        """Rows ``start:stop`` (views, no copy)."""
        return self._map(lambda column: column[start:stop])

    def columns(self) -> tuple[np.ndarray | None, ...]:
        """``(request, token, layer, experts, scores, phase)``, the constructor's order."""
        return (self.request, self.token, self.layer, self.experts, self.scores, self.phase)

    def _map(self, fn: Callable[[np.ndarray], np.ndarray]) -> Trace:
        scores = None if self.scores is None else fn(self.scores)
        phase = None if self.phase is None else fn(self.phase)
        columns = (fn(self.request), fn(self.token), fn(self.layer), fn(self.experts))
        return Trace(self.meta, *columns, scores, phase)

    @staticmethod
    def concat(meta: TraceMeta, parts: Sequence[Trace]) -> Trace:
        """One trace of `parts` in order (all with `meta`'s columns)."""
        if len(parts) == 1:
            return parts[0]

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(part, name) for part in parts])

        scores = cat("scores") if meta.has_scores else None
        phase = cat("phase") if meta.has_phase else None
        return Trace(meta, cat("request"), cat("token"), cat("layer"), cat("experts"), scores, phase)

    def validate(self, where: str = "trace") -> None:
        """Raise TraceFormatError (prefixed with `where`) unless every row is valid and ordered."""
        if not len(self):
            raise TraceFormatError(f"{where}: empty trace (no rows)")
        RowChecker(where, self.meta).check(self)


class RowChecker:
    """Validates batches of rows in sequence, carrying the order state from batch to batch."""

    def __init__(self, where: str, meta: TraceMeta) -> None:
        self.where = where
        self.meta = meta
        self.rows = 0
        self.last: tuple[int, int, int] | None = None  # (request, token, layer) of the last row

    def fail(self, problem: str) -> TraceFormatError:
        return TraceFormatError(f"{self.where}: {problem}")

    def check(self, batch: Trace) -> None:
        if not len(batch):
            return
        meta, row0 = self.meta, self.rows
        for name, column, high in (
            ("request id", batch.request, len(meta.requests)),
            ("layer", batch.layer, meta.num_layers),
            ("expert id", batch.experts, meta.num_experts),
        ):
            bad = np.flatnonzero(((column < 0) | (column >= high)).reshape(len(batch), -1).any(1))
            if bad.size:
                row = column[bad[0]].reshape(-1)
                value = row[(row < 0) | (row >= high)][0]
                raise self.fail(f"{name} {value} out of range [0, {high}) at row {row0 + bad[0]}")
        bad = np.flatnonzero(batch.token < 0)
        if bad.size:
            raise self.fail(f"token {batch.token[bad[0]]} is negative at row {row0 + bad[0]}")
        ordered = np.sort(batch.experts, axis=1)  # [N, k]
        bad = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(1))
        if bad.size:
            row = ordered[bad[0]]
            value = row[1:][row[1:] == row[:-1]][0]
            raise self.fail(f"duplicate expert id {value} at row {row0 + bad[0]}")
        if batch.scores is not None:
            bad = np.flatnonzero(~np.isfinite(batch.scores).all(1))
            if bad.size:
                value = batch.scores[bad[0]][~np.isfinite(batch.scores[bad[0]])][0]
                raise self.fail(f"score {value} is not finite at row {row0 + bad[0]}")
        if batch.phase is not None:
            bad = np.flatnonzero(batch.phase > PHASE_DECODE)
            if bad.size:
                raise self.fail(
                    f"phase {batch.phase[bad[0]]} at row {row0 + bad[0]} "
                    f"(expected {PHASE_PREFILL} = prefill or {PHASE_DECODE} = decode)"
                )
        self._check_order(batch)
        self.rows += len(batch)

    def _check_order(self, batch: Trace) -> None:
        cols = [batch.request, batch.token, batch.layer]
        if self.last is not None:
            cols = [np.concatenate(([prev], col)) for prev, col in zip(self.last, cols, strict=True)]
        request, token, layer = (col.astype(np.int64) for col in cols)
        d_req, d_tok, d_lay = np.diff(request), np.diff(token), np.diff(layer)
        ok = (d_req > 0) | ((d_req == 0) & ((d_tok > 0) | ((d_tok == 0) & (d_lay > 0))))
        bad = np.flatnonzero(~ok)
        if bad.size:
            i = bad[0]
            row = self.rows + i + (0 if self.last is not None else 1)
            raise self.fail(
                f"row {row} is out of token order: (request, token, layer) "
                f"({request[i + 1]}, {token[i + 1]}, {layer[i + 1]}) follows "
                f"({request[i]}, {token[i]}, {layer[i]})"
            )
        self.last = (int(request[-1]), int(token[-1]), int(layer[-1]))
