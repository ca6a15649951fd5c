"""A sparse MoE block (Mixtral / Qwen-MoE style) whose expert weights come from expertd.

The router is a Linear gate the block owns; the experts are SwiGLU FFNs
``down(silu(gate(x)) * up(x))`` whose weights an `ExpertSource` provides: `ClientExperts`
leases them from the daemon (zero-copy views of its slabs), `MemoryExperts` holds them in
a dict (the reference). Both paths run the one function `moe_experts`, so their outputs
are equal bit for bit.

Shape legend: T tokens, D hidden size, F expert FFN size, E routed experts per layer,
k experts per token, t tokens routed to one expert.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from expertd.client.client import ExpertClient
from expertd.client.host_compute import HOST, HostCompute, on
from expertd.daemon.protocol import AUTO_TIER, MAX_EXPERTS_PER_MESSAGE


class ExpertReader(Protocol):
    """What `MemoryExperts.from_store` reads through (`expertd.daemon.store.reader.StoreReader`)."""

    @property
    def manifest(self) -> Any: ...

    def read_expert_tensors(self, layer: int, expert: int) -> ExpertWeights: ...


ExpertWeights = Mapping[str, Tensor]  # one expert's tensors by checkpoint name

#: (gate, up, down) tensor names of a SwiGLU expert, per checkpoint naming.
SWIGLU_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The shape and routing of one sparse MoE layer."""

    hidden_size: int  # D
    num_experts: int  # E
    top_k: int = 2  # k
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1 (Mixtral, Qwen3)
    hint_top_n: int = 0  # with a next-layer router: hint its n best experts (0: every routed one)

    def __post_init__(self) -> None:
        assert 1 <= self.top_k <= self.num_experts, (
            f"top_k must be in [1, {self.num_experts}], got {self.top_k}"
        )


def swiglu_names(tensor_names: Iterable[str]) -> tuple[str, str, str]:
    """The (gate, up, down) names of an expert layout; `ValueError` unless it is exactly SwiGLU.

    Extra tensors (FP8 scales, biases, fused gate_up) would change the math: refused, not ignored.
    """
    present = set(tensor_names)
    for names in SWIGLU_NAMES:
        if set(names) == present:
            return names
    known = " or ".join("/".join(n) for n in SWIGLU_NAMES)
    raise ValueError(f"expert layout {sorted(present)} is not a plain SwiGLU expert ({known})")


def route(router_logits: Tensor, top_k: int, norm_topk_prob: bool) -> tuple[Tensor, Tensor]:
    """Softmax over experts (in float32), top-k: (weights [T, k] float32, experts [T, k])."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, k], [T, k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)  # [T, k]
    return weights, experts


def expert_ffn(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; x [t, D], gate/up [F, D], down [D, F] -> [t, D]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)  # [t, D]


def moe_experts(
    x: Tensor,
    weights: Tensor,
    experts: Tensor,
    expert_weights: Callable[[int], ExpertWeights],
    names: tuple[str, str, str],
) -> Tensor:
    """Each routed expert over its tokens, weighted and summed in float32, in expert id order.

    x [T, D]; weights [T, k] float32; experts [T, k]; ``expert_weights(e)`` gives expert e's
    tensors. Returns [T, D] in x's dtype. This is the one computation both paths share.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, D]
    add_experts(out, x, weights, experts, torch.unique(experts).tolist(), expert_weights, names)
    return out.to(x.dtype)


def add_experts(
    out: Tensor,
    x: Tensor,
    weights: Tensor,
    experts: Tensor,
    which: list[int],
    expert_weights: Callable[[int], ExpertWeights],
    names: tuple[str, str, str],
    *,
    on_host: frozenset[int] = frozenset(),
    host: HostCompute | None = None,
) -> None:
    """Add the experts ``which`` (ascending ids) of `moe_experts` into ``out`` [T, D] float32.

    Called on consecutive ascending runs of the routed experts, it sums in the same order
    as one call over all of them: the result is the same, bit for bit.

    Experts in ``on_host`` (weights on the CPU) are computed by ``host``'s threads while this
    thread computes the others on ``out``'s device; every contribution is then added on the
    device in expert-id order, so the sum is the one the single loop makes.
    """
    hosted = [e for e in which if e in on_host]
    if not hosted:
        for expert in which:
            token, contribution = _contribution(x, weights, experts, expert, expert_weights(expert), names)
            out.index_add_(0, token, contribution)  # [T, D]
        return
    assert host is not None, "host-placed experts need a HostCompute"
    x_cpu, weights_cpu, experts_cpu = on(torch.device("cpu"), x, weights, experts)
    futures = {  # the CPU starts on these while the device gets its own
        e: host.submit(_contribution, x_cpu, weights_cpu, experts_cpu, e, expert_weights(e), names)
        for e in hosted
    }
    done = {
        e: _contribution(x, weights, experts, e, expert_weights(e), names) for e in which if e not in futures
    }
    for expert in which:
        token, contribution = done[expert] if expert in done else futures[expert].result()
        out.index_add_(0, token.to(out.device), contribution.to(out.device))  # [T, D]


