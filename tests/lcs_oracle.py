"""libCacheSim as a test oracle: hit counts of its policies on a plain key sequence."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Our policy name -> libCacheSim class name, for the policies both define the same way.
ORACLE_NAMES = {
    "lru": "LRU",
    "fifo": "FIFO",
    "lfu": "LFU",
    "sieve": "Sieve",
    "s3fifo": "S3FIFO",
    "arc": "ARC",
    "belady": "Belady",
}

#: libCacheSim's S3FIFO admits nothing below this many slots (see policies/s3fifo.py).
S3FIFO_MIN_CAPACITY = 20


def next_access(keys: np.ndarray) -> np.ndarray:
    """For each position, the position of the same key's next access (INT64_MAX if none)."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    grouped = keys[order]
    same = grouped[1:] == grouped[:-1]
    nxt = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def lcs_hits(policy: str, keys: Sequence[int] | np.ndarray, capacity: int) -> int:
    """Hits of libCacheSim's version of ``policy`` (unit-size objects, ``capacity`` of them)."""
    import libcachesim

    keys = np.asarray(keys, dtype=np.int64)
    # The default hash table has 2**24 buckets (128 MiB each time); size it to the keys.
    hashpower = max(8, int(len(np.unique(keys))).bit_length() + 1)
    cache = getattr(libcachesim, ORACLE_NAMES[policy])(cache_size=capacity, hashpower=hashpower)
    req = libcachesim.Request()
    req.obj_size = 1
    get = cache.get
    hits = 0
    if policy == "belady":
        for t, (key, nxt) in enumerate(zip(keys.tolist(), next_access(keys).tolist(), strict=True)):
            req.obj_id = key
            req.clock_time = t
            req.next_access_vtime = nxt
            hits += get(req)
        return hits
    for t, key in enumerate(keys.tolist()):
        req.obj_id = key
        req.clock_time = t
        hits += get(req)
    return hits


def lcs_lru_per_layer_hits(keys: Sequence[int] | np.ndarray, quotas: Sequence[int], num_experts: int) -> int:
    """Hits of one libCacheSim LRU per layer, ``quotas[layer]`` slots each."""
    keys = np.asarray(keys, dtype=np.int64)
    layers = keys // num_experts
    return sum(lcs_hits("lru", keys[layers == layer], quota) for layer, quota in enumerate(quotas))
