"""`expertd pack --from-hf MODEL_DIR OUT`: pack a transformers model directory's routed experts.

MODEL_DIR is what ``save_pretrained`` (or a hub download) leaves: config.json and safetensors
shards. The experts are found by name like ``--from-safetensors`` does; in addition the
config says which decoder layers are sparse and how many experts each has, and the pack
refuses a checkpoint that disagrees -- so store layer i is the model's MoE layer i, the
mapping `expertd.client.hf.offload` relies on. No transformers import: config.json is read
as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from expertd.daemon.store.checkpoint import scan_checkpoint
from expertd.daemon.store.manifest import CheckpointError, StoreManifest

HF_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
# Where configs keep the routed experts per layer (transformers 5 writes num_local_experts for most).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def expert_count(config: dict[str, Any]) -> int | None:
    """Routed experts per layer according to ``config`` (None if it does not say)."""
    value = next((config[k] for k in EXPERT_COUNT_KEYS if isinstance(config.get(k), int)), None)
    return int(value) if value is not None else None


def moe_layers(config: dict[str, Any]) -> list[int] | None:
    """The decoder layers with routed experts, by the model's own rule; None if the type is unknown."""
    kind = config.get("model_type")
    layers = int(config.get("num_hidden_layers", 0))
    if kind in ("mixtral", "olmoe"):
        return list(range(layers))
    if kind in ("qwen2_moe", "qwen3_moe"):  # their decoder layer: sparse unless listed or off-step
        only_mlp = set(config.get("mlp_only_layers") or [])
        step = int(config.get("decoder_sparse_step", 1) or 1)
        experts = expert_count(config) or 0
        return [i for i in range(layers) if i not in only_mlp and experts > 0 and (i + 1) % step == 0]
    if kind in ("deepseek_v2", "deepseek_v3"):
        first = int(config.get("first_k_dense_replace", 0))
        every = int(config.get("moe_layer_freq", 1) or 1)
        return [i for i in range(layers) if i >= first and i % every == 0]
    return None


def check_hf_model(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of ``model_dir`` checked against its checkpoint's experts; `CheckpointError` if apart."""
    directory = Path(model_dir)
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no config.json (not a save_pretrained directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    expected = moe_layers(config)
    with scan_checkpoint(directory) as plan:
        found_layers, found_experts = list(plan.checkpoint_layers), plan.num_experts
    if expected is not None and found_layers != expected:
        raise CheckpointError(
            f"{directory}: config.json ({config.get('model_type')}) has MoE layers {expected}, "
            f"the checkpoint has experts in layers {found_layers}"
        )
    count = expert_count(config)
    if config.get("model_type") in HF_TYPES and count != found_experts:
        raise CheckpointError(
            f"{directory}: config.json says {count} routed experts per layer, "
            f"the checkpoint has {found_experts}"
        )
    return config


def pack_hf(
    model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], **options: Any
) -> StoreManifest:
    """Check ``model_dir``'s config against its experts, then pack them (`pack_safetensors` options)."""
    from expertd.daemon.store.pack import pack_safetensors

    check_hf_model(model_dir)
    return pack_safetensors(model_dir, out_dir, **options)
