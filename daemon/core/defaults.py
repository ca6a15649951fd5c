"""expertd's default configuration, in one place: the device policy, the predictor, prefetching.

`expertd serve` without flags runs exactly this (daemon/service/config.py takes its defaults from
here) and `expertd replay --policy default` replays exactly this, so what the docs
measure is what the daemon does. How it was chosen, on which part of which traces, and
what it achieves on the rest: docs/prefetch.md. Plain values only: importing this module
costs nothing (the serve configuration reads it before anything heavy is loaded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from expertd.daemon.core.prefetch import PrefetchConfig

#: The name `expertd replay --policy` knows this configuration by.
DEFAULT_NAME = "default"

#: Evict by predicted next use, from the tenants' predictors (policies/predictive.py).
DEVICE_POLICY = "predictive"
#: The host tier (RAM) usually holds most experts; recency is enough there.
HOST_POLICY = "lru"
#: Prefetch only likely guesses (a wrong one costs a whole expert transfer, a right one
#: saves at most the compute it overlaps), at most two per layer for the next two layers,
#: and never more than a quarter of any 32 consecutive transfers on a link.
PREFETCH: dict[str, Any] = {
    "predictor": "combined",
    "depth": 2,
    "min_prob": 0.7,
    "budget": 4,
    "width": 2,
    "share": 0.25,
    "window": 32,
}


#: With host compute (auto acquires, placement on) a miss no longer waits for the link: the
#: host computes it while the link copies what is predicted, so prefetches may take the
#: whole link (issue 15, docs/benchmarks.md "Hybrid execution").
HYBRID_PREFETCH: dict[str, Any] = {**PREFETCH, "share": 1.0}


def prefetch_config(hybrid: bool = False) -> PrefetchConfig:
    """The default prefetch settings as the cache manager takes them (``hybrid``: placement on)."""
    from expertd.daemon.core.prefetch import PrefetchConfig

    return PrefetchConfig(**(HYBRID_PREFETCH if hybrid else PREFETCH))


def resolve(policy: str, hybrid: bool = False) -> tuple[str, PrefetchConfig | None]:
    """``policy`` as a (device policy, prefetch settings) pair: ``default`` expands, others stand."""
    if policy == DEFAULT_NAME:
        return DEVICE_POLICY, prefetch_config(hybrid)
    return policy, None
