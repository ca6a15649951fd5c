"""Real routing traces for the policy tests, loaded once per session.

Granite is shipped in traces/data/. The held-out Llama-4 and Mixtral traces are
research data that stay outside the repository: they are read from out/traces/
(git-ignored), converted there from ../shared/traces-raw/ on first use, and the
test is skipped, with the reason, when neither exists.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from expertd.traces.format import Trace, read_trace

REPO = Path(__file__).resolve().parents[1]
SHIPPED_GRANITE = REPO / "traces" / "data" / "granite-3.0-1b-a400m.etrace"
CONVERTED = REPO / "out" / "traces"
SHARED_RAW = Path(os.environ.get("EXPERTD_SHARED") or REPO.parent / "shared") / "traces-raw"

# name -> (converter format, raw dump under SHARED_RAW, converted file name under CONVERTED)
SOURCES = {
    "granite": ("granite-json", "justinchuby__onnx-genai/scripts/moe_expert_trace.json", "granite.etrace"),
    "llama4": ("sglang-json", "andronius-yang__cse223b-proj", "llama4-maverick.etrace"),
    "mixtral": ("mixtral-jsonl", "Mario928__speculative-moe", "mixtral-8x7b.etrace"),
}


@functools.cache
def _load(name: str) -> Trace | str:
    """The trace, or why it is not available."""
    if name == "granite" and SHIPPED_GRANITE.exists():
        return read_trace(SHIPPED_GRANITE)
    fmt, raw_path, file_name = SOURCES[name]
    path = CONVERTED / file_name
    if not path.exists():
        raw = SHARED_RAW / raw_path
        if not raw.exists():
            return f"{name}: neither {path} nor the raw dump {raw} exists"
        try:
            from expertd.traces.convert import ConvertOptions, convert
        except ImportError as exc:
            return f"{name}: cannot convert {raw} ({exc})"
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        convert(fmt, raw, partial, ConvertOptions())
        partial.replace(path)
    return read_trace(path)


def load_trace(name: str) -> Trace:
    """The trace called ``name`` (granite, llama4, mixtral); skips the test if unavailable."""
    trace = _load(name)
    if isinstance(trace, str):
        pytest.skip(trace)
    return trace
