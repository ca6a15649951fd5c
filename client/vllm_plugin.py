"""vLLM plugin: a MoE model's routed experts served by expertd, behind vLLM's ``quant_method``.

    pip install 'expertd[vllm]'            # registers `register` under vllm.general_plugins
    EXPERTD_VLLM=1 vllm serve MODEL_DIR     # 1: the default address; or ipc://... / tcp://...
    EXPERTD_VLLM='ipc:///run/expertd/gpu{rank}.sock' vllm serve MODEL_DIR -tp 2   # a daemon per rank

With ``EXPERTD_VLLM`` unset (or empty, or 0) `register` does nothing and vLLM is untouched.
Set, it registers `ExpertdMoEMethod` as vLLM's out-of-tree replacement for
``UnquantizedFusedMoEMethod`` (``CustomOp.register_oot``, vLLM's own mechanism for plugins), in
every vLLM process. That method is a small weight provider, not a second forward path:

- ``create_weights`` registers the layer's ``w13_weight``/``w2_weight`` with zero experts and a
  weight loader that drops what the checkpoint holds for them: the experts never live in vLLM;
- ``apply(layer, x, topk_weights, topk_ids)`` leases the experts vLLM's own router chose from
  the daemon, gathers them as a compact ``[n, 2F, D]`` / ``[D, F]`` stack in ascending expert
  id (so the kernel meets them in the order it would have), lets vLLM's experts kernel prepare
  that stack exactly as it prepares a loaded layer (``process_weights_after_loading``: on CPU,
  its prepacking), and calls vLLM's own kernel with the ids renumbered 0..n-1;
- a pass that routes to more experts of a layer than the tier holds leases them in chunks of
  half the tier (as `expertd.client.hf` does), the next chunk asked for while one computes,
  each chunk's pairs computed by the kernel and the chunk outputs summed (equal up to the
  order of that sum, not bit for bit);
- where vLLM's MoE runner keeps the next layer's gate (Qwen3-MoE, DeepSeek-V2/V3 in 0.32),
  that gate applied to this layer's input is sent as a hint for the next layer while the
  lease travels (``EXPERTD_VLLM_HINT=0`` turns it off).

Unquantized gated experts only (SwiGLU/GELU without bias). Tensor parallelism: each rank
leases whole experts from its daemon and takes its share of the FFN rows; expert and data
parallelism are refused by name (docs/scale-out.md).

Shape legend: T tokens of a pass, D hidden size, F expert FFN size, E routed experts, n leased.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading

import torch
from torch import Tensor

from expertd.client.client import ExpertClient, Lease
from expertd.client.views import torch_dtype
from expertd.daemon.protocol import MAX_EXPERTS_PER_MESSAGE
from expertd.daemon.protocol.families import ExpertLayout

ENV_ADDRESS = "EXPERTD_VLLM"  # 1: the default address; an ipc:// or tcp:// address; unset/0: off
ENV_TIER = "EXPERTD_VLLM_TIER"  # where leases are taken (default: the daemon's default tier)
ENV_HINT = "EXPERTD_VLLM_HINT"  # 0: no hints for the next layer
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


#: (gate, up, down) tensor names of a plain SwiGLU store expert, per checkpoint naming; or (gate_up, down).
SPLIT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
FUSED_NAMES = ("gate_up_proj", "down_proj")


class VllmLayoutError(ValueError):
    """The vLLM model and the daemon's store do not match; the message says how."""


def enabled_address(environ: dict[str, str] | None = None) -> str | None:
    """The daemon address ``EXPERTD_VLLM`` asks for (None: the plugin is off; "": the default)."""
    value = (os.environ if environ is None else environ).get(ENV_ADDRESS, "").strip()
    if value in ("", "0"):
        return None
    if value == "1":
        return ""
    if not value.startswith(("ipc://", "tcp://")):
        raise ValueError(f"{ENV_ADDRESS}={value!r}: expected 1, 0, or an ipc:// or tcp:// address")
    return value


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point: called in every vLLM process, maybe twice."""
    if enabled_address() is None:
        return
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot

    from expertd.client.vllm_method import ExpertdMoEMethod

    if op_registry_oot.get("UnquantizedFusedMoEMethod") is not ExpertdMoEMethod:
        CustomOp.register_oot(ExpertdMoEMethod, name="UnquantizedFusedMoEMethod")


# --- one connection per process, shared by every layer ------------------------------------------

_client_lock = threading.Lock()
_client: ExpertClient | None = None


def process_client(rank: int = 0) -> ExpertClient:
    """This process's connection to the daemon ``EXPERTD_VLLM`` names (made on first use); a
    ``{rank}`` in the address is this tensor-parallel rank: one daemon per rank."""
    global _client
    with _client_lock:
        if _client is None or _client.closed:
            address = (enabled_address() or "").replace("{rank}", str(rank))
            _client = ExpertClient(address or None, name=f"vllm-rank{rank}-{os.getpid()}")
        return _client


# --- the daemon's experts as the kernel wants them --------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoreLayer:
    """Where a vLLM MoE layer's experts are in the store, and how they are named there."""

    index: int  # the store's (and the trace's) MoE layer
    decoder_layer: int
    names: tuple[str, ...]  # SPLIT_NAMES or FUSED_NAMES entry the store uses


