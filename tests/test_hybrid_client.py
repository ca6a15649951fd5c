"""Hybrid compute in the client: host-placed experts on CPU threads, summed bit for bit as in memory."""

from __future__ import annotations

import contextlib

import pytest
import torch

from expertd.client import MemoryExperts, MoEBlock, MoEConfig
from expertd.client.host_compute import HostCompute, default_threads
from expertd.client.moe import add_experts, route

CFG = MoEConfig(hidden_size=32, num_experts=8, top_k=4)  # k > 2: the order of a sum shows


def expert_weights(dtype: torch.dtype, seed: int = 3) -> dict[int, dict[int, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (48, 32), "w3": (48, 32), "w2": (32, 48)}
    return {
        layer: {
            e: {n: (torch.randn(s, generator=g) / 8).to(dtype) for n, s in shapes.items()} for e in range(8)
        }
        for layer in range(2)
    }


class _PlacedLease:
    """A lease whose ``places`` say which experts the block computes on the host."""

    def __init__(
        self, weights: dict[int, dict[str, torch.Tensor]], experts: list[int], host: set[int]
    ) -> None:
        self.weights = weights
        self.experts = experts
        self.places = tuple("host" if e in host else "device" for e in experts)

    def __getitem__(self, expert: int) -> dict[str, torch.Tensor]:
        return self.weights[expert]

    def place_of(self, expert: int) -> str:
        return self.places[self.experts.index(expert)]


class PlacedExperts(MemoryExperts):
    """In-memory experts placed as a daemon would: ``host`` ids on the host, the rest on the device."""

    wants_tokens = True

    def __init__(self, weights, host: set[int], max_per_acquire: int | None = None) -> None:
        super().__init__(weights)
        self.host = host
        self.max_per_acquire = max_per_acquire
        self.asked: list[tuple[list[int], list[int]]] = []

    def experts(self, layer, experts, tokens=None):
        self.asked.append((list(experts), list(tokens or [])))
        return contextlib.nullcontext(_PlacedLease(self.weights[layer], list(experts), self.host))


def blocks(source, dtype: torch.dtype, host: HostCompute | None = None) -> list[MoEBlock]:
    torch.manual_seed(0)  # the same routers whatever the source
    return [MoEBlock(CFG, layer, source, dtype=dtype, host=host) for layer in range(2)]


@torch.inference_mode()
def run(model: list[MoEBlock], x: torch.Tensor) -> torch.Tensor:
    h = x
    for block in model:
        h = h + block(h)
    return h


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7])
def test_hybrid_block_equals_the_in_memory_block_bit_for_bit(dtype, tokens) -> None:
    weights = expert_weights(dtype)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    reference = run(blocks(MemoryExperts(weights), dtype), x)
    with HostCompute(2) as host:
        placed = PlacedExperts(weights, host={1, 2, 5, 6})
        out = run(blocks(placed, dtype, host), x)
        assert host.computed > 0, "no expert was computed on the host: the test would prove nothing"
    assert torch.equal(out, reference)


def test_hybrid_chunks_and_every_expert_on_the_host_still_equal() -> None:
    weights = expert_weights(torch.bfloat16)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    reference = run(blocks(MemoryExperts(weights), torch.bfloat16), x)
    with HostCompute(3) as host:
        placed = PlacedExperts(weights, host=set(range(8)), max_per_acquire=4)  # chunks of 2
        out = run(blocks(placed, torch.bfloat16, host), x)
    assert torch.equal(out, reference)
    assert all(len(experts) <= 2 for experts, _ in placed.asked)


def test_the_block_tells_a_placing_source_the_tokens_routed_to_each_expert() -> None:
    weights = expert_weights(torch.float32)
    placed = PlacedExperts(weights, host={0})
    block = blocks(placed, torch.float32)[0]
    x = torch.randn(5, 32)
    with torch.no_grad():
        _, experts = route(block.gate(x), CFG.top_k, CFG.norm_topk_prob)
        block(x)
    asked, tokens = placed.asked[0]
    assert asked == sorted(set(experts.flatten().tolist()))
    assert tokens == [int((experts == e).sum()) for e in asked]
    assert sum(tokens) == 5 * CFG.top_k


def test_add_experts_refuses_host_experts_without_threads() -> None:
    weights = expert_weights(torch.float32)[0]
    x = torch.randn(2, 32)
    w, e = route(torch.randn(2, 8), 2, True)
    out = torch.zeros(2, 32)
    with pytest.raises(AssertionError, match="need a HostCompute"):
        add_experts(out, x, w, e, sorted(set(e.flatten().tolist())), weights.__getitem__,
                    ("w1", "w3", "w2"), on_host=frozenset(e.flatten().tolist()))  # fmt: skip


def test_default_threads_leave_the_daemons_readers_their_cores(monkeypatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    hello = {"host_compute": {"reader_threads": 4}}
    assert default_threads(hello, "ipc:///run/expertd.sock") == 16 - 4 - 1
    assert default_threads(hello, "tcp://10.0.0.2:5555") == 15  # another machine's readers
    assert default_threads({"host_compute": {"reader_threads": True}}, "ipc://x") == 15  # not a count
    said = {"host_compute": {"threads": 6, "reader_threads": 4}}  # the daemon's [placement] threads
    assert default_threads(said, "ipc://x") == 6 and default_threads(said, "tcp://h:1") == 15
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert default_threads({"host_compute": {"reader_threads": 8}}, "ipc://x") == 1  # never below one
    with pytest.raises(ValueError, match="at least 1"):
        HostCompute(0)
