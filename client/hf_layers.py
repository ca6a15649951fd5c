"""Where a transformers MoE model keeps its routed experts, and what one forward pass looks like.

Shared by `expertd.client.hf` (offload) and `expertd.traces.record` (the routing recorder).
Supported: the layout of transformers >= 5, where every sparse MoE block has a router child
(``gate`` or ``router``) and an experts child holding the experts' stacked parameters, as
`expertd.daemon.protocol.families` lists them per family: ``gate_up_proj [E, 2F, D]`` and
``down_proj [E, D, F]`` for most, transposed and with biases for GPT-OSS, transposed for
Llama-4, ``mlp.w1/v1/w2 [E * F, D]`` for DBRX. What a router returns is the family's too
(`MoELayer.routing`). Older per-expert ``nn.Linear`` modules are recognised and refused by name.

Shape legend: T tokens of a forward pass (batch rows times positions), D hidden size,
F expert FFN size, E routed experts per layer, k experts per token.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import Tensor, nn

from expertd.daemon.protocol.families import FAMILY_OF, NAMING_WEIGHTS

ROUTER_NAMES = ("gate", "router")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)(?:\.|$)")
#: The expert parameter sets of the families, the largest first (GPT-OSS's holds the plain one).
PARAM_SETS = sorted({tuple(sorted(w)) for w in NAMING_WEIGHTS.values()}, key=len, reverse=True)


class ModelLayoutError(ValueError):
    """The model's MoE blocks are not in a layout expertd can offload; the message names what was found."""


@dataclasses.dataclass
class MoELayer:
    """One sparse MoE block: store layer ``index`` is the model's decoder layer ``decoder_layer``."""

    index: int  # MoE layer index: the store's and the trace's layer
    decoder_layer: int  # its decoder layer id (the checkpoint's layer number)
    path: str  # e.g. "model.layers.3.mlp"
    block: nn.Module
    router: Any  # transformers modules: their attributes are dynamic
    experts: Any
    params: tuple[str, ...] = ("down_proj", "gate_up_proj")  # the experts' parameters (dotted names)
    router_output: str = "logits, weights, experts"  # what the router returns (the family's)

    @property
    def num_experts(self) -> int:
        return int(self.experts.num_experts)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights (kept by the stand-in once offloaded)."""
        known = getattr(self.experts, "expert_bytes", None)
        if known is not None:
            return int(known)
        return sum(self.experts.get_parameter(p).nbytes for p in self.params) // self.num_experts

    def routing(self, output: Any) -> tuple[Tensor, Tensor]:
        """(experts [T, k], weights [T, k]) of the router's ``output``, as the block computes them."""
        if self.router_output == "logits" and isinstance(output, Tensor):  # DBRX: the block picks
            weights, experts = self.block.route_tokens_to_experts(output)
            return experts, weights
        if self.router_output == "scores, logits" and isinstance(output, tuple) and len(output) == 2:
            values, experts = torch.topk(output[1], int(self.router.top_k), dim=1)  # Llama-4's own pick
            return experts, torch.sigmoid(values.float())
        if isinstance(output, tuple) and len(output) == 3:
            return output[2], output[1]
        raise ModelLayoutError(
            f"router of MoE layer {self.index} ({type(self.router).__name__}) returned "
            f"{type(output).__name__}; expected {self.router_output}"
        )


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return str(transformers.__version__)


def expert_params(module: nn.Module) -> tuple[str, ...] | None:
    """The stacked expert parameters ``module`` holds (a `PARAM_SETS` entry), or None."""
    names = {name: p for name, p in module.named_parameters()}
    for params in PARAM_SETS:
        if set(params) <= set(names):
            stacked = names[params[0]].dim() == 3 or "." in params[0]  # DBRX's [E * F, D] rows
            return params if stacked else None
    return None