def store_layer(client: ExpertClient, layer_name: str, shapes: dict[str, tuple[int, ...]]) -> StoreLayer:
    """Check vLLM layer ``layer_name`` against the daemon's store; `VllmLayoutError` naming the gap.

    ``shapes``: the layer's ``gate_up`` [2F, D] and ``down`` [D, F] shapes and its ``dtype``.
    """
    match = _LAYER.search(layer_name)
    if match is None:
        raise VllmLayoutError(f"{layer_name}: cannot tell its decoder layer (no 'layers.N.' in the name)")
    decoder_layer = int(match[1])
    stored = client.info.get("checkpoint_layers")
    layers = list(stored) if stored is not None else list(range(client.num_layers))
    if decoder_layer not in layers:
        raise VllmLayoutError(
            f"{layer_name}: decoder layer {decoder_layer} is not in the daemon's store of {client.model!r} "
            f"(its MoE layers are decoder layers {layers})"
        )
    recorded = client.info.get("expert_layout")
    if recorded is not None:
        layout = ExpertLayout.from_json(recorded)
        if (
            layout.transposed
            or layout.bias
            or layout.gate_up != "concatenated"
            or layout.experts_call != "routed"
        ):
            raise VllmLayoutError(
                f"the daemon's store holds {layout.family} experts (transposed {layout.transposed}, bias "
                f"{layout.bias}, gate/up {layout.gate_up}); the vLLM plugin serves plain SwiGLU experts only"
            )
    tensors = {t.name: t for t in client.layout}
    names = next((n for n in (*SPLIT_NAMES, FUSED_NAMES) if set(n) == set(tensors)), None)
    if names is None:
        raise VllmLayoutError(f"the daemon's experts hold {sorted(tensors)}; expected w1/w3/w2 or alike")
    two_f, hidden = shapes["gate_up"]
    want = {"gate_up_proj": (two_f, hidden), "down_proj": (hidden, two_f // 2), "w2": (hidden, two_f // 2)}
    for name in names:
        spec = tensors[name]
        expected = want.get(name, (two_f // 2, hidden))
        if tuple(spec.shape) != expected or torch_dtype(spec.dtype) != shapes["dtype"]:
            raise VllmLayoutError(
                f"{layer_name}: the daemon's {name} is {list(spec.shape)} {spec.dtype}; vLLM's layer wants "
                f"{list(expected)} {shapes['dtype']} (another model, or packed in another dtype?)"
            )
    return StoreLayer(layers.index(decoder_layer), decoder_layer, names)


def gather(lease: Lease, experts: list[int], names: tuple[str, ...], part: slice) -> tuple[Tensor, Tensor]:
    """``experts`` (in this order) from ``lease`` as a fresh (w13 [n, 2f, D], w2 [n, D, f]) stack,
    f the FFN rows ``part`` of each expert (all of them, or this tensor-parallel rank's share)."""
    w13, w2 = [], []
    for expert in experts:
        tensors = lease[expert]
        if len(names) == 2:  # a fused gate_up [2F, D]
            gate, up = tensors[names[0]].chunk(2)
        else:
            gate, up = tensors[names[0]], tensors[names[1]]
        w13.append(torch.cat([gate[part], up[part]]))  # [2f, D]
        w2.append(tensors[names[-1]][:, part])  # [D, f]
    return torch.stack(w13), torch.stack(w2)


def chunks_of(order: list[int], limit: int, chunk: int) -> list[list[int]]:
    """The experts a pass needs as acquires: one in ``order`` if it fits ``limit``, else ascending
    chunks of ``chunk``."""
    if len(order) <= limit:
        return [order]
    ranked = sorted(order)
    return [ranked[i : i + chunk] for i in range(0, len(ranked), chunk)]


def acquire_sizes(client: ExpertClient, tier: str) -> tuple[int, int]:
    """(most experts one acquire may name, chunk size) for ``tier``: what one client may pin of it
    (the hello's ``max_pinned``; all its slots from a daemon that states none), and half."""
    handle = client.info["tiers"][tier]
    slots = int(handle.get("max_pinned", handle["slots"]))
    return min(slots, MAX_EXPERTS_PER_MESSAGE), max(1, min(slots // 2, MAX_EXPERTS_PER_MESSAGE))


def hint_scores(logits: Tensor, top_k: int) -> tuple[list[int], list[float]]:
    """A gate's guess for a layer: experts by summed softmax weight of their top-k picks."""
    weights = torch.softmax(logits.float(), dim=-1)  # [T, E]
    top_w, top_e = torch.topk(weights, top_k, dim=-1)  # [T, k]
    score = torch.zeros(weights.shape[-1], dtype=torch.float32)
    score.index_add_(0, top_e.reshape(-1).cpu(), top_w.reshape(-1).cpu())
    order = torch.argsort(score, descending=True, stable=True)
    order = order[score[order] > 0]
    return order.tolist(), score[order].tolist()


def renumber(ids: Tensor, weights: Tensor, experts: list[int], num_experts: int) -> tuple[Tensor, Tensor]:
    """``ids`` [T, k] as indexes into ``experts``; pairs routed elsewhere get weight 0 (and index 0)."""
    remap = torch.full((num_experts,), -1, dtype=torch.long)
    remap[torch.tensor(experts, dtype=torch.long)] = torch.arange(len(experts))
    local = remap.to(ids.device)[ids.long()]  # [T, k]
    here = local >= 0
    if bool(here.all()):
        return local.to(ids.dtype), weights
    return local.clamp_min(0).to(ids.dtype), torch.where(here, weights, torch.zeros_like(weights))
