"""The experts of one transformers MoE layer computed on leased slots, exactly as the model does.

A slot holds one expert's store tensors; `SlotLayout` says where each of the model's expert
parameters (``gate_up_proj``, ``down_proj``, GPT-OSS's biases, DBRX's ``mlp.w1/v1/w2``) lies in
it, following the store's `ExpertLayout`. `Slab` sees a whole tier as those parameters stacked
over slots (``[S, ...]`` views, no copies). The functions below are transformers' experts
implementations with the model's stacked parameters swapped for slot-stacked ones, step for
step, so each row's result is bit for bit the model's:

- `eager_on_slots`: the experts class's own loop, handed one view per expert in expert-id order;
- `grouped_mm_on_slots` / `batched_mm_on_slots`: ``transformers.integrations.moe``'s two;
- `dense_on_slots`: Llama-4's, which runs every expert over router-scaled inputs.

Shape legend: T tokens, D hidden size, F expert FFN size, E routed experts, S tier slots, k top-k.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from expertd.client.host_compute import on


@dataclasses.dataclass(frozen=True)
class SlotWeight:
    """One model expert parameter inside a slot: the store tensors it is made of, concatenated on dim 0."""

    name: str  # the model's parameter name, dotted under the experts module ("mlp.w1")
    dtype: torch.dtype
    shape: tuple[int, ...]  # per expert
    pieces: tuple[tuple[int, tuple[int, ...]], ...]  # (byte offset, shape) of each store tensor

    @property
    def contiguous_offset(self) -> int | None:
        """The byte offset of the whole parameter if its pieces lie back to back (a zero-copy view)."""
        offset = self.pieces[0][0]
        for (start, shape), (following, _) in zip(self.pieces, self.pieces[1:], strict=False):
            if following != start + math.prod(shape) * self.dtype.itemsize:
                return None
        return offset


SlotLayout = tuple[SlotWeight, ...]


class Slab:
    """One tier's slab as the model's expert parameters stacked over slots: views, no copies."""

    def __init__(self, weights: dict[str, Tensor], num_slots: int) -> None:
        self.weights = weights  # name -> [S, *shape]
        self.num_slots = num_slots

    @classmethod
    def over(cls, layout: SlotLayout, storage: Any, num_slots: int, slot_bytes: int) -> Slab:
        """The stacked views of ``storage`` (an untyped storage of ``num_slots`` slots)."""
        weights: dict[str, Tensor] = {}
        pieces: dict[str, list[Tensor]] = {}
        for weight in layout:
            flat = torch.empty(0, dtype=weight.dtype, device=storage.device).set_(storage)
            item = weight.dtype.itemsize
            assert slot_bytes % item == 0, f"a slot of {slot_bytes} bytes is not a multiple of {weight.dtype}"

            def stacked(offset: int, shape: tuple[int, ...], flat: Tensor = flat, item: int = item) -> Tensor:
                strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
                return flat.as_strided((num_slots, *shape), (slot_bytes // item, *strides), offset // item)

            offset = weight.contiguous_offset
            if offset is not None:
                weights[weight.name] = stacked(offset, weight.shape)
            else:  # gate and up apart in the slot (F x D not 256-byte aligned): see `compact`
                pieces[weight.name] = [stacked(o, s) for o, s in weight.pieces]
        slab = cls(weights, num_slots)
        slab.pieces = pieces
        return slab

    pieces: dict[str, list[Tensor]]

    @property
    def device(self) -> torch.device:
        """Where the slab's weights are (an auto lease's host slab: the CPU)."""
        for w in (*self.weights.values(), *(p for parts in self.pieces.values() for p in parts)):
            return w.device
        raise ValueError("a slab without weights has no device")

    @property
    def zero_copy(self) -> bool:
        return not self.pieces

    def compact(self, slot_of: dict[int, int]) -> tuple[Slab, dict[int, int]]:
        """This lease's experts copied, each parameter whole, as slots 0..n-1 (not zero-copy; the
        same values): for a store whose gate and up are apart in the slot."""
        slots = list(slot_of.values())
        weights = {name: w[slots] for name, w in self.weights.items()}
        for name, parts in self.pieces.items():
            weights[name] = torch.cat([p[slots] for p in parts], dim=1)  # [n, *shape]
        out = Slab(weights, len(slots))
        out.pieces = {}
        return out, {expert: i for i, expert in enumerate(slot_of)}

    def __getitem__(self, name: str) -> Tensor:
        return self.weights[name]


class Rows:
    """``rows[c]``: the c-th expert's (ascending id) weight, from whichever lease holds it."""

    def __init__(self, fetch: Callable[[int], Tensor]) -> None:
        self._fetch = fetch

    def __getitem__(self, index: Any) -> Tensor:
        return self._fetch(int(index))

    def view(self, *shape: Any) -> Rows:
        """DBRX views its ``[E * F, D]`` rows as ``[E, F, D]`` first: these rows already are per expert."""
        return self


