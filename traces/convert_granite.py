"""`granite-json`: onnx-genai's `moe_expert_trace.json` (per prompt: prefill, decode, top-k).

One JSON object: ``{model, num_layers, num_experts, top_k, prompts: {name: {prompt_len,
prefill: [P][layers][k], decode: [D][layers][k]}}}``. Each prompt is a request; tokens 0..P-1
are the prefill positions and P+s is decode step s. No gate scores are recorded.
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

_GEOMETRY = ("num_layers", "num_experts", "top_k")


def _load(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            doc = json.load(file)
    except json.JSONDecodeError as exc:
        raise TraceFormatError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("prompts"), dict):
        raise TraceFormatError(f"{path}: expected an object with a 'prompts' object")
    for name in _GEOMETRY:
        if not isinstance(doc.get(name), int) or isinstance(doc.get(name), bool):
            raise TraceFormatError(f"{path}: '{name}' must be an integer")
    return doc


def _prompt_rows(
    path: Path, name: str, prompt: Any, doc: dict[str, Any], num_experts: int
) -> tuple[np.ndarray, np.ndarray]:
    """(experts [T, layers, k], phase [T]) of one prompt, prefill tokens first."""
    where = f"{path}: prompts.{name}"
    if not isinstance(prompt, dict):
        raise TraceFormatError(f"{where}: expected an object")
    parts = []
    for part in ("prefill", "decode"):
        experts = int_array(prompt.get(part), 3)
        if experts is None:
            experts = int_array(prompt.get(part), 1)  # an empty list
            if experts is None or experts.size:
                raise TraceFormatError(f"{where}.{part}: expected [tokens][layers][k] integers")
            experts = experts.reshape(0, doc["num_layers"], doc["top_k"])
        if experts.shape[1:] != (doc["num_layers"], doc["top_k"]):
            raise TraceFormatError(
                f"{where}.{part}: shape {list(experts.shape)}, expected "
                f"[tokens, {doc['num_layers']}, {doc['top_k']}]"
            )
        parts.append(experts)
    if prompt.get("prompt_len") != len(parts[0]):
        raise TraceFormatError(
            f"{where}: prompt_len {prompt.get('prompt_len')!r} but {len(parts[0])} prefill positions"
        )
    experts = np.concatenate(parts)  # [T, L, k]
    problem = expert_problem(experts.reshape(-1, doc["top_k"]), num_experts)
    if problem:
        token, layer = divmod(problem[0], doc["num_layers"])
        part, index = ("prefill", token) if token < len(parts[0]) else ("decode", token - len(parts[0]))
        raise TraceFormatError(f"{where}.{part}[{index}][{layer}]: {problem[1]}")
    phase = np.repeat([PHASE_PREFILL, PHASE_DECODE], [len(parts[0]), len(parts[1])])
    return experts, phase


@converter("granite-json", "onnx-genai moe_expert_trace.json: prompts with prefill and decode")
def convert_granite(src: Path, out: Path, options: ConvertOptions) -> None:
    """Each prompt becomes a request (named ``file/prompt`` when SRC is a directory)."""
    files = source_files(src, ".json")
    docs = [_load(path) for path in files]
    first = docs[0]
    for path, doc in zip(files, docs, strict=True):
        if any(doc[name] != first[name] for name in _GEOMETRY):
            raise TraceFormatError(f"{path}: geometry differs from {files[0]}")
    names = [
        name if src.is_file() else f"{path.relative_to(src).with_suffix('').as_posix()}/{name}"
        for path, doc in zip(files, docs, strict=True)
        for name in doc["prompts"]
    ]
    meta = make_meta(
        options,
        model=str(first.get("model") or "granite"),
        source=f"granite-json: {', '.join(path.name for path in files)}",
        requests=names,
        has_phase=True,
        **{name: first[name] for name in _GEOMETRY},
    )
    request = 0
    with TraceWriter(out, meta) as writer:
        for path, doc in progress(zip(files, docs, strict=True), "granite-json", len(files)):
            for name, prompt in doc["prompts"].items():
                experts, phase = _prompt_rows(path, name, prompt, doc, meta.num_experts)
                tokens, layers, k = experts.shape
                writer.append(
                    request,
                    np.repeat(np.arange(tokens), layers),
                    np.tile(np.arange(layers), tokens),
                    experts.reshape(-1, k),
                    phase=np.repeat(phase, layers),
                )
                request += 1
