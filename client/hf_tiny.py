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
    "qwen3_next": (
        "Qwen3NextConfig", "Qwen3NextForCausalLM",
        {"intermediate_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
         "num_experts": 16, "num_experts_per_tok": 4, "head_dim": 16, "linear_num_value_heads": 4,
         "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16},
    ),
    "glm4_moe": (
        "Glm4MoeConfig", "Glm4MoeForCausalLM",
        {"intermediate_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 16,
         "num_experts_per_tok": 4, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "head_dim": 16},
    ),
    "dots1": (
        "Dots1Config", "Dots1ForCausalLM",
        {"intermediate_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 16,
         "num_experts_per_tok": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1,
         "topk_group": 1, "head_dim": 16},
    ),
    "phimoe": (
        "PhimoeConfig", "PhimoeForCausalLM",
        {"intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "jamba": (
        "JambaConfig", "JambaForCausalLM",
        {"intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "expert_layer_period": 2,
         "expert_layer_offset": 1, "attn_layer_period": 2, "attn_layer_offset": 0, "mamba_d_state": 8},
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
        {"intermediate_size": 64, "moe_intermediate_size": 32, "moe_num_experts": 16, "moe_k": 4,
         "moe_num_shared_experts": 1, "moe_layer_start_index": 1},
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
        {"intermediate_size": 32, "moe_intermediate_size": 32, "num_experts": 8, "moe_topk": 2,
         "head_dim": 16},
    ),
    "minimax": (
        "MiniMaxConfig", "MiniMaxForCausalLM",
        {"intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 16},
    ),
    "minimax_m2": (
        "MiniMaxM2Config", "MiniMaxM2ForCausalLM",
        {"intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 16},
    ),
    "gpt_oss": (
        "GptOssConfig", "GptOssForCausalLM",
        {"intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 16},
    ),
    "llama4_text": (
        "Llama4TextConfig", "Llama4ForCausalLM",
        {"intermediate_size": 32, "intermediate_size_mlp": 64, "num_local_experts": 8,
         "num_experts_per_tok": 1, "head_dim": 16},
    ),
    "granitemoe": (
        "GraniteMoeConfig", "GraniteMoeForCausalLM",
        {"intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
        {"intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
         "shared_intermediate_size": 32, "mamba_n_heads": 8, "mamba_d_state": 8, "mamba_d_head": 16,
         "mamba_chunk_size": 16},
    ),
    "dbrx": (
        "DbrxConfig", "DbrxForCausalLM",
        {"d_model": 64, "n_heads": 4, "max_seq_len": 512,
         "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
         "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2}},
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


def installed() -> list[str]:
    """The `TINY` models whose classes the installed transformers has."""
    import transformers

    return [name for name, (config, model, _) in TINY.items() if hasattr(transformers, model)]


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
    if name == "granitemoehybrid":  # Mamba layers with attention between them
        arguments.setdefault("layer_types", ["mamba", "attention"] * (layers // 2) + ["mamba"] * (layers % 2))
    config = getattr(transformers, config_class)(**arguments)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    return model.to(dtype).eval()


def byte_prompt(text: str) -> torch.Tensor:
    """``text``'s UTF-8 bytes as token ids [1, n] (the tiny models' vocabulary is bytes)."""
    return torch.tensor([list(text.encode())], dtype=torch.long)


if __name__ == "__main__":  # README.md's list of families: what tests/test_hf.py runs with this transformers
    from expertd.daemon.protocol.families import readme_line

    print(readme_line(installed()))
