"""Replay and a live daemon drive the same `CacheCore`: in every isolation mode they agree exactly.

A real daemon on a temporary ipc:// socket serves a trace's requests, dealt to tenants in turn,
one raw client per tenant; `replay_timed` replays the same trace with the same tenants. Each
acquire is answered before the next is sent, so both see the same events in the same order:
every reply (its tier, slots and hits, in order), every tenant's counters and, for a private
tenant, how many of its replies were timed from its shadow cache must be the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from daemon_util import DaemonProcess, RawClient

from expertd.daemon import protocol as proto
from expertd.daemon.core.cache_core import Isolation
from expertd.daemon.core.events import DEVICE
from expertd.daemon.store.pack import pack_synthetic
from expertd.traces.replay import replay_timed
from expertd.traces.timing import build_timing
from expertd.traces.trace import Trace, TraceMeta

LAYERS, EXPERTS, TOP_K = 2, 8, 2
HOST_SLOTS, DEVICE_SLOTS = 10, 6
REQUESTS, TOKENS = 6, 12

MODES = {
    "shared": {"a": Isolation(), "b": Isolation()},
    "partitioned": {"a": Isolation(), "b": Isolation("partitioned", 0.5)},
    "private": {"a": Isolation(), "b": Isolation("private", 0.5)},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("agreement-store") / "mixtral"
    pack_synthetic(path, "mixtral-8x7b", scale=64, layers=LAYERS)
    return path


def skewed_trace(seed: int = 3) -> Trace:
    """Requests of a few tokens over both layers; experts drawn with a skew, so some are reused."""
    rng = np.random.default_rng(seed)
    weights = np.array([8, 6, 4, 3, 2, 1, 1, 1], dtype=float)
    rows = []
    for request in range(REQUESTS):
        for token in range(TOKENS):
            for layer in range(LAYERS):
                rows.append(
                    (
                        request,
                        token,
                        layer,
                        rng.choice(EXPERTS, TOP_K, replace=False, p=weights / weights.sum()),
                    )
                )
    meta = TraceMeta("synthetic", LAYERS, EXPERTS, TOP_K, requests=[f"r{i}" for i in range(REQUESTS)])
    return Trace(
        meta,
        np.array([r[0] for r in rows]),
        np.array([r[1] for r in rows]),
        np.array([r[2] for r in rows]),
        np.array([r[3] for r in rows]),
    )


def tenants_config(tenants: dict[str, Isolation]) -> str:
    text = '[policy]\nhost = "lru"\ndevice = "lru"\n[prefetch]\npredictor = "none"\n'
    text += "[transfers]\nload_threads = 1\nh2d_depth = 1\n"
    for name, policy in tenants.items():
        if policy.isolation != "shared":
            text += f'[tenants.{name}]\nisolation = "{policy.isolation}"\nshare = {policy.share}\n'
    return text


def live(store: Path, workdir: Path, trace: Trace, tenants: dict[str, Isolation]):
    """The trace served by a real daemon: every reply in order, the admin's stats at the end."""
    (workdir / "expertd.toml").write_text(tenants_config(tenants))
    daemon = DaemonProcess(
        store, workdir, "--device", "cpu", "--device-size", f"{DEVICE_SLOTS} slots",
        "--host-size", f"{HOST_SLOTS} slots", "--config", str(workdir / "expertd.toml"),
    )  # fmt: skip
    clients = {name: RawClient(daemon.address) for name in tenants}
    try:
        for name, client in clients.items():
            client.hello(name, tenant=name)
        names = list(tenants)
        leases: dict[str, list[int]] = {name: [] for name in names}
        replies = []
        rows = zip(trace.request.tolist(), trace.layer.tolist(), trace.experts.tolist(), strict=True)
        for request_id, (request, layer, experts) in enumerate(rows, start=2):
            name = names[request % len(names)]
            acquire = proto.Acquire(layer, experts, DEVICE, leases[name], request)
            ok = clients[name].request(request_id, acquire)
            assert isinstance(ok, dict), ok
            leases[name] = [ok["lease"]]
            replies.append((name, ok["tier"], tuple(ok["slots"]), ok["hits"]))
        stats = clients[names[0]].request(10**6, proto.Stats())
        assert isinstance(stats, dict), stats
        return replies, stats.get("stats", stats)
    finally:
        for client in clients.values():
            client.close()
        daemon.kill()


def replayed(trace: Trace, tenants: dict[str, Isolation]):
    timing = build_timing(
        model="synthetic", num_layers=LAYERS, expert_mb=1.0, layer_ms=0.1, host_slots=HOST_SLOTS, top_k=TOP_K
    )
    replies = []
    row = replay_timed(
        trace, "lru", DEVICE_SLOTS, timing, tenants=tenants,
        observe=lambda client, r: replies.append((client, r.tier, r.slots, r.hits)),
    )  # fmt: skip
    return replies, row


@pytest.mark.parametrize("mode", sorted(MODES))
def test_replay_and_a_live_daemon_agree_exactly(mode, store, short_dir):
    tenants = MODES[mode]
    trace = skewed_trace()
    live_replies, stats = live(store, short_dir, trace, tenants)
    replay_replies, row = replayed(trace, tenants)
    assert live_replies == replay_replies  # every reply: whose, which slots, how many hits, in order
    for name in tenants:
        live_counts = {k: stats["tenants"][name][k] for k in ("acquires", "accesses", "hits")}
        replay_counts = {k: row.tenants[name][k] for k in ("acquires", "accesses", "hits")}
        assert live_counts == replay_counts, name
    assert stats["tiers"][DEVICE]["hits"] == row.hits
    assert 0 < row.hits < row.accesses  # the trace exercises hits and misses alike
    grid = {kind: v["replies"] for kind, v in stats["isolation"]["grid_points"].items()}
    assert grid == row.private_replies
    if mode == "private":
        assert grid["drawn"] > 0, "the private tenant never met a hit its own cache would have missed"
    if mode == "partitioned":
        assert set(stats["partitions"]) == {"b", "shared"}
