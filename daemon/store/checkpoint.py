"""Find the routed experts in a Hugging Face safetensors checkpoint and read them one by one.

Supported namings (``{p}`` is any prefix such as ``model.`` or ``language_model.model.``):

- ``mixtral``: ``{p}layers.{l}.block_sparse_moe.experts.{e}.w1|w2|w3.weight``
- ``experts`` (Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V2/V3):
  ``{p}layers.{l}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`` (plus any other
  tensor under the expert, such as FP8 ``weight_scale_inv``)
- ``fused`` (Llama-4, GPT-OSS): ``{p}layers.{l}.feed_forward|mlp.experts.gate_up_proj``,
  ``...down_proj`` and friends, each with a leading expert dimension
- ``granite`` (Granite-MoE, Granite-4): ``{p}layers.{l}.block_sparse_moe.input_linear.weight``
  and ``output_linear.weight``, each with a leading expert dimension
- ``dbrx``: ``{p}blocks.{l}.ffn.experts.mlp.w1|v1|w2``, the experts' rows stacked as
  ``[E * F, D]`` (E from config.json's ``ffn_config.moe_num_experts``)

Shared experts (``shared_experts``, ``shared_expert``), routers and dense layers do not
match and are left to the client. Headers are read with ``safe_open`` (no tensor data);
`CheckpointPlan.fill_expert` reads one expert's tensors (a slice for fused tensors).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from expertd.daemon.store.manifest import CheckpointError, ModelExperts, layout_tensors

INDEX_NAME = "model.safetensors.index.json"

PER_EXPERT_RE = re.compile(
    r"^(?P<prefix>(?:.+\.)?)layers\.(?P<layer>\d+)\.(?P<block>block_sparse_moe|mlp|feed_forward)"
    r"\.experts\.(?P<expert>\d+)\.(?P<name>.+)$"
)
FUSED_RE = re.compile(
    r"^(?P<prefix>(?:.+\.)?)layers\.(?P<layer>\d+)\.(?P<block>mlp|feed_forward)"
    r"\.experts\.(?P<name>[A-Za-z_][^.]*)$"
)
GRANITE_RE = re.compile(
    r"^(?P<prefix>(?:.+\.)?)layers\.(?P<layer>\d+)\.(?P<block>block_sparse_moe)"
    r"\.(?P<name>input_linear|output_linear)\.weight$"
)
DBRX_RE = re.compile(
    r"^(?P<prefix>(?:.+\.)?)blocks\.(?P<layer>\d+)\.(?P<block>ffn)\.experts\.mlp\.(?P<name>w1|v1|w2)$"
)
#: Stacked namings: (regex, naming); every expert's tensor is one slice of a stacked tensor.
STACKED = ((FUSED_RE, "fused"), (GRANITE_RE, "granite"), (DBRX_RE, "dbrx"))
SUPPORTED = (
    "layers.{l}.block_sparse_moe.experts.{e}.w1.weight (Mixtral), "
    "layers.{l}.mlp.experts.{e}.gate_proj.weight (Qwen-MoE, OLMoE, DeepSeek), "
    "layers.{l}.feed_forward.experts.gate_up_proj (fused: Llama-4, GPT-OSS), "
    "layers.{l}.block_sparse_moe.input_linear.weight (Granite), blocks.{l}.ffn.experts.mlp.w1 (DBRX)"
)

# safetensors dtype codes -> torch dtype names (the store's dtype vocabulary)
SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "BOOL": "bool",
}
# Blob order: gate before up before down, whatever the naming.
_ORDER = (
    "w1",
    "gate_proj",
    "v1",
    "w3",
    "up_proj",
    "gate_up_proj",
    "input_linear",
    "w2",
    "down_proj",
    "output_linear",
)


@dataclass(frozen=True)
class _Found:
    name: str  # the checkpoint tensor name
    file: str
    dtype: str
    shape: tuple[int, ...]


def _blob_name(suffix: str) -> str:
    return suffix.removesuffix(".weight")


def _order_key(name: str) -> tuple[int, str]:
    base = name.split(".")[0].removesuffix("_bias").removesuffix("_blocks").removesuffix("_scales")
    return (_ORDER.index(base) if base in _ORDER else len(_ORDER), name)


@dataclass(frozen=True)
class CheckpointPlan(ModelExperts):
    """The experts of one checkpoint (naming: mixtral | experts | fused): where each blob tensor
    comes from, and the blob layout."""

    directory: Path
    skipped_layers: tuple[int, ...]
    # blob tensor name -> (checkpoint name template with {layer} and {expert}, rows): rows 0: a
    # tensor per expert; -1: a leading expert dimension; n > 0: expert e is rows [e*n, (e+1)*n)
    sources: dict[str, tuple[str, int]]
    files: dict[str, str]  # checkpoint tensor name -> shard file name
    top_k: int = 0  # config.json's num_experts_per_tok (0: not stated)
    _handles: dict[str, Any] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack)

    def source_name(self, layer_index: int, expert: int, blob_name: str) -> str:
        template, _ = self.sources[blob_name]
        return template.format(layer=self.checkpoint_layers[layer_index], expert=expert)

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = self._stack.enter_context(
                safe_open(str(self.directory / file), framework="pt")
            )
        return self._handles[file]

    def fill_expert(self, layer_index: int, expert: int, raw: np.ndarray) -> None:
        """Copy one expert's tensors into ``raw`` (uint8, the blob) at their layout offsets."""
        import torch

        for spec in self.tensors:
            name = self.source_name(layer_index, expert, spec.name)
            file = self.files[name]
            handle = self._handle(file)
            _, rows = self.sources[spec.name]
            if rows == 0:
                tensor = handle.get_tensor(name)
            elif rows < 0:
                tensor = handle.get_slice(name)[expert]
            else:
                tensor = handle.get_slice(name)[expert * rows : (expert + 1) * rows]
            if tuple(tensor.shape) != spec.shape or str(tensor.dtype) != f"torch.{spec.dtype}":
                raise CheckpointError(
                    f"{name} in {file}: read {list(tensor.shape)} {tensor.dtype}, "
                    f"expected {list(spec.shape)} {spec.dtype}"
                )
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            raw[spec.offset : spec.offset + spec.nbytes] = data

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None


