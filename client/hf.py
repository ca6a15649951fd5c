"""Run a loaded transformers MoE model with its routed experts served by expertd: `offload`.

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16)
    client = ExpertClient()                  # a daemon serving `expertd pack --from-hf MODEL_DIR`
    offload(model, client)                   # the experts' weights leave this process
    model.generate(...)                      # the model's own router picks; expertd supplies

What changes: each MoE block's experts module is replaced by `OffloadedExperts`, and its
``gate_up_proj``/``down_proj`` parameters are dropped. The router, shared experts, attention
and everything else stay in the model, unchanged. In a forward pass, layer i's router hook
sends one acquire for the experts its tokens chose (`ExpertClient.acquire_async`, as soon as
the routing is known); with ``hint=True`` the next layer's router, applied to this layer's
input, names the experts to hint while the acquire is in flight. The experts module then
computes what the model's configured ``experts_implementation`` computes, on the daemon's
zero-copy views: eager runs the experts class's own loop, handed one view per expert in
expert-id order; grouped_mm and batched_mm see every slot of the tier as one stacked
``[S, 2F, D]`` view, with their steps mirrored so that each row keeps the place the model's
own sort gives it (the CPU kernels' results depend on it). Same kernels, same inputs, same
order: logits equal the unmodified model's bit for bit (tests/test_hf.py checks each class).

When one pass routes to more experts of a layer than the tier holds (a long prefill on a
small device tier), they are acquired in chunks of half the tier, in expert-id order, the next
chunk asked for while one computes; still bit for bit.

A store's layer i must be the model's MoE layer i: `offload` checks the store's
``checkpoint_layers`` against the model's MoE blocks, and the expert shapes and dtype.

Shape legend: T tokens, D hidden size, F expert FFN size, E routed experts, S tier slots, k top-k.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from expertd.client.chunks import ChunkLeases
from expertd.client.client import ExpertClient, Lease, PendingAcquire
from expertd.client.hf_layers import (
    ModelLayoutError,
    MoELayer,
    acquire_order,
    decoder_model,
    find_moe_layers,
    forward_pass,
    transformers_version,
)
from expertd.client.views import torch_dtype
from expertd.daemon.protocol import MAX_EXPERTS_PER_MESSAGE

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
#: (gate, up, down) tensor names of a store expert, per checkpoint naming; or (gate_up, down).
SPLIT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
FUSED_NAMES = ("gate_up_proj", "down_proj")

__all__ = ["ModelLayoutError", "Offload", "OffloadedExperts", "offload"]


@dataclasses.dataclass
class OffloadStats:
    """What the client saw: acquires, time blocked waiting for leases, hints sent."""

    acquires: int = 0
    chunked: int = 0  # forward passes of a layer split into several acquires
    wait_s: float = 0.0
    hints: int = 0
    generations: int = 0


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where gate_up [2F, D] and down [D, F] sit in a slot (byte offsets) and how to read them."""

    dtype: torch.dtype
    gate_up_shape: tuple[int, int]  # [2F, D]; down is [D, F]
    gate_up_offset: int | None  # None: gate and up are apart in the slot (no zero-copy fused view)
    gate_offset: int
    up_offset: int
    down_offset: int


