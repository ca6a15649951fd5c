"""Fault injection for the reliability campaign: make store reads fail on purpose.

Off unless ``EXPERTD_INJECT_READ_ERRORS=RATE[:SEED]`` is set in the daemon's
environment (tests and `bench/faults.py` set it; a service never should): each read
then fails with probability RATE, as a real I/O error would, through the same path
(`StoreError` -> the transfer fails -> the waiting acquires get `load_failed`).
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable

import numpy as np

from expertd.daemon.store.manifest import StoreError

ENV = "EXPERTD_INJECT_READ_ERRORS"

ReadExpert = Callable[[int, int, np.ndarray], int]


def read_errors_from_env(read: ReadExpert, environ: dict[str, str] | None = None) -> ReadExpert:
    """``read`` as is, or wrapped to fail at the rate ``$EXPERTD_INJECT_READ_ERRORS`` asks."""
    spec = (os.environ if environ is None else environ).get(ENV, "")
    if not spec:
        return read
    rate_text, _, seed_text = spec.partition(":")
    try:
        rate, seed = float(rate_text), int(seed_text or 0)
    except ValueError:
        raise ValueError(f"${ENV}={spec!r}: expected RATE[:SEED], e.g. 0.01:7") from None
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"${ENV}={spec!r}: the rate must be in [0, 1]")
    rng = random.Random(seed)
    lock = threading.Lock()  # reader threads share the generator

    def faulty(layer: int, expert: int, into: np.ndarray) -> int:
        with lock:
            fail = rng.random() < rate
        if fail:
            raise StoreError(f"injected I/O error reading layer {layer} expert {expert} (${ENV})")
        return read(layer, expert, into)

    return faulty