def _contribution(
    x: Tensor, weights: Tensor, experts: Tensor, expert: int, w: ExpertWeights, names: tuple[str, str, str]
) -> tuple[Tensor, Tensor]:
    """Expert ``expert``'s tokens [t] and its weighted output over them [t, D] float32."""
    gate_name, up_name, down_name = names
    token, rank = torch.where(experts == expert)  # [t], [t]
    h = expert_ffn(x[token], w[gate_name], w[up_name], w[down_name])  # [t, D]
    return token, h.float() * weights[token, rank, None]


class ExpertSource(Protocol):
    """Where a block gets expert weights: a lease of ``experts`` of ``layer``, and hints.

    ``max_per_acquire``: the most experts one `experts` call may ask for (None: no limit).
    A source may take ``tokens`` (tokens routed to each expert) and give a lease with
    ``place_of(expert)``: "host" means the weights are CPU tensors the block computes on
    its `HostCompute` threads.
    """

    tensor_names: tuple[str, ...]
    max_per_acquire: int | None

    def experts(self, layer: int, experts: list[int]) -> contextlib.AbstractContextManager[Any]:
        """A context giving ``[expert id] -> ExpertWeights`` while the weights are pinned."""
        ...

    def hint(self, layer: int, experts: list[int], scores: list[float]) -> None: ...