class ExpertsView:
    """An experts module as its own forward sees it, its expert parameters swapped for `Rows`."""

    def __init__(self, inner: nn.Module, weights: dict[str, Any], num_experts: int) -> None:
        self._inner = inner
        self.num_experts = num_experts
        children: dict[str, dict[str, Any]] = {}
        for name, rows in weights.items():
            head, _, tail = name.partition(".")
            if tail:
                children.setdefault(head, {})[tail] = rows
            else:
                setattr(self, name, rows)
        for head, inner_weights in children.items():
            setattr(self, head, ExpertsView(getattr(inner, head), inner_weights, num_experts))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # DBRX calls its mlp child
        return self._inner(*args, **kwargs)


def remap(num_experts: int, experts: list[int], to: Any, device: torch.device, fill: int = -1) -> Tensor:
    """[E + 1] long: expert id -> its index in the view; others -> ``fill`` (default: past the end)."""
    fill = len(experts) if fill < 0 else fill
    table = torch.full((num_experts + 1,), fill, dtype=torch.long)
    table[torch.tensor(experts, dtype=torch.long)] = torch.as_tensor(list(to), dtype=torch.long)
    return table.to(device)


def eager_forward(inner: nn.Module) -> Callable[..., Tensor]:
    """The experts class's own loop (what its ``experts_implementation="eager"`` runs)."""
    forward = type(inner).forward
    return getattr(forward, "__wrapped__", forward)


def _bias(inner: Any, slab: Slab, name: str, rows: Tensor) -> Tensor | None:
    return slab[f"{name}_bias"][rows] if getattr(inner, "has_bias", False) else None


# chunk index -> (slab, expert -> slot); (None, {}): an auto lease placed none of its experts there
Chunks = Callable[[int], tuple[Slab | None, dict[int, int]]]


