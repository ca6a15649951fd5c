"""A live daemon places tier="auto" experts where timed replay of the same routing places them.

The same cost model (host 100 GB/s against a 25 GB/s link), tiers, policies and routing: a
client acquiring one layer at a time and waiting for each lease leaves no transfer in flight
at the next acquire, as replay's virtual clock does, so every decision must be the same,
expert by expert. One reader thread, as replay models the load link (``load_depth=1``): with
four, the loads of one acquire finish in any order, its copies follow in that order, and the
device's recency among those experts (so a later eviction, so a later placement) can differ
from replay.s; 3 of 5 runs did before the daemon was given ``--load-threads 1``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from daemon_util import DaemonProcess

from expertd.client import ExpertClient
from expertd.daemon.core.events import Reply
from expertd.daemon.store.pack import pack_synthetic
from expertd.traces import replay as replay_module
from expertd.traces.timing import TimingModel
from expertd.traces.trace import Trace, TraceMeta

LAYERS, EXPERTS, TOP_K, DEVICE_SLOTS, TOKENS = 2, 64, 8, 16, 30


def routing(seed: int = 5) -> Trace:
    """Skewed routing (some experts come back often, most rarely), one token at a time."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, EXPERTS + 1) ** 1.1
    rows = []
    for _ in range(TOKENS):
        for _layer in range(LAYERS):
            order = rng.permutation(EXPERTS)
            rows.append(rng.choice(order, TOP_K, replace=False, p=popularity[order] / popularity.sum()))
    meta = TraceMeta(
        model="olmoe-shaped", num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K, requests=["r"]
    )
    return Trace(
        meta=meta,
        request=np.zeros(len(rows), dtype=np.int32),
        token=np.repeat(np.arange(TOKENS, dtype=np.int32), LAYERS),
        layer=np.tile(np.arange(LAYERS, dtype=np.int16), TOKENS),
        experts=np.array(rows, dtype=np.int16),
    )


def test_a_live_daemon_places_every_expert_where_replay_does(tmp_path: Path, short_dir: Path) -> None:
    store = tmp_path / "store"
    manifest = pack_synthetic(store, "olmoe-1b-7b", scale=64, layers=LAYERS)
    trace = routing()
    host_slots = LAYERS * EXPERTS  # every expert fits; both start cold

    replies: list[Reply] = []
    timing = TimingModel(
        expert_bytes=manifest.raw_bytes, h2d_gbps=25.0, nvme_gbps=2.0, layer_s=1e-3, host_slots=host_slots,
        host_gbps=100.0, device_gbps=1000.0,
    )  # fmt: skip
    row = replay_module.replay_timed(
        trace, "lru", DEVICE_SLOTS, timing, host_policy="lru", placement=True,
        observe=lambda client, reply: replies.append(reply),
    )  # fmt: skip
    replayed = [reply.placements for reply in sorted(replies, key=lambda r: r.request_id)]
    assert len(replayed) == len(trace)

    daemon = DaemonProcess(
        store, short_dir, "--device", "cpu", "--device-size", f"{DEVICE_SLOTS} slots",
        "--host-size", f"{host_slots} slots", "--host-gbps", "100", "--predictor", "none",
        "--device-policy", "lru", "--host-policy", "lru", "--max-pinned-share", "1", "--load-threads", "1",
    )  # fmt: skip
    live = []
    try:
        with ExpertClient(daemon.address) as client:
            for layer, experts in zip(trace.layer.tolist(), trace.experts.tolist(), strict=True):
                with client.acquire(layer, experts, "auto", [1] * TOP_K) as lease:
                    live.append(lease.places or (lease.tier,) * len(experts))
            stats = client.stats()
    finally:
        daemon.kill()
    mismatched = [i for i, (a, b) in enumerate(zip(live, replayed, strict=True)) if a != b]
    assert not mismatched, (
        f"rows {mismatched[:5]} differ: live {live[mismatched[0]]}, replay {replayed[mismatched[0]]}"
    )
    on_host = sum(p.count("host") for p in live)
    assert on_host == row.host_computed == stats["placed"]["host"]
    assert 0 < on_host < len(trace) * TOP_K  # both kinds of decision were made
