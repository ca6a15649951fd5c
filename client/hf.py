"""Run a loaded transformers MoE model with its routed experts served by expertd: `offload`.

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16)
    client = ExpertClient()                  # a daemon serving `expertd pack --from-hf MODEL_DIR`
    offload(model, client)                   # the experts' weights leave this process
    model.generate(...)                      # the model's own router picks; expertd supplies

What changes: each MoE block's experts module is replaced by `OffloadedExperts`, and its
expert parameters (``gate_up_proj``/``down_proj``, and whatever else its family has) are
dropped. The router, shared experts, attention and everything else stay in the model,
unchanged. In a forward pass, layer i's router hook sends one acquire for the experts its
tokens chose (`ExpertClient.acquire_async`, as soon as the routing is known); with
``hint=True`` it then calls the next layer's router the way its block does (with the extra
arguments that router was last called with, such as MiniMax-M2's ``e_score_correction_bias``)
on this layer's input and hints the experts it picks, while the acquire is in flight. A
router that cannot be called so turns hints off with one warning; generation goes on.

The experts module then computes what the model's configured ``experts_implementation``
computes, on the daemon's zero-copy views (`expertd.client.hf_experts`): eager runs the
experts class's own loop, handed one view per expert in expert-id order; grouped_mm and
batched_mm see every slot of the tier as one stacked view per parameter, with their steps
mirrored so that each row keeps the place the model's own sort gives it (the CPU kernels'
results depend on it); Llama-4's dense experts run only the routed experts, whose rows are
all that is not exactly zero. Same kernels, same inputs, same order: logits equal the
unmodified model's bit for bit (tests/test_hf.py checks every family).

When one pass routes to more experts of a layer than the tier holds (a long prefill on a
small device tier), they are acquired in chunks of half the tier, in expert-id order, the next
chunk asked for while one computes; still bit for bit.

With ``tier="auto"`` the daemon places each expert: a lease's host-placed experts are a chunk of
their own, computed on the CPU from the host slab's views after the device's kernels for the
rest are queued, their rows moved to the device before the sum over k (grouped_mm, batched_mm,
dense; eager for a model on the CPU). Each row is final before that sum, so on the CPU stand-in
the logits are still the model's bit for bit.

A store's layer i must be the model's MoE layer i: `offload` checks the store's
``checkpoint_layers`` against the model's MoE blocks, and the store's expert layout, shapes
and dtype against the model's (`expertd.client.hf_layout`).

Shape legend: T tokens, D hidden size, F expert FFN size, E routed experts, S tier slots, k top-k.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from expertd.client.chunks import ChunkLeases
from expertd.client.client import ExpertClient, Lease, PendingAcquire
from expertd.client.hf_experts import (
    ExpertsView,
    Rows,
    Slab,
    SlotLayout,
    batched_mm_on_slots,
    dense_on_slots,
    eager_forward,
    grouped_mm_on_slots,
    remap,
)
from expertd.client.hf_layers import (
    ModelLayoutError,
    MoELayer,
    acquire_order,
    decoder_model,
    find_moe_layers,
    forward_pass,
    routed_tokens,
    transformers_version,
)
from expertd.client.hf_layout import model_layout, slot_layout
from expertd.daemon.protocol import AUTO_PROTOCOL, AUTO_TIER, MAX_EXPERTS_PER_MESSAGE
from expertd.daemon.protocol.families import ExpertLayout

DEVICE, HOST = "device", "host"  # the tiers an auto lease places experts in

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")

__all__ = ["ModelLayoutError", "Offload", "OffloadedExperts", "offload"]


@dataclasses.dataclass
class OffloadStats:
    """What the client saw: acquires, time blocked waiting for leases, hints sent."""

    acquires: int = 0
    chunked: int = 0  # forward passes of a layer split into several acquires
    wait_s: float = 0.0
    hints: int = 0
    generations: int = 0


class _ChunkLeases:
    """A layer pass's `ChunkLeases`, each chunk seen as stacked slab views.

    With ``tier="auto"`` every acquired chunk is two compute chunks: ``2c`` its device-placed
    experts (views of the device slab), ``2c + 1`` its host-placed ones (views of the host slab,
    on the CPU: the experts functions compute that chunk there, while the device's kernels of
    chunk ``2c`` run, and move its rows to the device). Each chunk's rows are final before
    the sum over k, so the split changes no result on the CPU stand-in.
    """

    def __init__(
        self,
        runtime: Offload,
        layer: int,
        chunks: list[list[int]],
        first: PendingAcquire | None,
        device: torch.device,
        tokens: dict[int, int] | None = None,
    ) -> None:
        self.runtime, self.chunks, self.device = runtime, chunks, device
        self.places = (DEVICE, HOST) if runtime.tier == AUTO_TIER else (runtime.tier,)
        self._leases = ChunkLeases(
            runtime.client,
            layer,
            chunks,
            runtime.tier,
            first=first,
            wait=runtime._wait,
            limit=runtime.max_per_acquire,
            tokens=tokens,
        )
        self._held: dict[str, tuple[Slab | None, dict[int, int]]] = {}

    @property
    def count(self) -> int:
        """Compute chunks (what the experts functions loop over)."""
        return len(self.chunks) * len(self.places)

    def get(self, chunk: int) -> tuple[Slab | None, dict[int, int]]:
        """Compute chunk ``chunk``'s slab and expert -> slot (the previous lease is released);
        (None, {}) when the lease placed none of its experts there."""
        taken, place = divmod(chunk, len(self.places))
        if taken != self._leases.index:
            lease = self._leases.take(taken)
            self._held = {}
            for where in self.places:
                mine = [i for i in range(len(lease.experts)) if lease.place(i) == where]
                if not mine:
                    self._held[where] = (None, {})
                    continue
                slab = self.runtime._slab(
                    lease, mine[0], self.device, on_host=self.runtime.tier == AUTO_TIER and where == HOST
                )
                slot_of = {lease.experts[i]: lease.slots[i] for i in mine}
                self._held[where] = (slab, slot_of) if slab.zero_copy else slab.compact(slot_of)
        return self._held[self.places[place]]

    def find(self, chunk: int, expert: int) -> tuple[Slab, int]:
        """The slab and slot of ``expert`` of acquired chunk ``chunk``."""
        for place in range(len(self.places)):
            slab, slot_of = self.get(chunk * len(self.places) + place)
            if expert in slot_of:
                assert slab is not None
                return slab, slot_of[expert]
        raise KeyError(f"expert {expert} is in no lease of chunk {chunk}")

    def close(self) -> None:
        self._leases.close()


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
        self.expert_params = layer.params
        self.__dict__["_runtime"] = runtime  # not a submodule

    def forward(self, *args: Any) -> Tensor:
        return self._runtime.run_experts(self, *args)

    def extra_repr(self) -> str:
        return f"layer={self.layer_index}, experts={self.num_experts}, weights in expertd"


class Offload:
    """A model whose routed experts come from expertd; made by `offload`. One forward at a time."""

    def __init__(
        self,
        model: nn.Module,
        client: ExpertClient,
        layers: list[MoELayer],
        layout: ExpertLayout,
        slots: SlotLayout,
        *,
        tier: str,
        hint: bool,
        new_generations: bool,
    ) -> None:
        self.model = model
        self.client = client
        self.layers = layers
        self.layout = layout
        self.slots = slots
        self.tier = tier
        self.hint = hint
        self.stats = OffloadStats()
        self.freed_bytes = 0
        tiers = client.info["tiers"]
        handles = [tiers[t] for t in ((DEVICE, HOST) if tier == AUTO_TIER else (tier,)) if t in tiers]
        slots = min(int(h.get("max_pinned", h["slots"])) for h in handles)  # what one client may pin
        self.max_per_acquire = min(slots, MAX_EXPERTS_PER_MESSAGE)
        self.chunk = max(1, min(slots // 2, MAX_EXPERTS_PER_MESSAGE))
        self._pending: dict[int, tuple[list[int], PendingAcquire]] = {}
        self._routed: dict[int, list[int]] = {}  # layer -> this pass's experts (for dense experts)
        self._tokens: dict[int, dict[int, int]] = {}  # layer -> expert -> tokens (tier auto)
        self._router_args: dict[int, tuple[tuple, dict]] = {}  # layer -> its router's extra arguments
        self._slabs: dict[tuple[int, int], Slab] = {}
        self._hooks: list[Any] = []
        for layer in layers:
            self._hooks.append(layer.router.register_forward_hook(self._make_router_hook(layer)))
            self._hooks.append(
                layer.router.register_forward_pre_hook(
                    self._make_router_args_hook(layer.index), with_kwargs=True
                )
            )
        if new_generations:
            self._hooks.append(
                decoder_model(model, layers).register_forward_pre_hook(self._on_forward, with_kwargs=True)
            )

    # --- hooks ------------------------------------------------------------------------------

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if forward_pass(args, kwargs).new_generation:
            self.client.begin_generation()  # the daemon's predictors keep history per generation
            self.stats.generations += 1

    def _make_router_args_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._router_args[index] = (args[1:], kwargs)  # how the block calls it, beyond the input

        return hook

    def _make_router_hook(self, layer: MoELayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            experts, weights = layer.routing(output)
            order = acquire_order(experts, weights)
            self._routed[layer.index] = order
            if self.tier == AUTO_TIER:  # the daemon weighs a prefill's token counts
                self._tokens[layer.index] = routed_tokens(experts, layer.num_experts)
            if len(order) <= self.max_per_acquire:  # ask now: the lease travels while the block goes on
                self._drop_pending(layer.index)
                tokens = self._tokens.get(layer.index)
                counts = None if tokens is None else [tokens[e] for e in order]
                pending = self.client.acquire_async(layer.index, order, self.tier, counts)
                self._pending[layer.index] = (order, pending)
            if self.hint and layer.index + 1 < len(self.layers) and args:
                self._hint_next(layer.index, args[0])  # while the acquire travels

        return hook

    def _drop_pending(self, index: int) -> None:
        old = self._pending.pop(index, None)
        if old is not None:
            with contextlib.suppress(Exception):  # its error is of no interest now
                old[1].result().release()

    # --- the experts of one layer -------------------------------------------------------------

    def run_experts(self, module: OffloadedExperts, *args: Any) -> Tensor:
        """The model's expert function for ``module``'s layer, on leased weights."""
        index, inner = module.layer_index, module.inner
        dense = self.layout.experts_call == "dense"
        impl = getattr(getattr(inner, "config", None), "_experts_implementation", None) or "eager"
        if impl not in IMPLEMENTATIONS and not dense:
            raise ModelLayoutError(
                f"experts_implementation {impl!r} is not supported with expertd "
                f"(supported: {', '.join(IMPLEMENTATIONS)}); model.set_experts_implementation('grouped_mm')"
            )
        expected = 1 if dense else 3
        if len(args) != expected or (dense and index not in self._routed):
            raise ModelLayoutError(
                f"MoE layer {index}'s experts were called with {len(args)} arguments"
                + (" before its router ran" if len(args) == expected else f"; the {self.layout.family} "
                   f"experts take {expected} ({self.layout.experts_call})")
            )  # fmt: skip
        if dense:  # Llama-4: experts(routed_in [E*T, D]); the router hook saw the routing
            hidden, experts, weights = args[0], None, None
            order = self._routed.pop(index)
        else:  # experts(hidden [T, D], top_k_index [T, k], top_k_weights [T, k])
            hidden, experts, weights = args
            order = acquire_order(experts, weights)
        pending = self._pending.pop(index, None)
        if pending is not None and pending[0] != order:  # the router ran again since: not this pass
            self._pending[index] = pending
            self._drop_pending(index)
            pending = None
        if len(order) <= self.max_per_acquire:
            chunks = [order]
        else:  # ascending chunks: the eager loop's order
            ranked = sorted(order)
            chunks = [ranked[i : i + self.chunk] for i in range(0, len(ranked), self.chunk)]
            self.stats.chunked += 1
        first = pending[1] if pending else None
        leases = _ChunkLeases(self, index, chunks, first, hidden.device, self._tokens.pop(index, None))
        try:
            if dense:
                routed = [sorted(c) for c in chunks for _ in leases.places]
                return dense_on_slots(inner, hidden, routed, leases.get)
            assert experts is not None and weights is not None
            if impl == "grouped_mm":
                return grouped_mm_on_slots(inner, hidden, experts, weights, leases.count, leases.get)
            if impl == "batched_mm":
                return batched_mm_on_slots(inner, hidden, experts, weights, leases.count, leases.get)
            if len(leases.places) > 1 and hidden.device.type != "cpu":
                raise ModelLayoutError(
                    "tier 'auto' with the eager experts loop runs on the CPU only (it cannot mix devices "
                    "inside the model's loop): model.set_experts_implementation('grouped_mm')"
                )
            ranked = sorted(order)
            chunk_of = {e: c for c, chunk in enumerate(chunks) for e in chunk}

            def row(name: str) -> Rows:
                def fetch(c: int) -> Tensor:
                    slab, slot = leases.find(chunk_of[ranked[c]], ranked[c])
                    return slab[name][slot]

                return Rows(fetch)

            view = ExpertsView(inner, {w.name: row(w.name) for w in self.slots}, len(ranked))
            table = remap(int(inner.num_experts), ranked, range(len(ranked)), experts.device)
            return eager_forward(inner)(view, hidden, table[experts], weights)
        finally:
            leases.close()

    def _wait(self, pending: PendingAcquire) -> Lease:
        started = time.perf_counter()
        lease = pending.result()
        self.stats.wait_s += time.perf_counter() - started
        self.stats.acquires += 1
        return lease

    def _slab(self, lease: Lease, i: int, device: torch.device, *, on_host: bool = False) -> Slab:
        """The stacked views of the tier of the lease's ``i``-th expert (made once per mapping);
        ``on_host``: a host slab an auto lease placed experts in (computed on the CPU)."""
        anchor = next(iter(lease.tensors(i).values()))
        if anchor.device != device and not on_host:
            raise ModelLayoutError(
                f"the model computes on {device} but the daemon's {lease.tier} tier is on {anchor.device}: "
                f"serve with a device tier on {device.type}, or move the model"
            )
        storage = anchor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        slab = self._slabs.get(key)
        if slab is None:
            handle = self.client.info["tiers"][lease.place(i)]
            slab = self._slabs[key] = Slab.over(
                self.slots, storage, int(handle["slots"]), int(handle["slot_bytes"])
            )
        return slab

    def _hint_next(self, index: int, hidden: Tensor) -> None:
        """Hint layer index+1's experts as its router ranks them for this layer's input: the
        router called as its block calls it. Never raises: a router that cannot be called so
        turns hints off, with one warning."""
        layer = self.layers[index + 1]
        extra = self._router_args.get(layer.index) or _extra_arguments(layer)
        if extra is None:
            return  # not called yet, and its extra arguments are not the block's attributes
        try:
            with torch.no_grad():
                output = layer.router.forward(hidden, *extra[0], **extra[1])  # .forward: no hooks
                experts, weights = layer.routing(output)
                score = torch.zeros(layer.num_experts, dtype=torch.float32)  # [E]
                score.index_add_(0, experts.reshape(-1).cpu(), weights.reshape(-1).float().cpu())
                order = torch.argsort(score, descending=True, stable=True)
                order = order[score[order] > 0]
        except Exception as exc:  # a guess must never stop generation
            self.hint = False
            warnings.warn(
                f"expertd: hints turned off: the router of MoE layer {layer.index} "
                f"({type(layer.router).__name__}) could not be called for a hint "
                f"({type(exc).__name__}: {exc})",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.client.hint(layer.index, order.tolist(), score[order].tolist())
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


def _extra_arguments(layer: MoELayer) -> tuple[tuple, dict] | None:
    """A router's arguments beyond the input, found as its block's attributes of the same name
    (MiniMax-M2's ``e_score_correction_bias``); None if one is not there."""
    params = list(inspect.signature(layer.router.forward).parameters.values())[1:]
    values = []
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.default is not param.empty:
            continue
        value = getattr(layer.block, param.name, None)
        if value is None:
            return None
        values.append(value)
    return tuple(values), {}


def offload(
    model: nn.Module,
    client: ExpertClient,
    *,
    tier: str | None = None,
    hint: bool = False,
    new_generations: bool = True,
) -> Offload:
    """Serve ``model``'s routed experts from ``client``'s daemon and drop them from ``model``.

    ``tier``: where leases are taken (default: the daemon's, the device tier if it has one);
    ``"auto"``: the daemon places each expert, and host-placed ones are computed on the CPU from
    the host slab's views while the device computes the rest (grouped_mm, batched_mm, Llama-4's
    dense experts; eager on a CPU model only).
    ``hint``: send each next layer's gate guess ahead of its acquire. ``new_generations``: a
    forward pass with an empty cache starts a new generation at the daemon (`begin_generation`).
    Raises `ModelLayoutError` (naming what was found) if the model or the store do not match.
    """
    layers = find_moe_layers(model)
    layout = model_layout(model, layers)
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
            "expertd.client.hf follows transformers 5 (tested with 5.25)"
        ) from None
    slots = slot_layout(client, layers, layout)
    tier = tier or client.default_tier
    if tier == AUTO_TIER and client.hello is not None and client.hello.protocol < AUTO_PROTOCOL:
        raise ModelLayoutError(
            f"the daemon speaks protocol {client.hello.protocol}: no tier 'auto' "
            "(offload with 'device' or 'host')"
        )
    if tier not in client.info["tiers"] and tier != AUTO_TIER:
        raise ModelLayoutError(f"the daemon has no {tier!r} tier (it has {', '.join(client.info['tiers'])})")
    runtime = Offload(
        model, client, layers, layout, slots, tier=tier, hint=hint, new_generations=new_generations
    )
    for layer in layers:
        inner = layer.experts
        stand_in = OffloadedExperts(inner, layer, runtime)
        for name in layer.params:
            owner_path, _, attr = name.rpartition(".")
            owner = inner.get_submodule(owner_path) if owner_path else inner
            runtime.freed_bytes += getattr(owner, attr).nbytes
            delattr(owner, attr)  # the model's copy of the weights goes away
        layer.block.experts = stand_in
    return runtime
