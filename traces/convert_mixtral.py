"""`mixtral-jsonl`: speculative-moe's Mixtral-8x7B routing JSONL (processed or raw forward order).

Each line is one (token, layer) record: dataset, problem_id, layer, experts, gating_probs and
either ``token_idx`` (processed files: decode tokens only, counted per layer) or ``token_pos``
(the raw profiler file: lines in forward order, the prefill pass first; a new pass starts when
the layer does not go up). A request (``dataset/problem_id``) found in a raw file is taken from
it and its processed rows are ignored: the raw file has the prefill, and its decode tokens stay
aligned across layers where a processed ``token_idx`` shifts after a dropped row. Rows the
profiler dropped (gates [0.5, 0.5]) stay missing; ``meta.extra`` counts them per request. A file
whose last line was cut short (not JSON, no final newline) loses that line with a warning.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertd.traces.convert import (
    ConvertOptions,
    converter,
    expert_problem,
    make_meta,
    progress,
    skip_truncated_final_row,
    source_files,
)
from expertd.traces.format import PHASE_DECODE, PHASE_PREFILL, TraceFormatError, TraceWriter

DEFAULT_MODEL = "neuralmagic/Mixtral-8x7B-Instruct-v0.1-FP8"
NUM_LAYERS, NUM_EXPERTS, TOP_K = 32, 8, 2


@dataclass
class _Records:
    """One request's records from one file, in line order."""

    path: Path
    raw: bool
    line: list[int] = field(default_factory=list)
    layer: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)  # token_pos (raw) or token_idx (processed)
    experts: list[Any] = field(default_factory=list)
    probs: list[Any] = field(default_factory=list)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_record(where: str, record: Any, pos_key: str) -> None:
    if not isinstance(record, dict):
        raise TraceFormatError(f"{where}: expected a JSON object")
    if not isinstance(record.get("dataset"), str) or not record["dataset"]:
        raise TraceFormatError(f"{where}: 'dataset' must be a non-empty string")
    for key in ("problem_id", pos_key):
        if not _is_int(record.get(key)) or record[key] < 0:
            raise TraceFormatError(f"{where}: {key!r} must be an integer >= 0")
    layer = record.get("layer")
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < NUM_LAYERS:
        raise TraceFormatError(f"{where}: layer {layer!r} out of range [0, {NUM_LAYERS})")
    experts, probs = record.get("experts"), record.get("gating_probs")
    if not isinstance(experts, list) or len(experts) != TOP_K or not all(map(_is_int, experts)):
        raise TraceFormatError(f"{where}: 'experts' must be a list of {TOP_K} integers")
    if (
        not isinstance(probs, list)
        or len(probs) != TOP_K
        or not all(isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p) for p in probs)
    ):
        raise TraceFormatError(f"{where}: 'gating_probs' must be a list of {TOP_K} finite numbers")


