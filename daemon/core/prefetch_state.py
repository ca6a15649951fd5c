"""Predictor statistics on disk, for a warm start: one msgpack file per model, never pickle.

The file is a msgpack map: ``format`` (`STATE_FORMAT`), ``version``, ``model`` (the
model the statistics were learned on) and ``state`` (what `Predictor.state` returned:
maps, numbers, and numpy arrays as raw bytes with shape and dtype). `expertd replay
--save-state` writes one; `--load-state` and the serve key ``[prefetch] state`` read it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack

from expertd.policies.base import Geometry
from expertd.policies.predict.predictor import make_predictor

STATE_FORMAT = "expertd-predictor-state"
STATE_VERSION = 1
MAX_STATE_BYTES = 256 << 20  # a state is MBs (tens for DeepSeek-V3's 58 x 256); refuse absurd ones


class StateError(ValueError):
    """A predictor state file is missing, malformed, or for another model or predictor."""


def write_state(path: str | os.PathLike, state: Mapping[str, Any], model: str) -> None:
    """Write ``state`` (learned on ``model``) to ``path`` atomically."""
    path = Path(path)
    data = msgpack.packb(
        {"format": STATE_FORMAT, "version": STATE_VERSION, "model": model, "state": dict(state)},
        use_bin_type=True,
    )
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer


def read_state(path: str | os.PathLike, model: str | None = None) -> dict[str, Any]:
    """The predictor state in ``path``; with ``model``, it must have been learned on that model."""
    path = Path(path)
    try:
        # A regular file only, read with a bound: a device or a FIFO would block the daemon's loop.
        with open(path, "rb", opener=_open_nonblocking) as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise StateError(f"{path}: not a regular file")
            data = file.read(MAX_STATE_BYTES + 1)
        if len(data) > MAX_STATE_BYTES:
            raise StateError(f"{path}: too large for a predictor state (at most {MAX_STATE_BYTES} bytes)")
        payload = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except OSError as exc:
        raise StateError(f"{path}: cannot read predictor state: {exc.strerror or exc}") from None
    except (ValueError, msgpack.UnpackException) as exc:
        raise StateError(f"{path}: not a predictor state file ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise StateError(f"{path}: not a predictor state file (no format {STATE_FORMAT!r})")
    if payload.get("version") != STATE_VERSION:
        raise StateError(
            f"{path}: predictor state version {payload.get('version')!r}, expected {STATE_VERSION}"
        )
    if model is not None and payload.get("model") != model:
        raise StateError(f"{path}: the statistics are for model {payload.get('model')!r}, not {model!r}")
    state = payload.get("state")
    if not isinstance(state, dict):
        raise StateError(f"{path}: predictor state has no state map")
    return state


def learn_state(
    predictor: str,
    geometry: Geometry,
    rows: Sequence[tuple[Hashable, int, Sequence[int]]],
) -> dict[str, Any]:
    """The statistics ``predictor`` learns from routing ``rows`` of (generation, layer, experts), in order."""
    learner = make_predictor(predictor, geometry)
    previous: Hashable = None
    for generation, layer, experts in rows:
        if previous is not None and generation != previous:
            learner.forget(previous)  # as the daemon does when a generation ends
        learner.observe(generation, layer, experts)
        previous = generation
    if previous is not None:
        learner.forget(previous)
    return learner.state()
