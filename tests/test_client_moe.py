"""The MoE block: routing, the SwiGLU math, hints, and bit-exact equality of leased and in-memory weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from client_fake_daemon import FakeDaemon

from expertd.client import ClientExperts, ExpertClient, MemoryExperts, MoEBlock, MoEConfig
from expertd.client.moe import route, swiglu_names
from expertd.daemon.store.pack import pack_synthetic
from expertd.daemon.store.reader import StoreReader

OLMOE = MoEConfig(hidden_size=32, num_experts=64, top_k=8, norm_topk_prob=False)  # olmoe-1b-7b / 64
MIXTRAL = MoEConfig(hidden_size=64, num_experts=8, top_k=2)  # mixtral-8x7b / 64


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    pack_synthetic(root / "olmoe", "olmoe-1b-7b", scale=64, layers=3)
    pack_synthetic(root / "mixtral", "mixtral-8x7b", scale=64, layers=2)
    return {"olmoe": root / "olmoe", "mixtral": root / "mixtral"}


def make_blocks(config: MoEConfig, source, num_layers: int, seed: int = 0) -> list[MoEBlock]:
    torch.manual_seed(seed)  # the same routers whatever the source
    return [MoEBlock(config, layer, source) for layer in range(num_layers)]


@torch.inference_mode()
def run(blocks: list[MoEBlock], x: torch.Tensor) -> torch.Tensor:
    """Decode one token at a time through every block, with residual connections."""
    outputs = []
    for token in x:  # [D]
        h = token[None]  # [1, D]
        for block in blocks:
            h = h + block(h)
        outputs.append(h)
    return torch.cat(outputs)  # [T, D]


def test_route_takes_top_k_and_renormalises() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 3.0]])
    weights, experts = route(logits, 2, norm_topk_prob=False)
    probs = F.softmax(logits, dim=-1)
    assert experts.tolist() == [[3, 1]]
    assert torch.equal(weights, probs[:, [3, 1]])
    weights, _ = route(logits, 2, norm_topk_prob=True)
    assert torch.allclose(weights.sum(-1), torch.ones(1)) and weights.dtype == torch.float32


def test_block_equals_a_dense_mixture_of_all_experts() -> None:
    torch.manual_seed(1)
    cfg = MoEConfig(hidden_size=16, num_experts=6, top_k=2)
    weights = {
        0: {
            e: {"w1": torch.randn(24, 16), "w3": torch.randn(24, 16), "w2": torch.randn(16, 24)}
            for e in range(6)
        }
    }
    block = MoEBlock(cfg, 0, MemoryExperts(weights), dtype=torch.float32)
    x = torch.randn(5, 16)  # [T, D]
    with torch.no_grad():
        probs = F.softmax(block.gate(x), dim=-1)  # [T, E]
        top, idx = probs.topk(2, dim=-1)  # [T, k]
        mix = torch.zeros_like(probs).scatter(1, idx, top / top.sum(-1, keepdim=True))  # [T, E]
        dense = sum(
            mix[:, e, None] * (F.silu(x @ w["w1"].T) * (x @ w["w3"].T)) @ w["w2"].T
            for e, w in weights[0].items()
        )
        assert torch.allclose(block(x), dense, atol=1e-4, rtol=1e-4)
        assert block(x[None]).shape == (1, 5, 16)  # any leading shape


@pytest.mark.parametrize(("name", "config", "slots"), [("olmoe", OLMOE, 16), ("mixtral", MIXTRAL, 2)])
def test_leased_weights_give_the_in_memory_output_bit_for_bit(
    stores: dict[str, Path], tmp_path: Path, name: str, config: MoEConfig, slots: int
) -> None:
    store = stores[name]
    with StoreReader(store) as reader:
        num_layers = reader.manifest.num_layers
        reference = MemoryExperts.from_store(reader, range(num_layers))
    torch.manual_seed(2)
    x = torch.randn(6, config.hidden_size, dtype=torch.bfloat16)  # [T, D]
    want = run(make_blocks(config, reference, num_layers), x)

    address = f"ipc://{tmp_path}/expertd.sock"
    with FakeDaemon(address, str(store), slots=slots) as fake, ExpertClient(address) as client:
        got = run(make_blocks(config, ClientExperts(client), num_layers), x)
        acquires = fake.ops("acquire")
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert len(acquires) == 6 * num_layers
    assert len(fake.resident) <= slots < config.num_experts  # the cache evicted on the way


def test_block_hints_the_next_layer_experts() -> None:
    torch.manual_seed(3)
    cfg = MoEConfig(hidden_size=8, num_experts=4, top_k=2, norm_topk_prob=False)
    w = {"gate_proj": torch.randn(4, 8), "up_proj": torch.randn(4, 8), "down_proj": torch.randn(8, 4)}
    source = MemoryExperts({0: dict.fromkeys(range(4), w)})
    next_router = torch.nn.Linear(8, 4, bias=False)
    block = MoEBlock(cfg, 0, source, next_router=next_router, dtype=torch.float32)
    x = torch.randn(3, 8)  # [T, D]
    with torch.no_grad():
        block(x)
        probs = F.softmax(next_router(x), dim=-1)  # [T, E]
        top, idx = probs.topk(2, dim=-1)  # [T, k]
        score = torch.zeros(4).index_add_(0, idx.flatten(), top.flatten())  # [E]
    [(layer, experts, scores)] = source.hints
    assert layer == 1
    assert experts == [e for e in torch.argsort(score, descending=True).tolist() if score[e] > 0]
    assert scores == pytest.approx(score[experts].tolist())


def test_hints_reach_the_daemon(stores: dict[str, Path], tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/expertd.sock"
    cfg = MoEConfig(**{**OLMOE.__dict__, "hint_top_n": 5})
    with FakeDaemon(address, str(stores["olmoe"]), slots=16) as fake, ExpertClient(address) as client:
        torch.manual_seed(0)
        next_router = torch.nn.Linear(32, 64, bias=False, dtype=torch.bfloat16)
        block = MoEBlock(cfg, 0, ClientExperts(client), next_router=next_router)
        with torch.inference_mode():
            block(torch.randn(2, 32, dtype=torch.bfloat16))
        client.ping()  # the daemon reads in order: the hint is in
        [hint] = fake.ops("hint")
    assert hint.layer == 1 and len(hint.experts) == 5 and len(hint.scores) == 5
    assert hint.scores == sorted(hint.scores, reverse=True)


def test_expert_names_come_from_the_layout() -> None:
    assert swiglu_names(["w1", "w3", "w2"]) == ("w1", "w3", "w2")
    assert swiglu_names(["gate_proj", "up_proj", "down_proj"]) == ("gate_proj", "up_proj", "down_proj")
    with pytest.raises(ValueError, match=r"layout \['down_proj', 'gate_up_proj'\] is not a plain SwiGLU"):
        swiglu_names(["gate_up_proj", "down_proj"])
    with pytest.raises(ValueError, match="not a plain SwiGLU"):  # FP8 scales would change the math
        swiglu_names(["gate_proj", "up_proj", "down_proj", "gate_proj.weight_scale_inv"])


def test_wrong_hidden_size_is_refused() -> None:
    source = MemoryExperts({0: {0: {"w1": torch.zeros(1), "w3": torch.zeros(1), "w2": torch.zeros(1)}}})
    block = MoEBlock(MoEConfig(hidden_size=4, num_experts=2, top_k=1), 0, source)
    with pytest.raises(AssertionError, match="x has hidden size 3, expected 4"):
        block(torch.zeros(2, 3, dtype=torch.bfloat16))
