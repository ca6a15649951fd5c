"""`sglang-json`: SGLang expert-selection dumps, one JSON file per request (a list of steps).

A step maps the transformer layer id (a string) to null for a dense layer, or to one `[k expert
ids]` entry per token the step computed. Step 0 is the prefill; each later step decodes one
token. MoE layers are renumbered 0..L-1 in transformer order (Llama-4: ids 1, 3, .., 47 -> 0..23);
the transformer ids are kept in ``meta.extra["moe_layer_ids"]``. The dumps record neither the
model nor the expert count: the defaults are those of the public Llama-4-Maverick dump.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from expertd.traces.convert import (
    ConvertOptions,
    converter,
    expert_problem,
    int_array,
    make_meta,
    progress,
    source_files,
)
from expertd.traces.format import PHASE_DECODE, PHASE_PREFILL, TraceFormatError, TraceWriter

DEFAULT_MODEL = "meta-llama/Llama-4-Maverick-17B-128E-Instruct"
DEFAULT_EXPERTS = 128


def _load_steps(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as file:
            steps = json.load(file)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
    if not isinstance(steps, list) or not steps:
        raise TraceFormatError(f"{path}: expected a non-empty list of forward steps")
    for index, step in enumerate(steps):
        if not isinstance(step, dict):
            raise TraceFormatError(f"{path}: step {index} is not an object")
    return steps


def _moe_layer_ids(path: Path, step: dict[str, Any]) -> list[int]:
    """Transformer ids of the layers that hold routing (not null) in `step`, ascending."""
    ids = []
    for key, value in step.items():
        if not key.isdigit():
            raise TraceFormatError(f"{path}: step 0 key {key!r} is not a layer id")
        if value is not None:
            ids.append(int(key))
    if not ids:
        raise TraceFormatError(f"{path}: step 0 has no MoE layer (every layer is null)")
    return sorted(ids)


def _step_experts(path: Path, index: int, step: dict[str, Any], layer_ids: list[int], k: int) -> np.ndarray:
    """One step's routing as experts [tokens, layers, k]."""
    moe = sorted(int(key) for key, value in step.items() if value is not None and key.isdigit())
    if moe != layer_ids:
        raise TraceFormatError(f"{path}: step {index}: MoE layers {moe} differ from {layer_ids}")
    layers: list[np.ndarray] = []
    for layer_id in layer_ids:
        value = step[str(layer_id)]
        experts = np.empty((0, k), np.int64) if value == [] else int_array(value, 2)
        if experts is None or experts.shape[1] != k:
            raise TraceFormatError(
                f"{path}: step {index} layer {layer_id}: expected a list of [{k} expert ids] per token"
            )
        if layers and len(experts) != len(layers[0]):
            raise TraceFormatError(
                f"{path}: step {index} layer {layer_id}: {len(experts)} "
                f"tokens, layer {layer_ids[0]} has {len(layers[0])}"
            )
        layers.append(experts)
    return np.stack(layers, axis=1)  # [T, L, k]


def _request_rows(
    path: Path, steps: list[dict[str, Any]], layer_ids: list[int], k: int, num_experts: int
) -> tuple[np.ndarray, np.ndarray]:
    """(experts [T, L, k], phase [T]) of one request file, in token order."""
    per_step = [_step_experts(path, i, step, layer_ids, k) for i, step in enumerate(steps)]
    for index, experts in enumerate(per_step):
        problem = expert_problem(experts.reshape(-1, k), num_experts)
        if problem:
            token, layer = divmod(problem[0], len(layer_ids))
            raise TraceFormatError(
                f"{path}: step {index} layer {layer_ids[layer]} token {token}: {problem[1]}"
            )
    counts = [len(experts) for experts in per_step]
    phase = np.repeat([PHASE_PREFILL, PHASE_DECODE], [counts[0], sum(counts[1:])])
    return np.concatenate(per_step), phase


@converter("sglang-json", "SGLang per-request JSON: forward steps of layer id -> top-k per token")
def convert_sglang(src: Path, out: Path, options: ConvertOptions) -> None:
    """Each file is a request named ``folder/stem`` (e.g. ``llama4-mmlu-anatomy/17``)."""
    files = source_files(src, ".json")
    names = [f"{path.parent.name}/{path.stem}" for path in files]
    if len(set(names)) != len(names):
        raise TraceFormatError(f"{src}: two files give the same request name folder/stem")
    first = _load_steps(files[0])
    layer_ids = _moe_layer_ids(files[0], first[0])
    entry = first[0][str(layer_ids[0])]
    k = len(entry[0]) if isinstance(entry, list) and entry and isinstance(entry[0], list) else 0
    if k < 1:
        raise TraceFormatError(f"{files[0]}: step 0 layer {layer_ids[0]}: no token to take k from")
    meta = make_meta(
        options,
        model=DEFAULT_MODEL,
        num_layers=len(layer_ids),
        num_experts=DEFAULT_EXPERTS,
        top_k=k,
        source=f"sglang-json: {len(files)} files under {src.name}",
        requests=names,
        extra={"moe_layer_ids": layer_ids},
        has_phase=True,
    )
    with TraceWriter(out, meta) as writer:
        for request, path in enumerate(progress(files, "sglang-json")):
            steps = first if request == 0 else _load_steps(path)
            experts, phase = _request_rows(path, steps, layer_ids, k, meta.num_experts)
            tokens = len(experts)
            writer.append(
                request,
                np.repeat(np.arange(tokens), len(layer_ids)),
                np.tile(np.arange(len(layer_ids)), tokens),
                experts.reshape(-1, k),
                phase=np.repeat(phase, len(layer_ids)),
            )
