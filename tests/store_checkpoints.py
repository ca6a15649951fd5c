"""Small Hugging Face-style safetensors checkpoints for the store tests, one per naming.

Each builder writes a checkpoint directory and returns the routed experts it contains as
``{(moe_layer, expert): {blob tensor name: tensor}}``: what a store must read back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

Experts = dict[tuple[int, int], dict[str, torch.Tensor]]

HIDDEN = 64
FFN = 96


def weights(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    """Save ``tensors`` round-robin into ``shards`` files plus a model.safetensors.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {name: files[i % shards] for i, name in enumerate(names)}
    for file in files:
        save_file({n: tensors[n].contiguous() for n in names if weight_map[n] == file}, directory / file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def write_config(directory: Path, **config: object) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))


def _attention(prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.self_attn.q_proj.weight": weights(HIDDEN, HIDDEN, gen=gen),
        f"{prefix}.input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
    }


def mixtral(directory: Path, *, layers: int = 2, experts: int = 4, seed: int = 0) -> Experts:
    gen = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": weights(100, HIDDEN, gen=gen)}
    out: Experts = {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        tensors |= _attention(prefix, gen)
        tensors[f"{prefix}.block_sparse_moe.gate.weight"] = weights(experts, HIDDEN, gen=gen)
        for e in range(experts):
            blob = {
                "w1": weights(FFN, HIDDEN, gen=gen),
                "w2": weights(HIDDEN, FFN, gen=gen),
                "w3": weights(FFN, HIDDEN, gen=gen),
            }
            for name, t in blob.items():
                tensors[f"{prefix}.block_sparse_moe.experts.{e}.{name}.weight"] = t
            out[(layer, e)] = blob
    write_config(directory, model_type="mixtral", _name_or_path="test/tiny-mixtral")
    write_shards(directory, tensors)
    return out


def qwen_moe(directory: Path, *, layers: int = 2, experts: int = 6, seed: int = 1) -> Experts:
    """Qwen2-MoE/OLMoE style, with Qwen2-MoE's shared expert (not a routed expert)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    out: Experts = {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp"
        tensors |= _attention(f"model.layers.{layer}", gen)
        tensors[f"{prefix}.gate.weight"] = weights(experts, HIDDEN, gen=gen)
        for name in ("gate_proj", "up_proj", "down_proj"):
            tensors[f"{prefix}.shared_expert.{name}.weight"] = weights(FFN, HIDDEN, gen=gen)
        tensors[f"{prefix}.shared_expert_gate.weight"] = weights(1, HIDDEN, gen=gen)
        for e in range(experts):
            blob = {
                "gate_proj": weights(FFN, HIDDEN, gen=gen),
                "up_proj": weights(FFN, HIDDEN, gen=gen),
                "down_proj": weights(HIDDEN, FFN, gen=gen),
            }
            for name, t in blob.items():
                tensors[f"{prefix}.experts.{e}.{name}.weight"] = t
            out[(layer, e)] = blob
    write_config(directory, model_type="qwen2_moe", num_hidden_layers=layers)
    write_shards(directory, tensors, shards=3)
    return out


def deepseek(directory: Path, *, moe_layers: int = 2, experts: int = 4, seed: int = 2) -> Experts:
    """DeepSeek-V2/V3 style: a dense first layer, shared experts, and an MTP layer past the end."""
    gen = torch.Generator().manual_seed(seed)
    num_hidden = moe_layers + 1
    tensors: dict[str, torch.Tensor] = {}
    for name in ("gate_proj", "up_proj", "down_proj"):  # layer 0: a dense MLP, same names
        tensors[f"model.layers.0.mlp.{name}.weight"] = weights(FFN * 2, HIDDEN, gen=gen)
    out: Experts = {}
    for layer in range(1, num_hidden + 1):  # layer num_hidden: the MTP module, not packed
        prefix = f"model.layers.{layer}.mlp"
        tensors[f"{prefix}.gate.weight"] = weights(experts, HIDDEN, gen=gen)
        for name in ("gate_proj", "up_proj", "down_proj"):
            tensors[f"{prefix}.shared_experts.{name}.weight"] = weights(FFN, HIDDEN, gen=gen)
        for e in range(experts):
            blob = {
                "gate_proj": weights(FFN, HIDDEN, gen=gen),
                "up_proj": weights(FFN, HIDDEN, gen=gen),
                "down_proj": weights(HIDDEN, FFN, gen=gen),
            }
            for name, t in blob.items():
                tensors[f"{prefix}.experts.{e}.{name}.weight"] = t
            if layer < num_hidden:
                out[(layer - 1, e)] = blob
    write_config(directory, model_type="deepseek_v2", num_hidden_layers=num_hidden, first_k_dense_replace=1)
    write_shards(directory, tensors)
    return out


def fused(
    directory: Path, *, style: str = "llama4", layers: int = 2, experts: int = 4, seed: int = 3
) -> Experts:
    """Stacked experts with a leading expert dimension: Llama-4 or GPT-OSS (with biases)."""
    gen = torch.Generator().manual_seed(seed)
    if style == "llama4":
        block, prefix_root = "feed_forward", "language_model.model.layers"
    else:
        block, prefix_root = "mlp", "model.layers"
    tensors: dict[str, torch.Tensor] = {}
    stacks: dict[int, dict[str, torch.Tensor]] = {}
    for layer in range(layers):
        prefix = f"{prefix_root}.{layer}.{block}"
        stack = {
            "gate_up_proj": weights(experts, HIDDEN, 2 * FFN, gen=gen),
            "down_proj": weights(experts, FFN, HIDDEN, gen=gen),
        }
        if style == "gpt-oss":
            stack["gate_up_proj_bias"] = weights(experts, 2 * FFN, gen=gen)
            stack["down_proj_bias"] = weights(experts, HIDDEN, gen=gen)
            tensors[f"{prefix}.router.weight"] = weights(experts, HIDDEN, gen=gen)
        else:
            tensors[f"{prefix}.router.weight"] = weights(experts, HIDDEN, gen=gen)
            tensors[f"{prefix}.shared_expert.gate_proj.weight"] = weights(FFN, HIDDEN, gen=gen)
        for name, t in stack.items():
            tensors[f"{prefix}.experts.{name}"] = t
        stacks[layer] = stack
    write_shards(directory, tensors, shards=1)
    return {
        (layer, e): {name: t[e] for name, t in stack.items()}
        for layer, stack in stacks.items()
        for e in range(experts)
    }


BUILDERS = {
    "mixtral": mixtral,
    "qwen-moe": qwen_moe,
    "deepseek": deepseek,
    "llama4-fused": lambda d: fused(d, style="llama4"),
    "gpt-oss-fused": lambda d: fused(d, style="gpt-oss"),
}
