"""Golden hit counts of every policy on the shipped Granite trace: regression anchors.

Produced once from this implementation (replay of the whole trace, 58,368 accesses,
with its forward steps) at 10% and 25% of the 768 (layer, expert) objects, i.e. 77
and 192 slots. Where libCacheSim has the policy (all but least-stale, layer-distance
and predictive; lru-per-layer as one LRU per layer) it gives the same counts, which
test_policy_oracle.py checks. At 10% a token's 192 accesses overflow the cache, so
the recency policies hit nothing: the cyclic pattern that motivates least-stale and
layer-distance. A change here is a change of behaviour: explain it in the commit.
"""

from __future__ import annotations

import numpy as np
import pytest
from policy_traces import load_trace

from expertd.policies.base import Geometry
from expertd.policies.registry import available, make_policy
from expertd.policies.steps import steps_from_rows

# policy -> (hits at 77 slots, hits at 192 slots)
GOLDEN_HITS = {
    "arc": (0, 17415),
    "belady": (19366, 36526),
    "fifo": (0, 16256),
    "layer-distance": (13124, 26455),
    "least-stale": (8553, 23591),
    "lfu": (0, 5005),
    "lru": (0, 18314),
    "lru-per-layer": (1606, 18314),
    "predictive": (12422, 26523),
    "s3fifo": (7037, 20436),
    "sieve": (0, 5005),
}
SLOTS = (77, 192)


def test_every_registered_policy_has_golden_counts():
    assert sorted(GOLDEN_HITS) == available()


@pytest.mark.parametrize("name", sorted(GOLDEN_HITS))
def test_golden_hits_on_granite(name):
    trace = load_trace("granite")
    assert len(trace) * trace.meta.top_k == 58_368
    keys = trace.keys()
    geometry = Geometry(trace.meta.num_layers, trace.meta.num_experts)
    forward_ids = (trace.request.astype(np.int64) << 32) | trace.token
    hits = []
    for slots in SLOTS:
        policy = make_policy(name, slots, geometry)
        if policy.offline:
            policy.prepare(keys)
        hits.append(policy.replay(keys, steps_from_rows(forward_ids, trace.layer, trace.meta.top_k)))
    assert tuple(hits) == GOLDEN_HITS[name]
