"""The MoE block through a real `expertd serve`: bit-exact with in-memory weights, 3 clients at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from expertd.client import ClientExperts, DaemonUnavailable, ExpertClient, MemoryExperts, MoEBlock, MoEConfig
from expertd.daemon.store.pack import pack_synthetic
from expertd.daemon.store.reader import StoreReader

CONFIG = MoEConfig(hidden_size=32, num_experts=64, top_k=8, norm_topk_prob=False)  # olmoe-1b-7b / 64
NUM_LAYERS = 3  # 192 experts
DEVICE_SLOTS = 16  # far fewer: every token evicts
TOKENS = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("e2e") / "store"
    pack_synthetic(path, "olmoe-1b-7b", scale=64, layers=NUM_LAYERS)
    return path


@pytest.fixture(scope="module")
def daemon(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    address = f"ipc://{tmp_path_factory.mktemp('sock')}/expertd.sock"
    argv = [sys.executable, "-m", "expertd.daemon", "serve", "--store", str(store), "--address", address]
    argv += ["--host-size", "64 slots", "--device", "cpu", "--device-size", f"{DEVICE_SLOTS} slots"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        with ExpertClient(address, connect_timeout_s=30.0):  # waits until it serves
            pass
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        assert proc.returncode == 0, stderr[-2000:]


@pytest.fixture(scope="module")
def reference(store: Path) -> MemoryExperts:
    with StoreReader(store) as reader:
        return MemoryExperts.from_store(reader, range(NUM_LAYERS))


def make_blocks(source, seed: int = 0) -> list[MoEBlock]:
    torch.manual_seed(seed)  # the same routers whatever the source
    return [MoEBlock(CONFIG, layer, source) for layer in range(NUM_LAYERS)]


@torch.inference_mode()
def decode(blocks: list[MoEBlock], x: torch.Tensor) -> torch.Tensor:
    """One token at a time through every block, with residual connections: [T, D] -> [T, D]."""
    out = []
    for token in x:
        h = token[None]  # [1, D]
        for block in blocks:
            h = h + block(h)
        out.append(h)
    return torch.cat(out)


def inputs(seed: int) -> torch.Tensor:
    return torch.randn(TOKENS, CONFIG.hidden_size, generator=torch.Generator().manual_seed(seed)).bfloat16()


def test_block_through_the_daemon_equals_in_memory_bit_for_bit(daemon: str, reference: MemoryExperts) -> None:
    x = inputs(0)
    want = decode(make_blocks(reference), x)
    with ExpertClient(daemon) as client:
        assert client.default_tier == "device"
        got = decode(make_blocks(ClientExperts(client)), x)
        device = client.stats()["tiers"]["device"]
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert device["evictions"] > 0 and device["slots"] == DEVICE_SLOTS


def test_a_prefill_routed_to_more_experts_than_the_tier_holds_is_leased_in_chunks(
    daemon: str, reference: MemoryExperts
) -> None:
    """All tokens through each block at once: their top-8 of 64 cover more experts than 16 slots."""
    x = torch.randn(32, CONFIG.hidden_size, generator=torch.Generator().manual_seed(5)).bfloat16()  # [T, D]
    with torch.inference_mode():
        want = [block(x) for block in make_blocks(reference)]
        with ExpertClient(daemon) as client:
            before = client.stats()["acquires"]["count"]
            got = [block(x) for block in make_blocks(ClientExperts(client))]
            acquires = client.stats()["acquires"]["count"] - before
    for layer, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g.view(torch.int16), w.view(torch.int16)), f"layer {layer} differs"
    assert acquires > NUM_LAYERS  # chunked: more than one acquire per layer


def test_three_clients_at_once_each_get_their_exact_output(daemon: str, reference: MemoryExperts) -> None:
    wants = {seed: decode(make_blocks(reference, seed), inputs(seed)) for seed in (1, 2, 3)}
    blocks_of, gots, errors = {}, {}, []
    clients = {seed: ExpertClient(daemon, name=f"e2e-{seed}") for seed in wants}
    for seed, client in clients.items():  # build on this thread: manual_seed is global
        blocks_of[seed] = make_blocks(ClientExperts(client), seed)

    def run(seed: int) -> None:
        try:
            gots[seed] = decode(blocks_of[seed], inputs(seed))
        except Exception as exc:  # reported below, with the seed
            errors.append((seed, exc))

    threads = [threading.Thread(target=run, args=(seed,)) for seed in wants]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stats = clients[1].stats()
    for client in clients.values():
        client.close()
    assert not errors, errors
    for seed, want in wants.items():
        assert torch.equal(gots[seed].view(torch.int16), want.view(torch.int16)), f"client {seed} differs"
    assert len(stats["sessions"]) >= 3


def test_client_survives_a_daemon_restart(store: Path, tmp_path: Path, reference: MemoryExperts) -> None:
    address = f"ipc://{tmp_path}/restart.sock"
    argv = [sys.executable, "-m", "expertd.daemon", "serve", "--store", str(store), "--address", address]
    argv += ["--host-size", "64 slots", "--device", "cpu", "--device-size", f"{DEVICE_SLOTS} slots"]
    first = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    client = ExpertClient(address, connect_timeout_s=30.0, timeout_s=30.0)
    try:
        blocks = make_blocks(ClientExperts(client))
        old = client.acquire(0, [1, 2])
        first.kill()  # SIGKILL: no cleanup, stale shared memory left behind
        first.wait()
        with pytest.raises(DaemonUnavailable):
            client.acquire_async(0, [3]).result(timeout=0.5)
        second = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        try:
            x = inputs(4)
            got = decode(blocks, x)  # no_session -> hello -> remap -> retry
            assert old.stale
            assert torch.equal(got.view(torch.int16), decode(make_blocks(reference), x).view(torch.int16))
            assert not Path(f"/dev/shm/expertd-{first.pid}-host").exists()  # cleaned at start
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=10)
    finally:
        client.close()
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
