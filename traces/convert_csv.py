"""`moe-beyond-csv`: MoE-Beyond expert-activation CSVs, one file per request.

Columns ``Layer ID, Batch Number, Token, Activated Expert IDs`` (the ids a JSON list such as
``"[3, 17]"``); rows are grouped by layer and in token order within a layer, so the n-th row of a
layer is token n of the request. Layer ids are renumbered 0..L-1 in ascending order (the first
file's ids define them; they are kept in ``meta.extra["moe_layer_ids"]``). A layer with fewer rows
than the others leaves the last tokens without it: the rows are kept and the missing cells counted
in ``meta.extra``. ``Batch Number`` must be an integer; ``Token`` is not used. The CSVs do not
say how many experts a layer has: the default is DeepSeek-V2-Lite's 64. A file whose last row was
cut short (its writer stopped mid-row) loses that row with a warning; ``meta.extra`` lists where.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

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
from expertd.traces.format import TraceFormatError, TraceWriter

COLUMNS = ("Layer ID", "Batch Number", "Token", "Activated Expert IDs")
DEFAULT_MODEL = "deepseek-ai/DeepSeek-V2-Lite"
DEFAULT_EXPERTS = 64


def _int_field(where: str, name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise TraceFormatError(f"{where}: {name} {text!r} is not an integer") from None


def _expert_ids(where: str, text: str, top_k: int | None) -> list[int]:
    try:
        ids = json.loads(text)
    except json.JSONDecodeError:
        ids = None
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    ):
        raise TraceFormatError(f"{where}: Activated Expert IDs {text!r} is not a list of ints")
    if top_k is not None and len(ids) != top_k:
        raise TraceFormatError(f"{where}: {len(ids)} expert ids, expected top-k {top_k}")
    return ids


class _Lines:
    """A text file's lines, remembering the last one read (to see whether the file ends mid-row)."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self.last = ""

    def __iter__(self) -> Iterator[str]:
        for line in self.file:
            self.last = line
            yield line


Layers = dict[int, tuple[list[int], list[list[int]]]]


def _read_layers(path: Path, top_k: int | None) -> tuple[Layers, str | None]:
    """Layer id -> (line numbers, expert id lists) of one CSV, rows in file order; and where a
    truncated final row was skipped, if one was."""
    layers: Layers = {}
    with open(path, newline="", encoding="utf-8") as file:
        lines = _Lines(file)
        reader = csv.reader(lines)
        header = [name.strip() for name in next(reader, [])]
        for name in COLUMNS:
            if name not in header:
                raise TraceFormatError(f"{path}:1: missing column {name!r}")
        at = [header.index(name) for name in COLUMNS]
        last = None
        for number, row in enumerate(reader, 2):
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{number}"
            try:
                if len(row) != len(header):
                    raise TraceFormatError(f"{where}: {len(row)} fields, the header has {len(header)}")
                layer = _int_field(where, "Layer ID", row[at[0]])
                _int_field(where, "Batch Number", row[at[1]])
                ids = _expert_ids(where, row[at[3]], top_k)
            except TraceFormatError as exc:
                ends_mid_row = not lines.last.endswith("\n") or len(row) < len(header)
                cut = ends_mid_row and _whole_but_last(row, len(header), at, top_k)
                if cut and not any(any(cell.strip() for cell in rest) for rest in reader):  # the final row
                    return _nonempty(path, layers), skip_truncated_final_row(
                        where, str(exc).removeprefix(where + ": ")
                    )
                raise
            top_k = len(ids)
            if layer != last and layer in layers:
                raise TraceFormatError(f"{where}: layer {layer} again (rows must be grouped by layer)")
            row_lines, experts = layers.setdefault(layer, ([], []))
            row_lines.append(number)
            experts.append(ids)
            last = layer
    return _nonempty(path, layers), None


def _whole_but_last(row: list[str], fields: int, at: list[int], top_k: int | None) -> bool:
    """Whether ``row`` could be a valid row cut short: every field before its last one is valid."""
    if len(row) > fields:
        return False
    try:
        for i, text in enumerate(row[:-1]):
            if i in (at[0], at[1]):
                _int_field("", "", text)
            elif i == at[3]:
                _expert_ids("", text, top_k)
    except TraceFormatError:
        return False
    return True


def _nonempty(path: Path, layers: Layers) -> Layers:
    if not layers:
        raise TraceFormatError(f"{path}: no rows")
    return layers


def _token_order(
    path: Path,
    layers: Layers,
    layer_ids: list[int],
    num_experts: int,
) -> tuple[np.ndarray, ...]:
    """(token, layer index, experts) of one request in token order."""
    tokens, indexes, experts, lines = [], [], [], []
    for layer, (layer_lines, layer_experts) in layers.items():
        if layer not in layer_ids:
            raise TraceFormatError(
                f"{path}:{layer_lines[0]}: layer {layer} is not one of the first file's layers {layer_ids}"
            )
        tokens.append(np.arange(len(layer_lines)))
        indexes.append(np.full(len(layer_lines), layer_ids.index(layer)))
        experts.extend(layer_experts)
        lines.extend(layer_lines)
    token, index = np.concatenate(tokens), np.concatenate(indexes)
    expert_array = np.asarray(experts, dtype=np.int64)  # [n, k]
    problem = expert_problem(expert_array, num_experts)
    if problem:
        raise TraceFormatError(f"{path}:{lines[problem[0]]}: {problem[1]}")
    order = np.lexsort((index, token))
    return token[order], index[order], expert_array[order]


@converter("moe-beyond-csv", "MoE-Beyond CSVs, one per request: Layer ID, Token, expert id list")
def convert_csv(src: Path, out: Path, options: ConvertOptions) -> None:
    """Each CSV is a request named by its path under SRC without the suffix."""
    files = source_files(src, ".csv")
    names = [
        path.stem if src.is_file() else path.relative_to(src).with_suffix("").as_posix() for path in files
    ]
    first, skipped = _read_layers(files[0], None)
    truncated = [skipped] if skipped else []
    layer_ids = sorted(first)
    meta = make_meta(
        options,
        model=DEFAULT_MODEL,
        num_layers=len(layer_ids),
        num_experts=DEFAULT_EXPERTS,
        top_k=len(next(iter(first.values()))[1][0]),
        source=f"moe-beyond-csv: {len(files)} files under {src.name}",
        requests=names,
        extra={"moe_layer_ids": layer_ids},
    )
    missing: dict[str, int] = {}
    with TraceWriter(out, meta) as writer:
        for request, path in enumerate(progress(files, "moe-beyond-csv")):
            layers = first
            if request > 0:
                layers, skipped = _read_layers(path, meta.top_k)
                truncated += [skipped] if skipped else []
            token, layer, experts = _token_order(path, layers, layer_ids, meta.num_experts)
            writer.append(request, token, layer, experts)
            cells = (int(token.max()) + 1) * len(layer_ids) - len(token)
            if cells:
                missing[names[request]] = cells
        extra: dict[str, object] = {
            "missing_cells": sum(missing.values()),
            "missing_cells_by_request": missing,
        }
        if truncated:
            extra["truncated_rows_skipped"] = truncated
        writer.update_extra(extra)