def _read_file(path: Path, truncated: list[str]) -> dict[str, _Records] | None:
    """Records by request name; None if the file holds no routing records (e.g. outputs).

    A cut final line is skipped and its location appended to ``truncated``.
    """
    requests: dict[str, _Records] = {}
    pos_key = ""
    with open(path, encoding="utf-8") as file:
        for number, text in enumerate(file, 1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                if not text.endswith("\n") and requests:  # the last line, and the writer stopped in it
                    truncated.append(skip_truncated_final_row(where, f"not JSON ({exc.msg})"))
                    break
                raise TraceFormatError(f"{where}: not JSON ({exc.msg})") from None
            if not pos_key:
                if isinstance(record, dict) and "layer" not in record and "experts" not in record:
                    return None
                keys = record if isinstance(record, dict) else {}
                pos_key = "token_pos" if "token_pos" in keys else "token_idx"
            _check_record(where, record, pos_key)
            name = f"{record['dataset']}/{record['problem_id']}"
            records = requests.setdefault(name, _Records(path, raw=pos_key == "token_pos"))
            records.line.append(number)
            records.layer.append(record["layer"])
            records.pos.append(record[pos_key])
            records.experts.append(record["experts"])
            records.probs.append(record["gating_probs"])
    return requests


def _tokens_and_phase(name: str, rec: _Records) -> tuple[np.ndarray, np.ndarray, int]:
    """Token index and phase per record, and the number of (token, layer) cells expected."""
    pos = np.asarray(rec.pos, dtype=np.int64)
    if not rec.raw:  # processed: decode tokens only; the prompt length is unknown
        cells = (int(pos.max()) + 1) * NUM_LAYERS
        return pos, np.full(len(pos), PHASE_DECODE), cells
    passes = np.zeros(len(pos), dtype=np.int64)
    current, previous = 0, NUM_LAYERS
    for i, layer in enumerate(rec.layer):  # the prefill repeats a layer once per position
        if layer < previous or (current > 0 and layer == previous):
            current += int(i > 0)
        passes[i], previous = current, layer
    prefill = passes == 0
    decode_pos = np.flatnonzero(~prefill & (pos != 0))
    if decode_pos.size:
        i = decode_pos[0]
        raise TraceFormatError(
            f"{rec.path}:{rec.line[i]}: {name} decode pass {passes[i]} has "
            f"token_pos {pos[i]} (expected 0, one token per pass)"
        )
    prompt = int(pos[prefill].max()) + 1 if prefill.any() else 0
    tokens = np.where(prefill, pos, prompt + passes - 1)
    phase = np.where(prefill, PHASE_PREFILL, PHASE_DECODE)
    return tokens, phase, (prompt + int(passes.max())) * NUM_LAYERS


def _request_columns(name: str, rec: _Records) -> tuple[dict[str, np.ndarray], int]:
    """Token-ordered columns of one request and its count of missing (token, layer) cells."""
    tokens, phase, cells = _tokens_and_phase(name, rec)
    layer = np.asarray(rec.layer, dtype=np.int64)
    experts = np.asarray(rec.experts, dtype=np.int64)  # [n, k]
    problem = expert_problem(experts, NUM_EXPERTS)
    if problem:
        raise TraceFormatError(f"{rec.path}:{rec.line[problem[0]]}: {problem[1]}")
    order = np.lexsort((layer, tokens))
    tokens, layer = tokens[order], layer[order]
    twice = np.flatnonzero((tokens[1:] == tokens[:-1]) & (layer[1:] == layer[:-1]))
    if twice.size:
        line = rec.line[order[twice[0] + 1]]
        raise TraceFormatError(
            f"{rec.path}:{line}: {name} has token {tokens[twice[0]]} at layer {layer[twice[0]]} twice"
        )
    columns = {"token": tokens, "layer": layer, "experts": experts[order]}
    columns["scores"] = np.asarray(rec.probs, dtype=np.float32)[order]
    columns["phase"] = phase[order]
    return columns, cells - len(order)


def _request_key(name: str) -> tuple[str, int]:
    dataset, _, problem = name.rpartition("/")
    return dataset, int(problem)


@converter("mixtral-jsonl", "speculative-moe Mixtral JSONL: processed token_idx or raw token_pos")
def convert_mixtral(src: Path, out: Path, options: ConvertOptions) -> None:
    """Requests sorted by (dataset, problem_id); raw forward-order records win over processed."""
    chosen: dict[str, _Records] = {}
    ignored: dict[str, str] = {}
    files = source_files(src, ".jsonl")
    truncated: list[str] = []
    for path in progress(files, "mixtral-jsonl"):
        found = _read_file(path, truncated)
        if found is None:
            if path == src:
                raise TraceFormatError(f"{path}:1: not a routing record (no 'layer', 'experts')")
            continue
        for name, rec in found.items():
            old = chosen.get(name)
            if old is None:
                chosen[name] = rec
                continue
            if old.raw == rec.raw:
                raise TraceFormatError(f"{path}: request {name} is also in {old.path}")
            raw, processed = (rec, old) if rec.raw else (old, rec)
            chosen[name], ignored[name] = raw, processed.path.name
    if not chosen:
        raise TraceFormatError(f"{src}: no routing records")
    names = sorted(chosen, key=_request_key)
    requests = [_request_columns(name, chosen[name]) for name in names]
    missing = {name: cells for name, (_, cells) in zip(names, requests, strict=True)}
    meta = make_meta(
        options,
        model=DEFAULT_MODEL,
        num_layers=NUM_LAYERS,
        num_experts=NUM_EXPERTS,
        top_k=TOP_K,
        source=f"mixtral-jsonl: {', '.join(sorted({rec.path.name for rec in chosen.values()}))}",
        requests=names,
        extra={
            "missing_cells": sum(missing.values()),
            "missing_cells_by_request": missing,
            "request_files": {name: chosen[name].path.name for name in names},
            "ignored_processed_files": ignored,
            **({"truncated_rows_skipped": truncated} if truncated else {}),
        },
        has_scores=True,
        has_phase=True,
    )
    with TraceWriter(out, meta) as writer:
        for request, (columns, _) in enumerate(requests):
            writer.append(request, **columns)
