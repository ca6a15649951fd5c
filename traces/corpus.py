"""The real routing traces expertd is evaluated on, by short name.

Granite (MIT) ships in ``traces/data``. Llama-4-Maverick and Mixtral-8x7B are research
data of unclear license: they are never committed; they are converted on first use from
the raw dumps in ``../shared/traces-raw`` (or ``$EXPERTD_SHARED/traces-raw``) into a
git-ignored cache (``$EXPERTD_TRACE_CACHE``, default ``out/traces`` in the repository).
"""

from __future__ import annotations

import os
from pathlib import Path

from expertd import traces
from expertd.traces.convert import SHARED_RAW, ConvertOptions, convert
from expertd.traces.format import read_trace
from expertd.traces.trace import Trace

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EXPERTD_TRACE_CACHE") or REPO / "out" / "traces")

# name -> (converter format, raw dump under SHARED_RAW, cached file name)
SOURCES = {
    "granite": ("granite-json", "justinchuby__onnx-genai/scripts/moe_expert_trace.json", "granite.etrace"),
    "llama4": ("sglang-json", "andronius-yang__cse223b-proj", "llama4-maverick.etrace"),
    "mixtral": ("mixtral-jsonl", "Mario928__speculative-moe", "mixtral-8x7b.etrace"),
}
NAMES = tuple(SOURCES)


class TraceUnavailable(LookupError):
    """A known trace is neither shipped, cached, nor convertible here (the message says why)."""


def path_of(name: str) -> Path:
    """The .etrace file of trace ``name``, converting the raw dump once if needed."""
    if name not in SOURCES:
        raise KeyError(f"unknown trace {name!r} (known: {', '.join(SOURCES)})")
    if name == "granite":
        return traces.shipped()
    fmt, raw_path, file_name = SOURCES[name]
    path = CACHE / file_name
    if path.exists():
        return path
    raw = SHARED_RAW / raw_path
    if not raw.exists():
        raise TraceUnavailable(f"{name}: neither {path} nor the raw dump {raw} exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    convert(fmt, raw, path, ConvertOptions())
    return path


def load(name: str) -> Trace:
    """Trace ``name`` (granite, llama4, mixtral), read and validated."""
    return read_trace(path_of(name))
