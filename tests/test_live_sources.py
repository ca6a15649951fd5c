"""The live bench's baselines: advised mmap and a client-side pread LRU over a real store file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertd.daemon.store.pack import pack_synthetic
from expertd.daemon.store.reader import StoreReader
from expertd.traces.live import MmapSource, drive
from expertd.traces.live_sources import AdvisedMmapSource, PreadLruSource
from expertd.traces.trace import Trace, TraceMeta

LAYERS, EXPERTS, TOP_K = 2, 8, 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("live-sources") / "store"
    pack_synthetic(path, "mixtral-8x7b", scale=64, layers=LAYERS)
    return path


def routing(tokens: int, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    rows = tokens * LAYERS
    meta = TraceMeta("test-model", LAYERS, EXPERTS, TOP_K, source="generated", license="MIT", requests=["r0"])
    return Trace(
        meta,
        np.zeros(rows, dtype=np.int32),
        np.repeat(np.arange(tokens), LAYERS),
        np.tile(np.arange(LAYERS), tokens),
        np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(rows)]),
    )


@pytest.mark.parametrize("kind", ["mmap", "advised", "pread"])
def test_every_baseline_serves_the_stores_exact_bytes(store, kind):
    source = {
        "mmap": lambda: MmapSource(store),
        "advised": lambda: AdvisedMmapSource(store),
        "pread": lambda: PreadLruSource(store, slots=3),
    }[kind]()
    with StoreReader(store) as reader:
        for layer, experts in [(0, [3, 5]), (1, [0, 7]), (0, [5, 1]), (1, [7, 0])]:
            with source.experts(layer, experts) as held:
                assert [e for e, _ in held] == experts
                for expert, weights in held:
                    want = reader.read_expert_tensors(layer, expert)
                    for name, tensor in want.items():
                        assert torch.equal(weights[name], tensor), (kind, layer, expert, name)


def test_pread_lru_evicts_the_least_recent_and_never_the_current_layer(store):
    source = PreadLruSource(store, slots=3)
    for layer, experts in [(0, [1, 2]), (0, [3]), (0, [1, 4]), (0, [2])]:
        with source.experts(layer, experts):
            pass
    # 1, 2 miss; 3 misses (cache full); 1 hits; 4 evicts 2 (least recent, not in use); 2 misses
    assert (source.hits, source.misses) == (1, 5)
    assert source._allocated == 3
    with (
        pytest.raises(ValueError, match="cannot hold one layer's 4 experts"),
        source.experts(1, [0, 1, 2, 3]),
    ):
        pass


def test_drive_times_the_cold_tokens_apart(store):
    trace = routing(tokens=6)
    result = drive(trace, PreadLruSource(store, slots=4), steady_from=2)
    assert (result.tokens, result.rows, result.cold_tokens) == (6, 12, 2)
    assert 0 < result.cold_seconds < result.seconds
    steady = (result.tokens - 2) / (result.seconds - result.cold_seconds)
    assert result.as_dict()["steady_tokens_per_s"] == pytest.approx(steady)
    whole = drive(trace, AdvisedMmapSource(store))
    assert whole.cold_tokens == 0 and whole.steady_tokens_per_s == pytest.approx(whole.tokens_per_s)