class ClientExperts:
    """Expert weights leased from expertd through an `ExpertClient` (zero-copy views).

    ``tier="auto"``: the daemon places each expert on the device or the host tier; the block
    computes host-placed ones on the CPU (`HostCompute`).
    """

    def __init__(self, client: ExpertClient, tier: str | None = None) -> None:
        self.client = client
        self.tier = tier
        self.wants_tokens = tier == AUTO_TIER
        self.max_per_acquire: int | None
        tiers = client.info.get("tiers", {})
        named = (
            [t for t in tiers if t in ("device", "host")]
            if tier == AUTO_TIER
            else [tier or client.default_tier]
        )
        infos = [tiers[t] for t in named if t in tiers]  # unknown: acquire says so
        if infos:  # the most this client may pin at once (older daemons: the whole tier)
            pinnable = min(int(info.get("max_pinned", info["slots"])) for info in infos)
            self.max_per_acquire = min(pinnable, MAX_EXPERTS_PER_MESSAGE)
        else:
            self.max_per_acquire = None

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.client.tensor_names

    def experts(
        self, layer: int, experts: list[int], tokens: list[int] | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        return self.client.acquire(layer, experts, self.tier, tokens if self.wants_tokens else None)

    def hint(self, layer: int, experts: list[int], scores: list[float]) -> None:
        self.client.hint(layer, experts, scores)


class MemoryExperts:
    """Expert weights held in memory: ``weights[layer][expert][name]`` (the reference)."""

    max_per_acquire: int | None = None  # everything is in memory already

    def __init__(self, weights: Mapping[int, Mapping[int, ExpertWeights]]) -> None:
        self.weights = weights
        first_layer = next(iter(weights.values()))
        self.tensor_names = tuple(next(iter(first_layer.values())))
        self.hints: list[tuple[int, list[int], list[float]]] = []

    @classmethod
    def from_store(cls, reader: ExpertReader, layers: Iterable[int]) -> MemoryExperts:
        """Every expert of ``layers``, read and verified through ``reader``."""
        num_experts = reader.manifest.num_experts
        return cls(
            {layer: {e: reader.read_expert_tensors(layer, e) for e in range(num_experts)} for layer in layers}
        )

    def experts(self, layer: int, experts: list[int]) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext(self.weights[layer])

    def hint(self, layer: int, experts: list[int], scores: list[float]) -> None:
        self.hints.append((layer, experts, scores))


def _on_host(lease: Any, expert: int, device: torch.device) -> bool:
    """Is ``expert`` of ``lease`` computed on the host threads? When an auto lease placed it
    on the host, or when a host-tier lease feeds a block that runs on a GPU (n-cpu-moe style);
    a host lease of a block on the CPU is computed in line, as always."""
    place_of = getattr(lease, "place_of", None)
    if place_of is None or place_of(expert) != HOST:
        return False
    return getattr(lease, "places", None) is not None or device.type != "cpu"


class MoEBlock(nn.Module):
    """One sparse MoE layer: a router the block owns, SwiGLU experts from an `ExpertSource`.

    With ``next_router`` (the next layer's gate), `forward` first hints the experts that gate
    picks for this layer's input, so the daemon can load them while this layer computes.
    """

    def __init__(
        self,
        config: MoEConfig,
        layer: int,
        source: ExpertSource,
        *,
        next_router: nn.Linear | None = None,
        dtype: torch.dtype = torch.bfloat16,
        host: HostCompute | None = None,
    ) -> None:
        """``host``: the CPU threads for host-placed experts (a ``tier="auto"`` source); made on
        first need with `default_threads` if None."""
        super().__init__()
        assert dtype in COMPUTE_DTYPES, f"dtype must be one of {COMPUTE_DTYPES}, got {dtype}"
        self.config = config
        self.layer = layer
        self.source = source
        self.names = swiglu_names(source.tensor_names)
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False, dtype=dtype)
        self.next_router = next_router
        self.host = host

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]: route every token to its top-k experts and mix their outputs."""
        cfg = self.config
        assert x.shape[-1] == cfg.hidden_size, f"x has hidden size {x.shape[-1]}, expected {cfg.hidden_size}"
        flat = x.reshape(-1, cfg.hidden_size)  # [T, D]
        weights, experts = route(self.gate(flat), cfg.top_k, cfg.norm_topk_prob)  # [T, k], [T, k]
        if self.next_router is not None:
            self.hint_next_layer(flat)
        limit = getattr(self.source, "max_per_acquire", None)  # sources written before it: no limit
        counts: list[int] | None = None
        if getattr(self.source, "wants_tokens", False):  # tokens per expert; one copy to the host
            counts = torch.bincount(experts.flatten().cpu(), minlength=cfg.num_experts).tolist()  # [E]
            needed = [e for e, n in enumerate(counts) if n]  # ascending
        else:
            needed = torch.unique(experts).tolist()  # ascending
        step = len(needed) if limit is None or len(needed) <= limit else max(1, limit // 2)
        # More experts than one acquire may hold (a prefill on a small tier): lease them in
        # chunks of half that, as `expertd.client.hf` does, instead of being refused.
        acc = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)  # [T, D]
        for start in range(0, len(needed), step):  # ascending runs: the same sum, bit for bit
            chunk = needed[start : start + step]
            with self._lease(chunk, counts) as lease:
                on_host = frozenset(e for e in chunk if _on_host(lease, e, flat.device))
                host = self._host_compute() if on_host else None
                add_experts(
                    acc,
                    flat,
                    weights,
                    experts,
                    chunk,
                    lease.__getitem__,
                    self.names,
                    on_host=on_host,
                    host=host,
                )
        return acc.to(x.dtype).reshape(x.shape)

    def _host_compute(self) -> HostCompute:
        if self.host is None:  # the default rule needs the daemon's reader threads (its hello)
            client = getattr(self.source, "client", None)
            info = getattr(client, "info", None)
            self.host = HostCompute(hello_info=info, address=getattr(client, "address", "ipc://"))
        return self.host

    def _lease(self, chunk: list[int], counts: list[int] | None) -> contextlib.AbstractContextManager[Any]:
        if counts is None:
            return self.source.experts(self.layer, chunk)
        return self.source.experts(self.layer, chunk, [counts[e] for e in chunk])  # type: ignore[call-arg]

    def hint_next_layer(self, x: Tensor) -> None:
        """Hint layer+1's experts as its router ranks them for ``x`` [T, D] (summed top-k prob)."""
        assert self.next_router is not None, "hint_next_layer needs next_router"
        with torch.no_grad():
            weights, experts = route(self.next_router(x), self.config.top_k, False)  # [T, k], [T, k]
            score = torch.zeros(self.config.num_experts, dtype=torch.float32)  # [E]
            score.index_add_(0, experts.flatten().cpu(), weights.flatten().cpu())
            order = torch.argsort(score, descending=True, stable=True)  # [E]
            order = order[score[order] > 0]
            if self.config.hint_top_n:
                order = order[: self.config.hint_top_n]
        self.source.hint(self.layer + 1, order.tolist(), score[order].tolist())
