"""Match a transformers model's experts to a daemon's store before offloading: `slot_layout`.

The model's family (its config) gives the `ExpertLayout` it computes with, from the same table
`expertd pack --from-hf` checked the checkpoint against (`expertd.daemon.protocol.families`); the
experts class's own flags must say the same (a transformers release that changed a class is
refused by name, not run wrongly). The store's manifest records the layout it was packed
with; a store packed before layouts were recorded is read as plain SwiGLU named by its
tensors. Any difference -- family, transposition, biases, gate/up order, shapes, dtype -- is a
`ModelLayoutError` naming it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from expertd.client.hf_experts import SlotLayout, SlotWeight
from expertd.client.hf_layers import ModelLayoutError, MoELayer, transformers_version
from expertd.client.views import torch_dtype
from expertd.daemon.protocol.families import (
    FAMILY_OF,
    NAMING_WEIGHTS,
    ExpertLayout,
    FamilyError,
    check_config,
)

#: Layout fields the model and the store must agree on (the rest is description).
COMPARED = ("family", "transposed", "bias", "gate_up", "experts_call")


def model_layout(model: nn.Module, layers: list[MoELayer]) -> ExpertLayout:
    """The layout ``model``'s experts compute with; `ModelLayoutError` if its class says otherwise."""
    model_config: Any = getattr(model, "config", None)
    config: dict[str, Any] = model_config.to_dict() if model_config is not None else {}
    kind = str(config.get("model_type"))
    if kind in FAMILY_OF:
        try:
            experts = check_config(config)
        except FamilyError as exc:
            raise ModelLayoutError(str(exc)) from None
        decoder_layers = [x.decoder_layer for x in layers]
        if experts.layers != decoder_layers:
            raise ModelLayoutError(
                f"{kind}: its config makes decoder layers {experts.layers} sparse; the model's MoE "
                f"blocks are in {decoder_layers}"
            )
        layout, title = experts.layout, experts.family.title
    else:  # a family not in the table: only the plain layout, as the experts class must confirm
        layout, title = ExpertLayout(family=kind, weights=NAMING_WEIGHTS["llama4"]), f"plain ({kind})"
    want = {
        "has_gate": True,
        "has_bias": layout.bias,
        "is_transposed": layout.transposed,
        "is_concatenated": layout.gate_up != "interleaved",
        "has_post_expert_norm": False,
        "_is_expert_parallel": False,
    }
    for layer in layers:
        flags = {name: getattr(layer.experts, name, value) for name, value in want.items()}  # DBRX, Llama-4:
        differ = [f"{n}={flags[n]} (expected {v})" for n, v in want.items() if flags[n] != v]  # no flags
        if differ or set(layer.params) != set(layout.weights):
            raise ModelLayoutError(
                f"{layer.path}.experts ({type(layer.experts).__name__}) is not the {title} expert layout "
                f"expertd knows: {', '.join(differ) or f'parameters {sorted(layer.params)}'} "
                f"(transformers {transformers_version()})"
            )
    return layout


def _legacy_layout(tensors: set[str], expected: ExpertLayout) -> ExpertLayout:
    """A store packed before layouts were recorded: plain SwiGLU, named by its tensors."""
    for naming in ("mixtral", "experts", "llama4"):  # split w1/w3/w2, split gate/up/down, fused
        weights = NAMING_WEIGHTS[naming]
        if {n for parts in weights.values() for n in parts} == tensors:
            return ExpertLayout(family=expected.family, weights=weights)
    known = " or ".join("/".join(NAMING_WEIGHTS[n]["gate_up_proj"] + NAMING_WEIGHTS[n]["down_proj"])
                        for n in ("mixtral", "experts", "llama4"))  # fmt: skip
    raise ModelLayoutError(
        f"the daemon's experts hold {sorted(tensors)}, in a store packed before expertd recorded expert "
        f"layouts, read as plain SwiGLU ({known}): repack it with `expertd pack --from-hf`"
    )


def slot_layout(client: Any, layers: list[MoELayer], expected: ExpertLayout) -> SlotLayout:
    """Where each of the model's expert parameters lies in the daemon's slots, after checking that
    the store's layout, shapes and dtypes are the model's; `ModelLayoutError` naming what differs."""
    tensors = {t.name: t for t in client.layout}
    recorded = client.info.get("expert_layout")
    if recorded is None:
        store = _legacy_layout(set(tensors), expected)
        origin = "the store (packed before expertd recorded expert layouts: plain SwiGLU)"
    else:
        try:
            store = ExpertLayout.from_json(recorded)
        except ValueError as exc:
            raise ModelLayoutError(f"the daemon's expert layout is malformed: {exc}") from None
        origin = "the store"
    mine, theirs = expected.to_json(), store.to_json()
    differ = [f"{k} {theirs[k]!r}, the model's {mine[k]!r}" for k in COMPARED if mine[k] != theirs[k]]
    if differ or set(store.weights) != set(expected.weights):
        differ = differ or [f"parameters {sorted(store.weights)}, the model's {sorted(expected.weights)}"]
        raise ModelLayoutError(f"{origin} has {'; '.join(differ)}: repack it with `expertd pack --from-hf`")
    experts = layers[0].experts
    num_experts = layers[0].num_experts
    out = []
    for name in expected.weights:
        param = experts.get_parameter(name)
        lead = param.shape[0]
        shape = tuple(param.shape[1:]) if lead == num_experts else (lead // num_experts, *param.shape[1:])
        parts = [tensors[n] for n in store.weights[name]]
        rest = {tuple(t.shape[1:]) for t in parts}
        stored = (sum(t.shape[0] for t in parts), *next(iter(rest))) if len(rest) == 1 else ()
        if stored != shape or any(torch_dtype(t.dtype) != param.dtype for t in parts):
            got = ", ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in parts)
            raise ModelLayoutError(
                f"the daemon's {got}; the model's {name} is {list(shape)} {param.dtype} per expert "
                f"(another model, or packed in another dtype?)"
            )
        out.append(SlotWeight(name, param.dtype, shape, tuple((t.offset, tuple(t.shape)) for t in parts)))
    return tuple(out)
