"""Real routing traces for the tests, loaded once per session; skipped with the reason when absent."""

from __future__ import annotations

import functools

import pytest

from expertd.traces import corpus
from expertd.traces.format import Trace


@functools.cache
def _load(name: str) -> Trace | str:
    try:
        return corpus.load(name)
    except corpus.TraceUnavailable as exc:
        return str(exc)


def load_trace(name: str) -> Trace:
    """The trace called ``name`` (granite, llama4, mixtral); skips the test if unavailable."""
    trace = _load(name)
    if isinstance(trace, str):
        pytest.skip(trace)
    return trace
