"""Tiny random-init transformers MoE models, built locally (no download): tests and the demo.

Each has the real architecture of its class -- router, routed experts, shared experts where
the class has them, dense first layers for DeepSeek -- with small dimensions and a realistic
number of experts per layer. `tiny_model` builds one; ``save_pretrained`` then gives a
directory that `expertd pack --from-hf` packs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: name -> (config class, model class, config arguments); dims are small, expert counts are not.
TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": (
        "MixtralConfig", "MixtralForCausalLM",
        {"intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        {"intermediate_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
         "num_experts": 16, "num_experts_per_tok": 4},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        {"intermediate_size": 64, "moe_intermediate_size": 32, "num_experts": 32, "num_experts_per_tok": 4,
         "head_dim": 16},
    ),
    "olmoe": (
        "OlmoeConfig", "OlmoeForCausalLM",
        {"intermediate_size": 32, "num_experts": 16, "num_experts_per_tok": 4},
    ),
    "deepseek_v3": (
        "DeepseekV3Config", "DeepseekV3ForCausalLM",
        {"intermediate_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 16,
         "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "n_shared_experts": 1,
         "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
         "qk_nope_head_dim": 8, "v_head_dim": 16},
    ),
    "deepseek_v2": (
        "DeepseekV2Config", "DeepseekV2ForCausalLM",
        {"intermediate_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 16,
         "num_experts_per_tok": 4, "n_shared_experts": 2, "first_k_dense_replace": 1, "q_lora_rank": None,
         "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16},
    ),
}  # fmt: skip
COMMON = {
    "vocab_size": 256,  # one token per byte: prompts need no tokenizer
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 0,
    "eos_token_id": None,  # random weights never stop on their own: generate max_new_tokens
    "pad_token_id": 0,
}


def tiny_model(
    name: str,
    *,
    layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """A random-init ``name`` model (see `TINY`) with ``layers`` decoder layers, in eval mode."""
    import transformers

    if name not in TINY:
        raise ValueError(f"unknown tiny model {name!r} (known: {', '.join(TINY)})")
    config_class, model_class, arguments = TINY[name]
    arguments = {**COMMON, **arguments, "num_hidden_layers": layers, **overrides}
    if name.startswith("deepseek"):
        arguments["num_key_value_heads"] = arguments["num_attention_heads"]
    config = getattr(transformers, config_class)(**arguments)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    return model.to(dtype).eval()


def byte_prompt(text: str) -> torch.Tensor:
    """``text``'s UTF-8 bytes as token ids [1, n] (the tiny models' vocabulary is bytes)."""
    return torch.tensor([list(text.encode())], dtype=torch.long)