def find_moe_layers(model: nn.Module, *, offloaded_ok: bool = False) -> list[MoELayer]:
    """Every sparse MoE block of ``model``, in layer order; `ModelLayoutError` if none is usable.

    ``offloaded_ok``: blocks whose experts `expertd.client.hf.offload` replaced count too (the
    recorder only needs the routers); otherwise an offloaded model is refused.
    """
    family = FAMILY_OF.get(str(getattr(getattr(model, "config", None), "model_type", None)))
    router_output = family.router if family is not None else "logits, weights, experts"
    found: list[MoELayer] = []
    per_expert: list[str] = []
    offloaded: list[str] = []
    for path, block in model.named_modules():
        experts = block._modules.get("experts")
        if experts is None:
            continue
        if getattr(experts, "expertd_offloaded", False):
            offloaded.append(path)
            if not offloaded_ok:
                continue
        elif isinstance(experts, nn.ModuleList):
            first = type(experts[0]).__name__ if len(experts) else "nothing"
            per_expert.append(f"{path}.experts (ModuleList of {len(experts)} {first})")
            continue
        elif expert_params(experts) is None:
            continue
        router_name = next((n for n in ROUTER_NAMES if isinstance(block._modules.get(n), nn.Module)), None)
        if router_name is None:
            raise ModelLayoutError(
                f"{path} has fused experts but no router child named {' or '.join(ROUTER_NAMES)} "
                f"(children: {', '.join(block._modules)})"
            )
        match = _LAYER_INDEX.search(path)
        if match is None:
            raise ModelLayoutError(f"{path}: cannot tell its decoder layer (no 'layers.N' in the path)")
        params = getattr(experts, "expert_params", None) or expert_params(experts)
        router = block._modules[router_name]
        found.append(MoELayer(len(found), int(match[1]), path, block, router, experts, params, router_output))
    if offloaded and not offloaded_ok:
        raise ModelLayoutError(f"{type(model).__name__} is already offloaded ({offloaded[0]}, ...)")
    if not found:
        if per_expert:
            raise ModelLayoutError(
                f"{type(model).__name__} keeps its experts as per-expert modules ({per_expert[0]}): the "
                f"layout of transformers < 5. expertd offloads the fused experts of transformers >= 5 "
                f"(installed: {transformers_version()})"
            )
        raise ModelLayoutError(
            f"no sparse MoE block in {type(model).__name__}: expected modules with an `experts` child "
            f"holding {' or '.join('/'.join(p) for p in PARAM_SETS)} parameters beside a router "
            f"({' or '.join(ROUTER_NAMES)})"
        )
    decoder_layers = [layer.decoder_layer for layer in found]
    if decoder_layers != sorted(set(decoder_layers)):
        raise ModelLayoutError(f"MoE blocks are not one per decoder layer in order: {decoder_layers}")
    shapes = {tuple(tuple(x.experts.get_parameter(p).shape) for p in x.params) for x in found
              if not offloaded}  # fmt: skip
    if len(shapes) > 1:
        raise ModelLayoutError(f"MoE layers have different expert shapes: {sorted(shapes)}")
    return found


def decoder_model(model: nn.Module, layers: list[MoELayer]) -> nn.Module:
    """The module that runs the decoder layers (``model.model`` for a ...ForCausalLM): one call per pass."""
    prefix = layers[0].path[: _LAYER_INDEX.search(layers[0].path).start()]  # type: ignore[union-attr]
    return model.get_submodule(prefix) if prefix else model


@dataclasses.dataclass
class ForwardPass:
    """What the decoder model was called with: ``batch`` rows of ``tokens`` new positions each."""

    batch: int
    tokens: int
    past: int  # positions already in the cache (0: a new generation starts)
    mask: Tensor | None  # bool [batch, tokens]: real tokens (False: padding), None: all real

    @property
    def new_generation(self) -> bool:
        return self.past == 0

    @property
    def is_prefill(self) -> bool:
        return self.tokens > 1 or self.past == 0


def forward_pass(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ForwardPass:
    """Read a decoder model call's inputs (from a ``with_kwargs`` forward pre-hook)."""
    inputs = kwargs.get("input_ids")
    if inputs is None and args:
        inputs = args[0]
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if not isinstance(inputs, Tensor) or inputs.dim() < 2:
        raise ModelLayoutError("the decoder model was called without input_ids or inputs_embeds [batch, seq]")
    batch, tokens = int(inputs.shape[0]), int(inputs.shape[1])
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = 0
    if cache is not None and hasattr(cache, "get_seq_length"):
        past = int(cache.get_seq_length())
    mask = kwargs.get("attention_mask")
    real = None
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] >= tokens:
        real = mask[:, -tokens:].to(torch.bool).cpu()  # [batch, tokens]
    return ForwardPass(batch, tokens, past, real)


def rank_routing(experts: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Each token's experts highest weight first: (experts [T, k], weights [T, k] float32), on the CPU."""
    experts = experts.reshape(-1, experts.shape[-1]).cpu()
    weights = weights.reshape(experts.shape).detach().float().cpu()
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)  # [T, k]
    return torch.gather(experts, -1, order), torch.gather(weights, -1, order)


def routed_tokens(experts: Tensor, num_experts: int) -> dict[int, int]:
    """Expert id -> how many of this pass's tokens it is routed to."""
    counts = torch.bincount(experts.reshape(-1).long().cpu(), minlength=num_experts)  # [E]
    return {e: int(n) for e, n in enumerate(counts.tolist()) if n}


def acquire_order(experts: Tensor, weights: Tensor) -> list[int]:
    """The experts a forward pass needs, in the order acquires name them: token by token, each
    token's highest weight first, first occurrence only. One token: exactly its trace row."""
    ranked, _ = rank_routing(experts, weights)
    return list(dict.fromkeys(ranked.reshape(-1).tolist()))
