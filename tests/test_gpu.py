"""The CUDA path: device slab, CUDA IPC to clients, pinned host slab, stream copies, end to end.

Marked ``gpu``: skipped without CUDA (tests/conftest.py); `make gpu-check` runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from daemon_util import DaemonProcess

from expertd.client import ExpertClient
from expertd.client.moe import ClientExperts, MemoryExperts, MoEBlock, MoEConfig
from expertd.daemon.service.engine import cuda_copier
from expertd.daemon.service.slabs import CudaDeviceSlab, HostSlab
from expertd.daemon.store.pack import pack_synthetic
from expertd.daemon.store.reader import StoreReader

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpu-store") / "olmoe"
    pack_synthetic(path, "olmoe-1b-7b", scale=16, layers=3)  # 3 layers x 64 experts
    return path


def cuda_experts(reader: StoreReader, layers: range) -> MemoryExperts:
    """The store's experts of ``layers``, moved to the GPU (the reference)."""
    weights = MemoryExperts.from_store(reader, layers).weights
    return MemoryExperts(
        {
            layer: {e: {n: t.cuda() for n, t in w.items()} for e, w in by_expert.items()}
            for layer, by_expert in weights.items()
        }
    )


def test_pinned_host_slab_copies_to_device_slots_exactly():
    host = HostSlab("gpu-test-host", 4, 1 << 20)
    device = CudaDeviceSlab(3, 1 << 20)
    try:
        assert host.pin_for_cuda()
        assert torch.from_numpy(host.array).is_pinned()  # registered: copies are real DMA
        rng = np.random.default_rng(0)
        for slot in range(4):
            host.slot(slot)[:] = rng.integers(0, 256, host.slot_bytes, dtype=np.uint8)
        copy = cuda_copier(host, device)
        for src, dst in ((0, 2), (3, 0), (1, 1)):
            copy(src, dst, host.slot_bytes)
            assert torch.equal(device.slot(dst).cpu(), torch.from_numpy(host.slot(src).copy()))
    finally:
        device.close()
        host.close()


def test_moe_block_through_a_cuda_device_tier_equals_the_stores_weights(store, short_dir):
    """Zero-copy views of the daemon's GPU memory (CUDA IPC) compute what the store's weights do."""
    daemon = DaemonProcess(
        store, short_dir, "--host-size", "96 slots", "--device", "cuda", "--device-size", "12 slots"
    )  # fmt: skip
    try:
        reader = StoreReader(store)
        config = MoEConfig(hidden_size=reader.manifest.tensors[0].shape[1], num_experts=64, top_k=8)
        memory = cuda_experts(reader, range(3))
        with ExpertClient(daemon.address) as client:
            assert client.default_tier == "device"
            torch.manual_seed(0)
            for layer in range(3):
                live = MoEBlock(config, layer, ClientExperts(client)).cuda()
                ref = MoEBlock(config, layer, memory).cuda()
                ref.gate.load_state_dict(live.gate.state_dict())
                for step in range(4):  # one token a step (decode): its top-8 fit the 12 slots
                    x = torch.randn(1, config.hidden_size, dtype=torch.bfloat16, device="cuda")  # [T, D]
                    assert torch.equal(live(x), ref(x)), f"layer {layer}, step {step} differs"
            stats = client.stats()
        assert stats["tiers"]["device"]["evictions"] > 0  # 12 slots for 96 expert uses: evictions
        assert stats["links"]["h2d"]["started"] > 0 and stats["links"]["h2d"]["failed"] == 0
    finally:
        daemon.terminate()


#: Hybrid on CUDA: host-placed experts run on the CPU (bf16 matmuls, CPU accumulation order),
#: the rest on the GPU; the sums may differ from the all-GPU block by a few bf16 roundings.
#: Stated tolerance: every element within 4 bf16 ulps (2**-6) of the output's largest magnitude.
HYBRID_BF16_TOLERANCE = 2**-6