def _list_tensors(directory: Path) -> dict[str, _Found]:
    """Every expert-looking tensor's header (name, file, dtype, shape), without its data."""
    from safetensors import safe_open

    index_path = directory / INDEX_NAME
    wanted: dict[str, list[str]] | None = None
    if index_path.exists():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: no weight_map of tensor name -> file")
        wanted = defaultdict(list)
        for name, file in weight_map.items():
            wanted[file].append(name)
        files = sorted(wanted)
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: no *.safetensors files and no {INDEX_NAME}")
    found: dict[str, _Found] = {}
    others: list[str] = []
    for file in files:
        path = directory / file
        if Path(file).name != file or not path.is_file():
            raise CheckpointError(f"{path}: shard listed in {INDEX_NAME} is missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = set(handle.keys())
                names = wanted[file] if wanted is not None else sorted(keys)
                for name in names:
                    if not (PER_EXPERT_RE.match(name) or _stacked_match(name)[0]):
                        others.append(name)
                        continue
                    if name not in keys:
                        raise CheckpointError(f"{name}: listed in {INDEX_NAME} but missing from {file}")
                    piece = handle.get_slice(name)
                    code = piece.get_dtype()
                    if code not in SAFETENSORS_DTYPES:
                        raise CheckpointError(f"{name} in {file}: unsupported dtype {code}")
                    shape = tuple(int(d) for d in piece.get_shape())
                    found[name] = _Found(name, file, SAFETENSORS_DTYPES[code], shape)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
    if not found:
        hint = [n for n in others if "expert" in n][:8] or others[:8]
        raise CheckpointError(
            f"{directory}: no routed expert tensors found among {len(others)} tensors "
            f"(e.g. {', '.join(hint) or 'none'}); supported names: {SUPPORTED}"
        )
    return found


def _stacked_match(name: str) -> tuple[re.Match[str] | None, str]:
    for regex, naming in STACKED:
        match = regex.match(name)
        if match:
            return match, naming
    return None, ""


def scan_checkpoint(directory: str | Path) -> CheckpointPlan:
    """Detect the expert naming and layout; raises `CheckpointError` naming what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = _read_json(directory / "config.json") if (directory / "config.json").exists() else {}
    if not isinstance(config, dict):
        config = {}
    found = _list_tensors(directory)

    per_expert: dict[int, dict[int, dict[str, _Found]]] = defaultdict(lambda: defaultdict(dict))
    fused: dict[int, dict[str, _Found]] = defaultdict(dict)
    styles: set[tuple[str, str]] = set()  # (prefix, block)
    stacked_naming = "fused"
    for name, info in found.items():
        match = PER_EXPERT_RE.match(name)
        if match:
            per_expert[int(match["layer"])][int(match["expert"])][match["name"]] = info
        else:
            match, stacked_naming = _stacked_match(name)
            assert match is not None
            fused[int(match["layer"])][match["name"]] = info
        styles.add((match["prefix"], match["block"]))
    if per_expert and fused:
        raise CheckpointError(
            f"{directory}: both per-expert and fused expert tensors found (naming is ambiguous)"
        )
    if len(styles) > 1:
        raise CheckpointError(f"{directory}: expert tensors under several prefixes: {sorted(styles)}")
    prefix, block = styles.pop()

    num_hidden = config.get("num_hidden_layers")
    layers = sorted(per_expert or fused)
    skipped: tuple[int, ...] = ()
    if isinstance(num_hidden, int):  # e.g. DeepSeek-V3's multi-token-prediction layer
        skipped = tuple(x for x in layers if x >= num_hidden)
        layers = [x for x in layers if x < num_hidden]
    if not layers:
        raise CheckpointError(f"{directory}: expert tensors only in layers {list(skipped)}")

    if per_expert:
        naming = "mixtral" if block == "block_sparse_moe" else "experts"
        template = f"{prefix}layers.{{layer}}.{block}.experts.{{expert}}.{{suffix}}"
        num_experts = max(max(per_expert[x]) + 1 for x in layers)
        ref_layer = per_expert[layers[0]]
        if 0 not in ref_layer:
            missing = template.format(layer=layers[0], expert=0, suffix=next(iter(ref_layer[min(ref_layer)])))
            raise CheckpointError(f"{directory}: missing expert tensor {missing}")
        reference = ref_layer[0]
        suffixes = sorted({s for x in layers for e in per_expert[x].values() for s in e}, key=_order_key)
        for layer in layers:
            for expert in range(num_experts):
                have = per_expert[layer].get(expert, {})
                for suffix in suffixes:
                    name = template.format(layer=layer, expert=expert, suffix=suffix)
                    found_info = have.get(suffix)
                    ref = reference.get(suffix)
                    if found_info is None or ref is None:
                        raise CheckpointError(
                            f"{directory}: missing expert tensor {name} "
                            f"(layer {layer} has {len(per_expert[layer])} of {num_experts} experts)"
                        )
                    _check_like(found_info, ref)
        specs = [(_blob_name(s), reference[s].dtype, reference[s].shape) for s in suffixes]
        sources = {_blob_name(s): (template.replace("{suffix}", s), 0) for s in suffixes}
    else:
        naming = stacked_naming
        template = {
            "fused": f"{prefix}layers.{{layer}}.{block}.experts.{{name}}",
            "granite": f"{prefix}layers.{{layer}}.{block}.{{name}}.weight",
            "dbrx": f"{prefix}blocks.{{layer}}.{block}.experts.mlp.{{name}}",
        }[naming]
        names = sorted({n for x in layers for n in fused[x]}, key=_order_key)
        reference = fused[layers[0]]
        first = reference[names[0]] if names[0] in reference else next(iter(reference.values()))
        num_experts, rows = first.shape[0], -1
        if naming == "dbrx":  # [E * F, D]: only the config knows E
            num_experts = _dbrx_experts(directory, config)
            rows = first.shape[0] // num_experts
            if rows * num_experts != first.shape[0]:
                raise CheckpointError(
                    f"{first.name}: {first.shape[0]} rows are not {num_experts} experts "
                    f"(config.json ffn_config.moe_num_experts) of equal size"
                )
        for layer in layers:
            for n in names:
                stacked = fused[layer].get(n)
                name = template.format(layer=layer, name=n)
                if stacked is None or n not in reference:
                    raise CheckpointError(f"{directory}: missing expert tensor {name}")
                leading = num_experts if rows < 0 else num_experts * rows
                if len(stacked.shape) < 2 or stacked.shape[0] != leading:
                    raise CheckpointError(
                        f"{name} in {stacked.file}: shape {list(stacked.shape)}, expected a leading "
                        f"expert dimension of {leading} and at least 2 dimensions"
                    )
                _check_like(stacked, reference[n])
        each = (lambda shape: shape[1:]) if rows < 0 else (lambda shape: (rows, *shape[1:]))
        specs = [(n, reference[n].dtype, each(reference[n].shape)) for n in names]
        sources = {n: (template.replace("{name}", n), rows) for n in names}

    tensors, raw_bytes = layout_tensors(specs)
    name_or_path, model_type = config.get("_name_or_path"), config.get("model_type")
    model = name_or_path if isinstance(name_or_path, str) and name_or_path else directory.resolve().name
    architecture = model_type if isinstance(model_type, str) else naming
    return CheckpointPlan(
        directory=directory,
        model=model,
        architecture=architecture,
        naming=naming,
        num_experts=num_experts,
        checkpoint_layers=tuple(layers),
        tensors=tensors,
        raw_bytes=raw_bytes,
        skipped_layers=skipped,
        sources=sources,
        files={name: info.file for name, info in found.items()},
        top_k=_experts_per_token(config, num_experts),
    )


def _dbrx_experts(directory: Path, config: dict[str, Any]) -> int:
    ffn = config.get("ffn_config")
    count = ffn.get("moe_num_experts") if isinstance(ffn, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise CheckpointError(
            f"{directory}: DBRX stacks its experts' rows ([E * F, D]); config.json's "
            f"ffn_config.moe_num_experts must say E (found {count!r:.40})"
        )
    return count


def _experts_per_token(config: dict, num_experts: int) -> int:
    """config.json's ``num_experts_per_tok`` (or its text_config's), if it is a sane count."""
    text = config.get("text_config")
    nested = text.get("num_experts_per_tok") if isinstance(text, dict) else None
    ffn = config.get("ffn_config")  # DBRX
    nested = ffn.get("moe_top_k", nested) if isinstance(ffn, dict) else nested
    value = config.get("num_experts_per_tok", nested)
    return value if isinstance(value, int) and 0 < value <= num_experts else 0


def _check_like(info: _Found, ref: _Found) -> None:
    if info.shape != ref.shape or info.dtype != ref.dtype:
        raise CheckpointError(
            f"{info.name} in {info.file}: shape {list(info.shape)} {info.dtype}, expected "
            f"{list(ref.shape)} {ref.dtype} like {ref.name}"
        )
