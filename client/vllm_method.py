"""`ExpertdMoEMethod`: vLLM's unquantized MoE method with its expert weights leased from expertd.

Imported only by `expertd.client.vllm_plugin.register` when the plugin is on (it imports
vLLM). The contract and the switch are described there.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor, nn
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

from expertd.client.chunks import ChunkLeases
from expertd.client.hf_layers import acquire_order
from expertd.client.vllm_plugin import (
    ENV_HINT,
    ENV_TIER,
    StoreLayer,
    VllmLayoutError,
    acquire_sizes,
    chunks_of,
    gather,
    hint_scores,
    process_client,
    renumber,
    store_layer,
)

log = logging.getLogger("expertd.vllm")


def _drop_checkpoint_weight(param: Tensor, loaded_weight: Tensor, *args: Any, **kwargs: Any) -> bool | None:
    """The checkpoint's expert weight is not kept: the daemon serves the store's."""
    return True if kwargs.get("return_success") else None


class _KernelWeights(nn.Module):
    """What the experts kernel's ``process_weights_after_loading`` prepares: one pass's experts."""

    def __init__(self, w13: Tensor, w2: Tensor) -> None:
        super().__init__()
        self.w13_weight = nn.Parameter(w13, requires_grad=False)
        self.w2_weight = nn.Parameter(w2, requires_grad=False)


class ExpertdMoEMethod(UnquantizedFusedMoEMethod):
    """Weights from expertd leases; routing, kernels and everything else are vLLM's."""

    def __init__(self, moe: Any) -> None:
        super().__init__(moe)
        parallel = moe.moe_parallel_config
        if parallel.use_ep or parallel.dp_size > 1:
            raise VllmLayoutError(
                f"expertd's vLLM plugin serves whole or tensor-parallel experts: data parallel "
                f"{parallel.dp_size}, expert parallel {parallel.use_ep} are not supported yet "
                "(docs/scale-out.md)"
            )
        self.tp_rank, self.tp_size = parallel.tp_rank, parallel.tp_size
        if moe.has_bias or not moe.is_act_and_mul:
            raise VllmLayoutError(
                f"expertd serves gated experts without bias; this layer has bias={moe.has_bias}, "
                f"gated={moe.is_act_and_mul}"
            )
        self.store: StoreLayer | None = None
        self.hint = os.environ.get(ENV_HINT, "1") != "0"
        self.acquires = 0
        self.chunked = 0
        self.hints = 0

    def create_weights(
        self,
        layer: Any,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        """Zero experts in vLLM (shapes kept for the kernel's checks); the checkpoint's are dropped."""
        extra_weight_attrs["weight_loader"] = _drop_checkpoint_weight
        super().create_weights(
            layer, 0, hidden_size, intermediate_size_per_partition, params_dtype, **extra_weight_attrs
        )
        self.num_experts = num_experts
        rows = intermediate_size_per_partition  # this rank's share of each expert's FFN rows
        self.part = slice(self.tp_rank * rows, (self.tp_rank + 1) * rows)
        self.gate_up_shape = (2 * rows * self.tp_size, hidden_size)  # the whole expert, as stored
        self.dtype = params_dtype

    def process_weights_after_loading(self, layer: Any) -> None:
        super().process_weights_after_loading(layer)  # builds vLLM's kernel (on zero experts)
        client = process_client(self.tp_rank)
        if client.num_experts != self.num_experts:
            raise VllmLayoutError(
                f"{layer.layer_name}: vLLM's layer has {self.num_experts} experts; the daemon serves "
                f"{client.model!r} with {client.num_experts}"
            )
        shapes = {"gate_up": self.gate_up_shape, "dtype": self.dtype}
        self.store = store_layer(client, layer.layer_name, shapes)
        self.tier = os.environ.get(ENV_TIER) or client.default_tier
        if self.tier not in client.info["tiers"]:
            raise VllmLayoutError(
                f"{ENV_TIER}={self.tier!r}: the daemon has tiers {list(client.info['tiers'])}"
            )
        self.limit, self.chunk = acquire_sizes(client, self.tier)
        log.info("%s: experts from expertd layer %d (%s tier)", layer.layer_name, self.store.index, self.tier)

    # --- one pass -------------------------------------------------------------------------------

    def apply(
        self,
        layer: Any,
        x: Tensor,
        topk_weights: Tensor,
        topk_ids: Tensor,
        shared_experts: Any,
        shared_experts_input: Tensor | None,
    ) -> Tensor:
        assert self.store is not None and self.moe_kernel is not None, "weights were not processed"
        client = process_client(self.tp_rank)
        order = acquire_order(topk_ids, topk_weights)  # [T, k] -> experts, as expertd.client.hf asks
        if not order:  # a pass with no tokens (an idle rank's dummy batch)
            return torch.zeros_like(x)
        chunks = chunks_of(order, self.limit, self.chunk)
        leases = ChunkLeases(client, self.store.index, chunks, self.tier, limit=self.limit)
        if self.hint:
            self._hint_next(layer, x)  # while the first lease travels
        self.chunked += len(chunks) > 1
        out: Tensor | None = None
        try:
            for index, chunk in enumerate(chunks):
                experts = sorted(chunk)  # the kernel meets them in expert-id order, as it would
                lease = leases.take(index)
                w13, w2 = gather(lease, experts, self.store.names, self.part)  # a host tier: copied over
                kernel = _KernelWeights(w13.to(x.device), w2.to(x.device))
                self.moe_kernel.fused_experts.process_weights_after_loading(kernel)
                ids, weights = renumber(topk_ids, topk_weights, experts, self.num_experts)
                part = self.moe_kernel.apply(
                    hidden_states=x,
                    w1=kernel.w13_weight,
                    w2=kernel.w2_weight,
                    topk_weights=weights,
                    topk_ids=ids,
                    activation=layer.activation,
                    apply_router_weight_on_input=layer.apply_router_weight_on_input,
                    global_num_experts=len(experts),
                    expert_map=None,
                    shared_experts=shared_experts if index == 0 else None,
                    shared_experts_input=shared_experts_input if index == 0 else None,
                )
                if not isinstance(part, Tensor):
                    raise VllmLayoutError(f"vLLM's kernel returned {type(part).__name__}; expected a tensor")
                out = part if out is None else out + part
        finally:
            self.acquires += leases.acquires
            leases.close()
        assert out is not None
        return out

    def _hint_next(self, layer: Any, x: Tensor) -> None:
        """Hint the next MoE layer's experts as its gate ranks them for this layer's input."""
        assert self.store is not None
        client = process_client(self.tp_rank)
        stored = client.info.get("checkpoint_layers") or list(range(client.num_layers))
        if self.store.index + 1 >= len(stored) or not is_forward_context_available():
            return
        name = layer.layer_name.replace(
            f"layers.{self.store.decoder_layer}.", f"layers.{stored[self.store.index + 1]}.", 1
        )
        runner = get_forward_context().no_compile_layers.get(name)
        gate = getattr(runner, "gate", None)
        if gate is None:
            return  # this model computes its router logits outside the MoE runner (Mixtral)
        with torch.no_grad():
            logits = gate(x)
            logits = logits[0] if isinstance(logits, tuple) else logits  # [T, E]
            experts, scores = hint_scores(logits, layer.top_k)
        client.hint(self.store.index + 1, experts, scores)
        self.hints += 1