def test_hybrid_block_on_cuda_matches_the_stores_weights_within_bf16(store, short_dir):
    """tier="auto": device-placed experts on the GPU, host-placed ones on CPU threads, summed on the GPU."""
    from expertd.client.host_compute import HostCompute

    daemon = DaemonProcess(
        store, short_dir, "--host-size", "192 slots", "--device", "cuda", "--device-size", "12 slots",
        "--host-gbps", "1000", "--max-pinned-share", "1", "--predictor", "none", "--device-policy", "lru",
    )  # fmt: skip
    try:
        reader = StoreReader(store)
        config = MoEConfig(hidden_size=reader.manifest.tensors[0].shape[1], num_experts=64, top_k=8)
        memory = cuda_experts(reader, range(3))
        with ExpertClient(daemon.address) as client, HostCompute(2) as host:
            for layer in range(3):  # the host tier holds every expert: misses can be computed there
                for expert in range(64):
                    client.acquire(layer, [expert], "host").release()
            torch.manual_seed(0)
            for layer in range(3):
                live = MoEBlock(config, layer, ClientExperts(client, "auto"), host=host).cuda()
                ref = MoEBlock(config, layer, memory).cuda()
                ref.gate.load_state_dict(live.gate.state_dict())
                for step in range(4):
                    x = torch.randn(1, config.hidden_size, dtype=torch.bfloat16, device="cuda")  # [T, D]
                    got, want = live(x).float(), ref(x).float()
                    bound = HYBRID_BF16_TOLERANCE * want.abs().max().item()
                    assert (got - want).abs().max().item() <= bound, f"layer {layer}, step {step}"
            placed = client.stats()["placed"]
        assert host.computed > 0 and placed["host"] > 0, placed
    finally:
        daemon.terminate()


@pytest.fixture(scope="module")
def top1_store(tmp_path_factory) -> Path:
    """A top-1 store, so a one-slot device tier is one serve accepts (it refuses a tier below top-k)."""
    path = tmp_path_factory.mktemp("gpu-top1") / "llama4"
    pack_synthetic(path, "llama-4-maverick", scale=64, layers=1)  # 1 layer x 128 experts, top-1
    return path


def test_a_released_cuda_lease_waits_for_the_gpu_work_still_reading_it(top1_store, short_dir):
    """A kernel queued on a leased slot reads that expert, even if the slot is refilled after release.

    One device slot: once expert 0's lease is released, the daemon copies expert 1 into the
    very slot a queued copy of expert 0 is still waiting to read (behind a 0.2 s GPU sleep).
    """
    daemon = DaemonProcess(
        top1_store, short_dir, "--host-size", "96 slots", "--device", "cuda", "--device-size", "1 slots"
    )  # fmt: skip
    try:
        reader = StoreReader(top1_store)
        want = MemoryExperts.from_store(reader, [0]).weights[0]  # expert -> name -> tensor
        with ExpertClient(daemon.address) as client:
            name = client.tensor_names[0]
            with client.acquire(0, [0]) as lease:
                torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time queued ahead of the read
                snapshot = lease[0][name].clone()  # queued: runs after the sleep
            with client.acquire(0, [1]) as lease:  # refills the one slot
                assert lease.slots == (0,)
                assert torch.equal(lease[1][name].cpu(), want[1][name])
            torch.cuda.synchronize()
            assert torch.equal(snapshot.cpu(), want[0][name]), "the queued read saw the slot refilled"
    finally:
        daemon.terminate()


def test_closing_a_client_waits_for_the_gpu_work_still_reading_its_leases(top1_store, short_dir):
    """The bye releases every lease at once; queued reads of their slots still see their experts."""
    daemon = DaemonProcess(
        top1_store, short_dir, "--host-size", "96 slots", "--device", "cuda", "--device-size", "1 slots"
    )  # fmt: skip
    try:
        want = MemoryExperts.from_store(StoreReader(top1_store), [0]).weights[0]
        client = ExpertClient(daemon.address)
        name = client.tensor_names[0]
        lease = client.acquire(0, [0])
        torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time queued ahead of the read
        snapshot = lease[0][name].clone()
        client.close()  # never released: the daemon frees the slot on the bye
        with ExpertClient(daemon.address) as other, other.acquire(0, [1]) as refill:
            assert refill.slots == (0,)
        torch.cuda.synchronize()
        assert torch.equal(snapshot.cpu(), want[0][name]), "the queued read saw the slot refilled"
    finally:
        daemon.terminate()


def test_live_replay_on_a_cuda_device_tier(tmp_path, capsys):
    """`replay --live --live-device cuda`: real host->device copies, the FFNs on the GPU."""
    from expertd.daemon.cli.main import main

    out = tmp_path / "live.json"
    args = ["granite", "--live", "--live-device", "cuda", "--live-scale", "4", "--max-tokens", "16"]
    code = main(["replay", *args, "--capacity", "0.1", "--policy", "lru,default", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert [r["device"] for r in rows] == ["cuda", "cuda"]
    for row in rows:
        assert row["tokens"] == 16 and row["accesses"] == 16 * 24 * 8 and row["bytes_moved"] > 0
    print(capsys.readouterr().out)  # the measured table, for the device log
