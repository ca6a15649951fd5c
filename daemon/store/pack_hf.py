"""`expertd pack --from-hf MODEL_DIR OUT`: pack a transformers model directory's routed experts.

MODEL_DIR is what ``save_pretrained`` (or a hub download) leaves: config.json and safetensors
shards. Before anything is written, the config is checked against `expertd.daemon.protocol.families`
(the family must be one `expertd.client.hf.offload` accepts: the same table) and against the
checkpoint: the sparse layers, the number of experts, the expert tensors' names and shapes.
So store layer i is the model's MoE layer i, the mapping offload relies on, and the manifest
records the family's `ExpertLayout`. No transformers import: config.json is read as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from expertd.daemon.protocol.families import ConfigExperts, FamilyError, check_checkpoint, check_config
from expertd.daemon.store.checkpoint import CheckpointPlan
from expertd.daemon.store.manifest import CheckpointError, StoreManifest


def read_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``model_dir``'s config.json as a dict; `CheckpointError` if missing or unreadable."""
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
    return config


def config_experts(model_dir: str | os.PathLike[str]) -> ConfigExperts:
    """The family and experts ``model_dir``'s config.json describes; `CheckpointError` if unsupported."""
    try:
        return check_config(read_config(model_dir))
    except FamilyError as exc:
        raise CheckpointError(f"{model_dir}: {exc}") from None


def check_plan(model_dir: str | os.PathLike[str], experts: ConfigExperts, plan: CheckpointPlan) -> None:
    """The scanned checkpoint against the config's experts; `CheckpointError` naming the difference."""
    tensors = {t.name: (t.dtype, t.shape) for t in plan.tensors}
    try:
        check_checkpoint(experts, plan.naming, tensors, list(plan.checkpoint_layers), plan.num_experts)
    except FamilyError as exc:
        raise CheckpointError(f"{model_dir}: {exc}") from None


def pack_hf(
    model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], **options: Any
) -> StoreManifest:
    """Check ``model_dir``'s config against its family and its experts, then pack them
    (`pack_safetensors` options). Nothing is written unless every check passes."""
    from expertd.daemon.store.pack import pack_safetensors

    experts = config_experts(model_dir)
    return pack_safetensors(
        model_dir,
        out_dir,
        expert_layout=experts.layout,
        check=lambda plan: check_plan(model_dir, experts, plan),
        **options,
    )