def grouped_mm_on_slots(
    inner: Any, hidden: Tensor, experts: Tensor, weights: Tensor, chunks: int, get: Chunks
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
    transposed = bool(getattr(inner, "is_transposed", False))
    sample_weights = weights.reshape(-1)  # [T*k]
    expert_ids = experts.reshape(-1)  # [T*k]
    expert_ids_g, perm = torch.sort(expert_ids)  # the model's own row order within each expert
    weighted_all: Tensor | None = None
    for chunk in range(chunks):
        slab, slot_of = get(chunk)
        if slab is None:  # an auto lease placed none of its experts here
            continue
        here = slab.device
        ids_g, perm_h, hidden_h, weights_h = on(here, expert_ids_g, perm, hidden, sample_weights)
        slot_map = remap(int(inner.num_experts), list(slot_of), list(slot_of.values()), here, slab.num_slots)
        rows = slot_map[ids_g] < slab.num_slots if chunks > 1 else slice(None)
        slots_g = slot_map[ids_g[rows]]
        _, by_slot = torch.sort(slots_g, stable=True)  # whole groups move; rows inside keep their order
        perm_c, slots_g = perm_h[rows][by_slot], slots_g[by_slot]
        selected = hidden_h[perm_c // top_k]  # [n, D]
        # Only the slots this lease holds are groups: the kernel's cost grows with the number of
        # groups, empty ones too (about 1 us each on a CPU), and a tier has many more slots than
        # one layer routes to. Each group is computed on its own, so the span leaves every bit as
        # it was. The span comes from the lease (no device sync).
        lo = min(slot_of.values())
        span = max(slot_of.values()) - lo + 1
        rel = slots_g - lo
        histc_input = rel.float() if here.type in ("cpu", "mps") else rel.int()
        per_slot = torch.histc(histc_input, bins=span, min=0, max=span - 1)
        offsets = torch.cumsum(per_slot, dim=0, dtype=torch.int32)
        bias = _bias(inner, slab, "gate_up_proj", slots_g)  # GPT-OSS: [n, 2F], by row
        gate_up, down = slab["gate_up_proj"][lo : lo + span], slab["down_proj"][lo : lo + span]
        proj = _grouped_linear(selected, gate_up, offsets, bias=bias, is_transposed=transposed)
        proj = inner._apply_gate(proj)  # [n, F]
        bias = _bias(inner, slab, "down_proj", slots_g)
        proj = _grouped_linear(proj, down, offsets, bias=bias, is_transposed=transposed)  # [n, D]
        weighted = proj * weights_h[perm_c].unsqueeze(-1)  # [n, D]
        if weighted_all is None:
            weighted_all = hidden.new_empty((tokens * top_k, hidden_dim), dtype=weighted.dtype)  # [T*k, D]
        weighted_all[perm_c.to(hidden.device)] = weighted.to(
            hidden.device
        )  # each pair in its (token, k) place
    assert weighted_all is not None
    return weighted_all.view(tokens, top_k, hidden_dim).sum(dim=1).to(hidden.dtype)  # [T, D]


def batched_mm_on_slots(
    inner: Any, hidden: Tensor, experts: Tensor, weights: Tensor, chunks: int, get: Chunks
) -> Tensor:
    """transformers' ``batched_mm_experts_forward`` on slot-stacked weights, bit for bit.

    Every (token, k) pair is its own batch entry there, computed alike whatever else is in
    the batch; so the pairs of each chunk go through the model's steps, then the sum over k.
    """
    from transformers.integrations.moe import _batched_linear

    top_k = experts.size(-1)
    tokens, hidden_dim = hidden.size(0), hidden.size(-1)
    transposed = bool(getattr(inner, "is_transposed", False))
    selected_all = hidden.repeat_interleave(top_k, dim=0)  # [T*k, D]
    sample_weights = weights.reshape(-1)  # [T*k]
    expert_ids = experts.reshape(-1)  # [T*k]
    weighted_all: Tensor | None = None
    for chunk in range(chunks):
        slab, slot_of = get(chunk)
        if slab is None:  # an auto lease placed none of its experts here
            continue
        here = slab.device
        ids_h, selected_h, weights_h = on(here, expert_ids, selected_all, sample_weights)
        slot_map = remap(int(inner.num_experts), list(slot_of), list(slot_of.values()), here, slab.num_slots)
        slots = slot_map[ids_h]  # [T*k]
        rows = slots < slab.num_slots  # this chunk's pairs
        mine = slots[rows]
        bias = _bias(inner, slab, "gate_up_proj", mine)
        proj = _batched_linear(selected_h[rows], slab["gate_up_proj"][mine], bias, transposed)  # [n, 2F]
        proj = inner._apply_gate(proj)  # [n, F]
        bias = _bias(inner, slab, "down_proj", mine)
        proj = _batched_linear(proj, slab["down_proj"][mine], bias, transposed)  # [n, D]
        weighted = proj * weights_h[rows].unsqueeze(-1)  # [n, D]
        if weighted_all is None:
            weighted_all = hidden.new_empty((tokens * top_k, hidden_dim), dtype=weighted.dtype)  # [T*k, D]
        weighted_all[rows.to(hidden.device)] = weighted.to(hidden.device)
    assert weighted_all is not None
    return weighted_all.view(tokens, top_k, hidden_dim).sum(dim=1).to(hidden.dtype)  # [T, D]


def dense_on_slots(inner: Any, routed_in: Tensor, routed: list[list[int]], get: Chunks) -> Tensor:
    """Llama-4's ``Llama4TextExperts.forward`` on slot-stacked weights, bit for bit.

    It runs every expert over its copy of the tokens scaled by the router's scores, zero for
    the experts a token did not pick: their rows come out zero, exactly. So only the routed
    experts (``routed``: ascending ids, one list per chunk) are computed, by the same batched
    matmuls; each expert's result does not depend on the others in the batch.
    routed_in [E*T, D] -> [E*T, D].
    """
    num_experts, hidden_dim = int(inner.num_experts), int(inner.hidden_size)
    hidden = routed_in.view(num_experts, -1, hidden_dim)  # [E, T, D]
    out = torch.zeros_like(hidden)  # [E, T, D]: the unrouted experts' exact zeros
    for chunk, routed_ids in enumerate(routed):
        slab, slot_of = get(chunk)
        ids = [e for e in routed_ids if e in slot_of]  # an auto lease's chunk: the experts placed here
        if slab is None or not ids:
            continue
        here = slab.device
        slots = torch.tensor([slot_of[e] for e in ids], dtype=torch.long, device=here)
        index = torch.tensor(ids, dtype=torch.long, device=hidden.device)
        (mine,) = on(here, hidden[index])
        gate_up = torch.bmm(mine, slab["gate_up_proj"][slots])  # [n, T, 2F]
        gate, up = gate_up.chunk(2, dim=-1)  # [n, T, F]
        out[index] = torch.bmm(up * inner.act_fn(gate), slab["down_proj"][slots]).to(out.device)  # [n, T, D]
    return out.view(-1, hidden_dim)  # [E*T, D]