def _store_layout(client: ExpertClient, gate_up: Tensor, down: Tensor) -> _Layout:
    """Match the daemon's expert layout to the model's stacked experts; `ModelLayoutError` if apart."""
    tensors = {t.name: t for t in client.layout}
    _, two_f, hidden = gate_up.shape
    ffn = two_f // 2
    want = {"gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn), "gate_up": (two_f, hidden)}
    names = next((n for n in (*SPLIT_NAMES, FUSED_NAMES) if set(n) == set(tensors)), None)
    if names is None:
        raise ModelLayoutError(
            f"the daemon's experts hold {sorted(tensors)}; expected "
            f"{' or '.join('/'.join(n) for n in (*SPLIT_NAMES, FUSED_NAMES))}"
        )
    roles = ("gate", "up", "down") if len(names) == 3 else ("gate_up", "down")
    for role, name in zip(roles, names, strict=True):
        t = tensors[name]
        if t.shape != want[role] or torch_dtype(t.dtype) != gate_up.dtype:
            raise ModelLayoutError(
                f"the daemon's {name} is {list(t.shape)} {t.dtype}; the model's {role} projection is "
                f"{list(want[role])} {gate_up.dtype} (another model, or packed in another dtype?)"
            )
    item = gate_up.element_size()
    if len(names) == 2:
        gate_up_offset = gate_offset = tensors[names[0]].offset
        up_offset = gate_offset + ffn * hidden * item
        down_name = names[1]
    else:
        gate_offset, up_offset = tensors[names[0]].offset, tensors[names[1]].offset
        adjacent = up_offset == gate_offset + ffn * hidden * item
        gate_up_offset = gate_offset if adjacent else None
        down_name = names[2]
    down_offset = tensors[down_name].offset
    return _Layout(gate_up.dtype, (two_f, hidden), gate_up_offset, gate_offset, up_offset, down_offset)


class _Slab:
    """One tier's slab seen as stacked weights: slot s's gate_up and down, all views, no copies."""

    def __init__(self, layout: _Layout, anchor: Tensor, num_slots: int, slot_bytes: int) -> None:
        item = layout.dtype.itemsize
        assert slot_bytes % item == 0, f"slot of {slot_bytes} bytes is not a multiple of {layout.dtype}"
        stride = slot_bytes // item
        two_f, hidden = layout.gate_up_shape
        ffn = two_f // 2

        def stacked(offset: int, rows: int, cols: int) -> Tensor:
            return anchor.as_strided((num_slots, rows, cols), (stride, cols, 1), offset // item)

        self.num_slots = num_slots
        self.down = stacked(layout.down_offset, hidden, ffn)  # [S, D, F]
        self.gate_up: Tensor | None = None
        if layout.gate_up_offset is not None:
            self.gate_up = stacked(layout.gate_up_offset, two_f, hidden)  # [S, 2F, D]
        self.gate = stacked(layout.gate_offset, ffn, hidden)  # [S, F, D]
        self.up = stacked(layout.up_offset, ffn, hidden)  # [S, F, D]

    def fused_gate_up(self) -> Tensor:
        """[S, 2F, D] gate_up of every slot (a view; see `compact` when gate and up are apart)."""
        assert self.gate_up is not None, "gate and up are apart in the slot: use compact()"
        return self.gate_up

    def gate_up_of(self, slot: int) -> Tensor:
        """Slot's fused [2F, D] gate_up."""
        return self.fused_gate_up()[slot]

    def compact(self, slot_of: dict[int, int]) -> tuple[_Slab, dict[int, int]]:
        """Gate and up apart in the slot (a store whose F x D is not 256-byte aligned): this
        lease's experts copied and fused as slots 0..n-1. Not zero-copy, but the same values."""
        slots = list(slot_of.values())
        out = object.__new__(_Slab)
        out.num_slots = len(slots)
        out.gate_up = torch.cat([self.gate[slots], self.up[slots]], dim=1)  # [n, 2F, D]
        out.gate, out.up = out.gate_up.chunk(2, dim=1)
        out.down = self.down[slots]  # [n, D, F]
        return out, {expert: i for i, expert in enumerate(slot_of)}


class _ChunkLeases:
    """A layer pass's `ChunkLeases`, each chunk seen as stacked slab views."""

    def __init__(
        self,
        runtime: Offload,
        layer: int,
        chunks: list[list[int]],
        first: PendingAcquire | None,
        device: torch.device,
    ) -> None:
        self.runtime, self.chunks, self.device = runtime, chunks, device
        self._leases = ChunkLeases(
            runtime.client, layer, chunks, runtime.tier, first=first, wait=runtime._wait
        )
        self._held: tuple[_Slab, dict[int, int]] | None = None

    def get(self, chunk: int) -> tuple[_Slab, dict[int, int]]:
        """Chunk ``chunk``'s slab and expert -> slot (the previous chunk is released)."""
        if chunk != self._leases.index:
            lease = self._leases.take(chunk)
            slab = self.runtime._slab(lease, self.device)
            slot_of = dict(zip(lease.experts, lease.slots, strict=True))
            self._held = slab.compact(slot_of) if slab.gate_up is None else (slab, slot_of)
        assert self._held is not None
        return self._held

    def close(self) -> None:
        self._leases.close()


class _ExpertsView:
    """The experts module as the model's expert function sees it, its weights swapped for views."""

    def __init__(self, inner: nn.Module, gate_up_proj: Any, down_proj: Any, num_experts: int) -> None:
        self._inner = inner
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.num_experts = num_experts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Rows:
    """``rows[c]``: the c-th expert's (ascending id) weight, from whichever lease holds it."""

    def __init__(self, fetch: Callable[[int], Tensor]) -> None:
        self._fetch = fetch

    def __getitem__(self, index: Any) -> Tensor:
        return self._fetch(int(index))


class OffloadedExperts(nn.Module):
    """Stands in for a MoE block's experts module: same call, weights leased from expertd."""

    expertd_offloaded = True
    _runtime: Offload
    inner: Any

    def __init__(self, inner: nn.Module, layer: MoELayer, runtime: Offload) -> None:
        super().__init__()
        self.inner = inner  # its expert parameters are gone; the rest (act_fn, config) is used
        self.layer_index = layer.index
        self.num_experts = layer.num_experts
        self.expert_bytes = layer.expert_bytes
        self.__dict__["_runtime"] = runtime  # not a submodule

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return self._runtime.run_experts(self, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}, experts={self.num_experts}, weights in expertd"


class Offload:
    """A model whose routed experts come from expertd; made by `offload`. One forward at a time."""

    def __init__(
        self,
        model: nn.Module,
        client: ExpertClient,
        layers: list[MoELayer],
        layout: _Layout,
        *,
        tier: str,
        hint: bool,
        new_generations: bool,
    ) -> None:
        self.model = model
        self.client = client
        self.layers = layers
        self.layout = layout
        self.tier = tier
        self.hint = hint
        self.stats = OffloadStats()
        self.freed_bytes = 0
        handle = client.info["tiers"][tier]
        slots = int(handle.get("max_pinned", handle["slots"]))  # what one client may pin of the tier
        self.max_per_acquire = min(slots, MAX_EXPERTS_PER_MESSAGE)
        self.chunk = max(1, min(slots // 2, MAX_EXPERTS_PER_MESSAGE))
        self._pending: dict[int, tuple[list[int], PendingAcquire]] = {}
        self._slabs: dict[tuple[int, int], _Slab] = {}
        self._hooks: list[Any] = []
        for layer in layers:
            self._hooks.append(layer.router.register_forward_hook(self._make_router_hook(layer.index)))
        if new_generations:
            self._hooks.append(
                decoder_model(model, layers).register_forward_pre_hook(self._on_forward, with_kwargs=True)
            )

    # --- hooks ------------------------------------------------------------------------------

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if forward_pass(args, kwargs).new_generation:
            self.client.begin_generation()  # the daemon's predictors keep history per generation
            self.stats.generations += 1

    def _make_router_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not (isinstance(output, tuple) and len(output) == 3):
                raise ModelLayoutError(
                    f"router of MoE layer {index} returned {type(output).__name__}; expected "
                    "(logits, weights, experts)"
                )
            order = acquire_order(output[2], output[1])
            if len(order) <= self.max_per_acquire:  # ask now: the lease travels while the block goes on
                self._drop_pending(index)
                self._pending[index] = (order, self.client.acquire_async(index, order, self.tier))

        return hook

    def _drop_pending(self, index: int) -> None:
        old = self._pending.pop(index, None)
        if old is not None:
            with contextlib.suppress(Exception):  # its error is of no interest now
                old[1].result().release()

    # --- the experts of one layer -------------------------------------------------------------

    def run_experts(
        self, module: OffloadedExperts, hidden: Tensor, experts: Tensor, weights: Tensor
    ) -> Tensor:
        """The model's expert function for ``module``'s layer, on leased weights. [T, D] -> [T, D]."""
        index, inner = module.layer_index, module.inner
        impl = getattr(getattr(inner, "config", None), "_experts_implementation", None) or "eager"
        if impl not in IMPLEMENTATIONS:
            raise ModelLayoutError(
                f"experts_implementation {impl!r} is not supported with expertd "
                f"(supported: {', '.join(IMPLEMENTATIONS)}); model.set_experts_implementation('grouped_mm')"
            )
        order = acquire_order(experts, weights)
        pending = self._pending.pop(index, None)
        if pending is not None and pending[0] != order:  # the router ran again since: not this pass
            self._pending[index] = pending
            self._drop_pending(index)
            pending = None
        if self.hint and index + 1 < len(self.layers):
            self._hint_next(index, hidden)  # while the acquire travels
        if len(order) <= self.max_per_acquire:
            chunks = [order]
        else:  # ascending chunks: the eager loop's order
            ranked = sorted(order)
            chunks = [ranked[i : i + self.chunk] for i in range(0, len(ranked), self.chunk)]
            self.stats.chunked += 1
        leases = _ChunkLeases(self, index, chunks, pending[1] if pending else None, hidden.device)
        try:
            if impl == "grouped_mm":
                return _grouped_mm_on_slots(inner, hidden, experts, weights, leases)
            if impl == "eager":
                ranked = sorted(order)
                chunk_of = {e: c for c, chunk in enumerate(chunks) for e in chunk}

                def row(c: int, down: bool) -> Tensor:
                    slab, slot_of = leases.get(chunk_of[ranked[c]])
                    slot = slot_of[ranked[c]]
                    return slab.down[slot] if down else slab.gate_up_of(slot)

                view = _ExpertsView(
                    inner, _Rows(lambda c: row(c, False)), _Rows(lambda c: row(c, True)), len(ranked)
                )
                remap = _remap(inner, ranked, range(len(ranked)), experts.device)
                return _eager_forward(inner)(view, hidden, remap[experts], weights)
            return _batched_mm_on_slots(inner, hidden, experts, weights, leases)
        finally:
            leases.close()

    def _wait(self, pending: PendingAcquire) -> Lease:
        started = time.perf_counter()
        lease = pending.result()
        self.stats.wait_s += time.perf_counter() - started
        self.stats.acquires += 1
        return lease

    def _slab(self, lease: Lease, device: torch.device) -> _Slab:
        """The stacked views of the lease's tier (made once per mapping)."""
        anchor = next(iter(lease.tensors(0).values()))
        if anchor.device != device:
            raise ModelLayoutError(
                f"the model computes on {device} but the daemon's {lease.tier} tier is on {anchor.device}: "
                f"serve with a device tier on {device.type}, or move the model"
            )
        storage = anchor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        slab = self._slabs.get(key)
        if slab is None:
            handle = self.client.info["tiers"][lease.tier]
            flat = torch.empty(0, dtype=self.layout.dtype, device=anchor.device).set_(storage)
            slab = self._slabs[key] = _Slab(
                self.layout, flat, int(handle["slots"]), int(handle["slot_bytes"])
            )
        return slab

    def _hint_next(self, index: int, hidden: Tensor) -> None:
        """Hint layer index+1's experts as its router ranks them for this layer's input."""
        router = self.layers[index + 1].router
        with torch.no_grad():
            _, weights, experts = router.forward(hidden)  # .forward: no hooks (not routing, a guess)
            score = torch.zeros(self.layers[index + 1].num_experts, dtype=torch.float32)  # [E]
            score.index_add_(0, experts.reshape(-1).cpu(), weights.reshape(-1).float().cpu())
            order = torch.argsort(score, descending=True, stable=True)
            order = order[score[order] > 0]
        self.client.hint(index + 1, order.tolist(), score[order].tolist())
        self.stats.hints += 1

    def close(self) -> None:
        """Remove the hooks and end the open generation (the experts stay offloaded)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for index in list(self._pending):
            self._drop_pending(index)
        if not self.client.closed:
            self.client.end_generation()


def _remap(inner: Any, experts: list[int], to: Any, device: torch.device, fill: int = -1) -> Tensor:
    """[E + 1] long: expert id -> its index in the view; others -> ``fill`` (default: past the end)."""
    fill = len(experts) if fill < 0 else fill
    remap = torch.full((int(inner.num_experts) + 1,), fill, dtype=torch.long)
    remap[torch.tensor(experts, dtype=torch.long)] = torch.as_tensor(list(to), dtype=torch.long)
    return remap.to(device)


def _eager_forward(inner: nn.Module) -> Callable[..., Tensor]:
    """The experts class's own loop (what its ``experts_implementation="eager"`` runs)."""
    forward = type(inner).forward
    return getattr(forward, "__wrapped__", forward)


def _grouped_mm_on_slots(
    inner: Any, hidden: Tensor, experts: Tensor, weights: Tensor, leases: _ChunkLeases
) -> Tensor:
    """transformers' ``grouped_mm_experts_forward`` on slot-stacked weights, bit for bit.

    Its CPU kernel's result for a row depends on the row's place within its group, and its
    sort is unstable: sorting slot numbers instead of expert ids would reorder rows. So the
    pairs are sorted by expert id exactly as the model sorts them, then whole groups (never
    the rows inside them) are put in slot order, chunk by chunk; the rest is the model's
    function step by step. Each (token, k) pair's output is final before the sum over k.
    """
    from transformers.integrations.moe import _grouped_linear

    top_k = experts.size(-1)
    tokens, hidden_dim = hidden.size(0), hidden.size(-1)
    sample_weights = weights.reshape(-1)  # [T*k]
    expert_ids = experts.reshape(-1)  # [T*k]
    expert_ids_g, perm = torch.sort(expert_ids)  # the model's own row order within each expert
    weighted_all: Tensor | None = None
    for chunk in range(len(leases.chunks)):
        slab, slot_of = leases.get(chunk)
        slot_map = _remap(inner, list(slot_of), list(slot_of.values()), expert_ids.device, slab.num_slots)
        rows = slot_map[expert_ids_g] < slab.num_slots if len(leases.chunks) > 1 else slice(None)
        slots_g = slot_map[expert_ids_g[rows]]
        _, by_slot = torch.sort(slots_g, stable=True)  # whole groups move; rows inside keep their order
        perm_c, slots_g = perm[rows][by_slot], slots_g[by_slot]
        selected = hidden[perm_c // top_k]  # [n, D]
        histc_input = slots_g.float() if hidden.device.type in ("cpu", "mps") else slots_g.int()
        per_slot = torch.histc(histc_input, bins=slab.num_slots, min=0, max=slab.num_slots - 1)
        offsets = torch.cumsum(per_slot, dim=0, dtype=torch.int32)
        proj = _grouped_linear(selected, slab.fused_gate_up(), offsets)  # [n, 2F]
        proj = inner._apply_gate(proj)  # [n, F]
        proj = _grouped_linear(proj, slab.down, offsets)  # [n, D]
        weighted = proj * sample_weights[perm_c].unsqueeze(-1)  # [n, D]
        if weighted_all is None:
            weighted_all = weighted.new_empty((tokens * top_k, hidden_dim))  # [T*k, D]
        weighted_all[perm_c] = weighted  # each pair back in its (token, k) place
    assert weighted_all is not None
    return weighted_all.view(tokens, top_k, hidden_dim).sum(dim=1).to(hidden.dtype)  # [T, D]


def _batched_mm_on_slots(
    inner: Any, hidden: Tensor, experts: Tensor, weights: Tensor, leases: _ChunkLeases
) -> Tensor:
    """transformers' ``batched_mm_experts_forward`` on slot-stacked weights, bit for bit.

    Every (token, k) pair is its own batch entry there, computed alike whatever else is in
    the batch; so the pairs of each chunk go through the model's steps, then the sum over k.
    """
    from transformers.integrations.moe import _batched_linear

    top_k = experts.size(-1)
    tokens, hidden_dim = hidden.size(0), hidden.size(-1)
    selected_all = hidden.repeat_interleave(top_k, dim=0)  # [T*k, D]
    sample_weights = weights.reshape(-1)  # [T*k]
    expert_ids = experts.reshape(-1)  # [T*k]
    weighted_all: Tensor | None = None
    for chunk in range(len(leases.chunks)):
        slab, slot_of = leases.get(chunk)
        slot_map = _remap(inner, list(slot_of), list(slot_of.values()), expert_ids.device, slab.num_slots)
        slots = slot_map[expert_ids]  # [T*k]
        rows = slots < slab.num_slots  # this chunk's pairs
        proj = _batched_linear(selected_all[rows], slab.fused_gate_up()[slots[rows]])  # [n, 2F]
        proj = inner._apply_gate(proj)  # [n, F]
        proj = _batched_linear(proj, slab.down[slots[rows]])  # [n, D]
        weighted = proj * sample_weights[rows].unsqueeze(-1)  # [n, D]
        if weighted_all is None:
            weighted_all = weighted.new_empty((tokens * top_k, hidden_dim))  # [T*k, D]
        weighted_all[rows] = weighted
    assert weighted_all is not None
    return weighted_all.view(tokens, top_k, hidden_dim).sum(dim=1).to(hidden.dtype)  # [T, D]


def offload(
    model: nn.Module,
    client: ExpertClient,
    *,
    tier: str | None = None,
    hint: bool = False,
    new_generations: bool = True,
) -> Offload:
    """Serve ``model``'s routed experts from ``client``'s daemon and drop them from ``model``.

    ``tier``: where leases are taken (default: the daemon's, the device tier if it has one).
    ``hint``: send each next layer's gate guess ahead of its acquire. ``new_generations``: a
    forward pass with an empty cache starts a new generation at the daemon (`begin_generation`).
    Raises `ModelLayoutError` (naming what was found) if the model or the store do not match.
    """
    layers = find_moe_layers(model)
    first = layers[0].experts
    plain = {"has_gate": True, "has_bias": False, "is_transposed": False, "has_post_expert_norm": False}
    for layer in layers:
        flags = {name: getattr(layer.experts, name, default) for name, default in plain.items()}
        if flags != plain or getattr(layer.experts, "_is_expert_parallel", False):
            raise ModelLayoutError(
                f"{layer.path}.experts ({type(layer.experts).__name__}) is not a plain gated SwiGLU "
                f"expert stack: {flags}, expert parallel {getattr(layer.experts, '_is_expert_parallel', 0)}"
            )
    if client.num_layers != len(layers) or client.num_experts != layers[0].num_experts:
        raise ModelLayoutError(
            f"the daemon serves {client.model!r}: {client.num_layers} layers x {client.num_experts} "
            f"experts; {type(model).__name__} has {len(layers)} MoE layers x {layers[0].num_experts} experts"
        )
    stored = client.info.get("checkpoint_layers")
    decoder_layers = [x.decoder_layer for x in layers]
    if stored is not None and list(stored) != decoder_layers:
        raise ModelLayoutError(
            f"the store's layers are checkpoint layers {list(stored)}; the model's MoE blocks are in "
            f"decoder layers {decoder_layers}"
        )
    try:  # the grouped_mm and batched_mm mirrors use transformers' own linear helpers
        from transformers.integrations.moe import _batched_linear, _grouped_linear  # noqa: F401
    except ImportError:
        raise ModelLayoutError(
            f"transformers {transformers_version()} has no integrations.moe._grouped_linear/_batched_linear: "
            "expertd.client.hf follows transformers 5 (tested with 5.24)"
        ) from None
    layout = _store_layout(client, first.gate_up_proj, first.down_proj)
    tier = tier or client.default_tier
    if tier not in client.info["tiers"]:
        raise ModelLayoutError(f"the daemon has no {tier!r} tier (it has {', '.join(client.info['tiers'])})")
    runtime = Offload(model, client, layers, layout, tier=tier, hint=hint, new_generations=new_generations)
    for layer in layers:
        inner = layer.experts
        stand_in = OffloadedExperts(inner, layer, runtime)
        for name in ("gate_up_proj", "down_proj"):
            runtime.freed_bytes += getattr(inner, name).nbytes
            delattr(inner, name)  # the model's copy of the weights goes away
        layer.block.experts = stand_in
    return runtime
