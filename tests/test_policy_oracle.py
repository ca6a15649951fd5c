"""Our policies count exactly the hits libCacheSim counts, where both define the policy alike.

libCacheSim (pip ``libcachesim``) is fed one unit-size request per access through
``Cache.get``; Belady's requests carry the next access time. Matched exactly: LRU,
FIFO, LFU, SIEVE, S3-FIFO (capacity >= 20, see policies/s3fifo.py), ARC, Belady,
and lru-per-layer against one libCacheSim LRU per layer. Not compared, because
libCacheSim has no such policy: least-stale and layer-distance (they follow the
layer order of forward passes, which a plain object cache does not know).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lcs_oracle import ORACLE_NAMES, S3FIFO_MIN_CAPACITY, lcs_hits, lcs_lru_per_layer_hits
from policy_traces import load_trace

from expertd.policies.base import Geometry
from expertd.policies.registry import make_policy

pytest.importorskip("libcachesim")

GEOMETRY = Geometry(num_layers=4, num_experts=16)
#: Real traces are cut to their first accesses to keep this file fast.
MAX_TRACE_ACCESSES = 200_000
CAPACITIES = (0.05, 0.10, 0.25)


def our_hits(policy: str, keys: np.ndarray, capacity: int, geometry: Geometry) -> int:
    cache = make_policy(policy, capacity, geometry)
    if cache.offline:
        cache.prepare(keys)
    return cache.replay(keys)


def sequences(max_key: int = GEOMETRY.num_keys - 1):
    # Small key ranges give many hits, larger ones many evictions; both matter.
    return st.integers(2, max_key).flatmap(
        lambda top: st.lists(st.integers(0, top), min_size=1, max_size=300)
    )


@pytest.mark.parametrize("policy", sorted(ORACLE_NAMES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=sequences(), capacity=st.integers(1, 40))
def test_hits_equal_libcachesim_on_generated_sequences(policy, keys, capacity):
    if policy == "s3fifo":
        capacity += S3FIFO_MIN_CAPACITY  # below this libCacheSim's S3FIFO admits nothing
    keys = np.asarray(keys, dtype=np.int64)
    assert our_hits(policy, keys, capacity, GEOMETRY) == lcs_hits(policy, keys, capacity)


@settings(max_examples=60, deadline=None)
@given(keys=sequences(), capacity=st.integers(GEOMETRY.num_layers, 40))
def test_lru_per_layer_equals_one_libcachesim_lru_per_layer(keys, capacity):
    keys = np.asarray(keys, dtype=np.int64)
    policy = make_policy("lru-per-layer", capacity, GEOMETRY)
    expected = lcs_lru_per_layer_hits(keys, policy.quota, GEOMETRY.num_experts)
    assert policy.replay(keys) == expected


def trace_keys(name: str) -> tuple[np.ndarray, Geometry]:
    trace = load_trace(name)
    geometry = Geometry(trace.meta.num_layers, trace.meta.num_experts)
    return trace.keys()[:MAX_TRACE_ACCESSES], geometry


@pytest.mark.parametrize("trace_name", ["granite", "llama4", "mixtral"])
@pytest.mark.parametrize("policy", sorted(ORACLE_NAMES))
def test_hits_equal_libcachesim_on_real_traces(trace_name, policy):
    keys, geometry = trace_keys(trace_name)
    for fraction in CAPACITIES:
        capacity = max(1, round(fraction * geometry.num_keys))
        if policy == "s3fifo" and capacity < S3FIFO_MIN_CAPACITY:
            continue
        ours = our_hits(policy, keys, capacity, geometry)
        assert ours == lcs_hits(policy, keys, capacity), (trace_name, policy, capacity)


@pytest.mark.parametrize("trace_name", ["granite", "llama4", "mixtral"])
def test_lru_per_layer_equals_libcachesim_per_layer_on_real_traces(trace_name):
    keys, geometry = trace_keys(trace_name)
    for fraction in CAPACITIES:
        capacity = max(1, round(fraction * geometry.num_keys))
        if capacity < geometry.num_layers:
            continue
        policy = make_policy("lru-per-layer", capacity, geometry)
        expected = lcs_lru_per_layer_hits(keys, policy.quota, geometry.num_experts)
        assert policy.replay(keys) == expected, (trace_name, capacity)
