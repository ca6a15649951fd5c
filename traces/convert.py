"""Converters from public routing dumps to `.etrace`, registered by format name.

Each converter lives in its own module (`convert_<format>.py`) and registers itself with
`@converter`; it streams its source, writes rows in token order through `TraceWriter`, and
turns malformed input into a `TraceFormatError` that names the source file and line or element.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from expertd.traces.format import TraceFormatError, TraceMeta

# The shared folder beside the repository holds raw traces that may not be redistributed.
SHARED = Path(os.environ.get("EXPERTD_SHARED") or Path(__file__).resolve().parents[2] / "shared")
SHARED_RAW = SHARED / "traces-raw"

UNKNOWN_LICENSE = "not stated by the source"

# Modules whose import registers the built-in converters (one format per module).
_BUILTIN_MODULES = ("convert_mixtral", "convert_sglang", "convert_granite", "convert_csv", "convert_engines")

T = TypeVar("T")


@dataclass(frozen=True)
class ConvertOptions:
    """Overrides for what a source does not say (or says wrongly)."""

    model: str | None = None
    license: str | None = None
    source: str | None = None
    num_experts: int | None = None
    num_layers: int | None = None  # for a source whose rows carry no shape (SGLang's raw int32)
    top_k: int | None = None


ConvertFn = Callable[[Path, Path, ConvertOptions], None]


@dataclass(frozen=True)
class Converter:
    name: str
    summary: str  # one line for `expertd trace formats`
    run: ConvertFn


_CONVERTERS: dict[str, Converter] = {}


def converter(name: str, summary: str) -> Callable[[ConvertFn], ConvertFn]:
    """Function decorator: make `fn(src, out, options)` the converter for format `name`."""

    def wrap(fn: ConvertFn) -> ConvertFn:
        if name in _CONVERTERS and _CONVERTERS[name].run is not fn:
            raise ValueError(f"trace format {name!r} registered twice")
        _CONVERTERS[name] = Converter(name, summary, fn)
        return fn

    return wrap


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"expertd.traces.{module}")


def formats() -> list[Converter]:
    """Every registered converter, sorted by name."""
    _load_builtins()
    return [_CONVERTERS[name] for name in sorted(_CONVERTERS)]


def convert(
    fmt: str, src: str | os.PathLike[str], out: str | os.PathLike[str], options: ConvertOptions
) -> None:
    """Convert `src` (a file or a directory of the format's files) into the trace file `out`."""
    _load_builtins()
    if fmt not in _CONVERTERS:
        raise ValueError(f"unknown trace format {fmt!r} (known: {', '.join(sorted(_CONVERTERS))})")
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    _CONVERTERS[fmt].run(src, Path(out), options)


def source_files(src: Path, suffix: str) -> list[Path]:
    """`src` itself, or the `*suffix` files under the directory `src` in natural order."""
    if src.is_file():
        return [src]
    files = sorted(src.rglob(f"*{suffix}"), key=natural_key)
    if not files:
        raise TraceFormatError(f"{src}: no {suffix} files in this directory")
    return files


def natural_key(path: Path) -> tuple[Any, ...]:
    """Sort key: folders by name, then numeric stems by value (2.json before 10.json)."""
    stem = path.stem
    return (path.parent.as_posix(), not stem.isdigit(), int(stem) if stem.isdigit() else 0, stem)


def skip_truncated_final_row(where: str, problem: str) -> str:
    """Warn that the final row at ``where`` (file:line) is skipped as cut short; returns ``where``.

    A dump whose writer was stopped mid-row ends in a partial row; the rows before it are
    whole, so the run goes on without it. Converters call this only for the last row of a file
    that fails to parse and is visibly cut (no final newline, or fewer fields than the header):
    anything else malformed still fails the run.
    """
    print(f"expertd trace: warning: {where}: truncated final row skipped ({problem})", file=sys.stderr)
    return where


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """`items` with a progress bar on stderr when stderr is a terminal."""
    yield from tqdm(items, desc=desc, total=total, unit="file", disable=None, leave=False)


def make_meta(options: ConvertOptions, **fields: Any) -> TraceMeta:
    """TraceMeta from a converter's `fields`, with the user's overrides applied."""
    fields.setdefault("license", UNKNOWN_LICENSE)
    for name in ("model", "license", "source", "num_experts"):
        if getattr(options, name) is not None:
            fields[name] = getattr(options, name)
    return TraceMeta(**fields)


def expert_problem(experts: np.ndarray, num_experts: int) -> tuple[int, str] | None:
    """The first row of `experts` [n, k] with an id out of range or repeated, and what is wrong."""
    out_of_range = (experts < 0) | (experts >= num_experts)  # [n, k]
    ordered = np.sort(experts, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(1)  # [n]
    bad = np.flatnonzero(out_of_range.any(1) | repeated)
    if not bad.size:
        return None
    row = int(bad[0])
    if out_of_range[row].any():
        value = experts[row][out_of_range[row]][0]
        return row, f"expert id {value} out of range [0, {num_experts})"
    value = ordered[row][1:][ordered[row][1:] == ordered[row][:-1]][0]
    return row, f"duplicate expert id {value}"


def int_array(value: Any, ndim: int) -> np.ndarray | None:
    """`value` (nested JSON lists) as an int64 array of `ndim` dims, or None if it is not one."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError):  # ragged
        return None
    if array.ndim != ndim or (array.size and array.dtype.kind not in "iu"):
        return None
    return array.astype(np.int64)
