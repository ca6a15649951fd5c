"""A real daemon places tier="auto" experts; the client computes host-placed ones on CPU threads.

The block's output equals the in-memory block's bit for bit on the CPU stand-in (a `cpu`
device tier); on CUDA, tests/test_gpu.py checks it within a bf16 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from daemon_util import DaemonProcess

from expertd.client import ClientExperts, ExpertClient, MemoryExperts, MoEBlock, MoEConfig
from expertd.client.host_compute import HostCompute
from expertd.daemon.store.pack import pack_synthetic
from expertd.daemon.store.reader import StoreReader

OLMOE = MoEConfig(hidden_size=32, num_experts=64, top_k=8, norm_topk_prob=False)  # olmoe-1b-7b / 64


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hybrid") / "olmoe"
    pack_synthetic(path, "olmoe-1b-7b", scale=64, layers=2)  # 2 layers x 64 experts
    return path


def hybrid_daemon(store: Path, workdir: Path, host_gbps: str = "100") -> DaemonProcess:
    """A cpu device tier of 16 slots, a host tier holding every expert; the host computes
    faster than the link copies (--host-gbps 100 against 25), so host-resident misses go there."""
    return DaemonProcess(
        store, workdir, "--device", "cpu", "--device-size", "16 slots", "--host-size", "128 slots",
        "--host-gbps", host_gbps, "--max-pinned-share", "1", "--predictor", "none", "--device-policy", "lru",
    )  # fmt: skip


def blocks(source, host: HostCompute | None = None) -> list[MoEBlock]:
    torch.manual_seed(0)  # the same routers whatever the source
    return [MoEBlock(OLMOE, layer, source, host=host) for layer in range(2)]


@torch.inference_mode()
def decode(model: list[MoEBlock], x: torch.Tensor) -> torch.Tensor:
    """One token at a time through both blocks (residual), then the whole batch at once (a prefill)."""
    outputs = []
    for token in x:
        h = token[None]
        for block in model:
            h = h + block(h)
        outputs.append(h)
    h = x
    for block in model:
        h = h + block(h)
    return torch.cat([*outputs, h])


def test_auto_leases_computed_on_host_threads_equal_the_in_memory_model(store: Path, short_dir: Path) -> None:
    with StoreReader(store) as reader:
        reference = MemoryExperts.from_store(reader, range(2))
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    want = decode(blocks(reference), x)
    daemon = hybrid_daemon(store, short_dir)
    try:
        with ExpertClient(daemon.address) as client, HostCompute(2) as host:
            assert client.auto and client.hello.host_compute["gbps"] == 100.0
            got = decode(blocks(ClientExperts(client, "auto"), host), x)
            placed = client.stats()["placed"]
            assert host.computed > 0 and placed["host"] > 0 and placed["device"] > 0, placed
    finally:
        daemon.kill()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_an_auto_lease_names_host_slots_that_hold_the_stores_bytes(store: Path, short_dir: Path) -> None:
    daemon = hybrid_daemon(store, short_dir)
    try:
        with ExpertClient(daemon.address) as client, StoreReader(store) as reader:
            client.acquire(0, [3, 4]).release()  # loaded into host, copied to the device
            for expert in range(10, 10 + 16):  # evict them from the 16-slot (LRU) device tier
                client.acquire(0, [expert]).release()
            with client.acquire(0, [3, 4, 9], "auto", [1, 1, 1]) as lease:
                assert lease.tier == "auto" and lease.places is not None
                assert lease.place_of(3) == lease.place_of(4) == "host"  # in RAM, not on the device
                assert lease.place_of(9) == "device"  # nowhere yet: loaded and copied
                for expert in (3, 4, 9):
                    stored = reader.read_expert_tensors(0, expert)
                    assert all(torch.equal(lease[expert][n], t) for n, t in stored.items())
                    assert _slab_of(client, next(iter(lease[expert].values()))) == lease.place_of(expert)
    finally:
        daemon.kill()


def test_without_a_host_figure_auto_places_everything_on_the_device(store: Path, short_dir: Path) -> None:
    daemon = DaemonProcess(store, short_dir, "--device", "cpu", "--device-size", "16 slots",
                           "--host-size", "128 slots", "--max-pinned-share", "1")  # fmt: skip
    try:
        with ExpertClient(daemon.address) as client:
            assert client.hello.host_compute["source"] == "off"
            lease = client.acquire(0, [1, 2], "auto", [1, 1])
            assert lease.tier == "device" and lease.places is None  # the core answers as a device acquire
            lease.release()
            assert "host compute off (off" in _status(daemon.address)
    finally:
        daemon.kill()


def _slab_of(client: ExpertClient, view: torch.Tensor) -> str:
    """The tier whose mapped slab ``view`` lies in."""
    for tier, slab in client._slabs.items():
        start = slab.flat.data_ptr()
        if start <= view.data_ptr() < start + slab.flat.numel():
            return tier
    raise AssertionError("the view lies in no slab")


def _status(address: str) -> str:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "expertd.daemon", "status", "--address", address],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout
