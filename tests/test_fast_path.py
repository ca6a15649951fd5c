"""Shared-memory hits through a real `expertd serve`: served without a round trip, the right
bytes, every access accounted, pins that hold writes back, and the faults around them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from daemon_util import DaemonProcess

from expertd.client import ExpertClient
from expertd.client.lease import FastLease
from expertd.daemon.store.pack import pack_synthetic
from expertd.daemon.store.reader import StoreReader

pytestmark = pytest.mark.skipif(
    not __import__("expertd.client.fastpath", fromlist=["SUPPORTED"]).SUPPORTED,
    reason="the shared-memory hit path is on for x86-64 only",
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "mixtral"
    pack_synthetic(path, "mixtral-8x7b", scale=64, layers=4)  # 4 layers x 8 experts
    return path


@pytest.fixture
def daemon(store, short_dir):
    proc = DaemonProcess(
        store, short_dir, "--host-size", "32 slots", "--device", "cpu", "--device-size", "6 slots",
        "--lease-timeout-s", "2.0", "--max-pinned-share", "1", "--predictor", "none",
    )  # fmt: skip
    yield proc
    proc.kill()


def assert_bytes(lease, store: Path) -> None:
    reader = StoreReader(store)
    for expert, tensors in lease.items():
        want = reader.read_expert_tensors(lease.layer, expert)
        for name, tensor in tensors.items():
            assert torch.equal(tensor, want[name]), (lease.layer, expert, name)


def test_a_resident_acquire_is_served_from_shared_memory_with_the_stores_bytes(daemon, store):
    with ExpertClient(daemon.address) as client:
        first = client.acquire(1, [2, 5], "device")  # a miss: through the socket
        assert not isinstance(first, FastLease)
        first.release()
        second = client.acquire(1, [5, 2], "device")
        assert isinstance(second, FastLease) and second.hits == 2
        assert_bytes(second, store)
        second.release()
        stats = client.stats()
    assert stats["tiers"]["device"]["accesses"] == 4 and stats["tiers"]["device"]["hits"] == 2
    assert stats["fast_path"]["reports"] >= 1 and stats["fast_path"]["report_gaps"] == 0


def test_a_client_without_the_fast_path_takes_the_socket(daemon):
    with ExpertClient(daemon.address, fast_path=False) as client:
        client.acquire(0, [1], "device").release()
        lease = client.acquire(0, [1], "device")
        assert not isinstance(lease, FastLease) and lease.hits == 1
