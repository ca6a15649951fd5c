"""Record a transformers MoE model's routing into an `.etrace`: `record(model, path)`.

    with record(model, "mine.etrace") as recorder:
        model.generate(prompt_ids, max_new_tokens=64)    # prefill and decode both recorded
    # expertd replay mine.etrace --timed                 # the policies on your own routing

Forward hooks on the model's routers (unchanged, with or without `expertd.client.hf.offload`)
see every pass's top-k experts and gate weights; a pre-hook on the decoder model sees which
batch rows are real tokens and whether a pass starts a new generation (an empty cache). A
new generation gives each batch row a new request; padding is not recorded. Rows are kept
per request and written in the trace's token order (request, token, layer) at the end, each
token's experts highest weight first with their weights as scores, and the phase: prefill for
the prompt's tokens, decode for generated ones.

The trace's layers are the model's MoE layers (0..L-1, the store's numbering); the decoder
layer of each is in ``meta.extra["checkpoint_layers"]``.

Replay treats every token as its own forward pass. Decode passes of one sequence are exactly
that, so a replay of them matches a live daemon's counters; a prefill pass acquires each
layer's experts once for all its tokens, which the replay counts token by token.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from expertd.client.hf_layers import (
    ForwardPass,
    MoELayer,
    decoder_model,
    find_moe_layers,
    forward_pass,
    rank_routing,
)
from expertd.traces.format import PHASE_DECODE, PHASE_PREFILL, TraceMeta, TraceWriter


class _Request:
    """One batch row's generation: its rows so far, one array per recorded pass."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tokens = 0
        self.parts: list[tuple[np.ndarray, ...]] = []  # (token, layer, experts, scores, phase)


class Recorder:
    """Hooks that collect routing; `close` writes the trace. Made by `record`."""

    def __init__(
        self, model: nn.Module, path: str | os.PathLike[str], *, model_name: str | None = None
    ) -> None:
        self.path = Path(path)
        self.layers: list[MoELayer] = find_moe_layers(model, offloaded_ok=True)
        config = getattr(model, "config", None)
        self.model_name = model_name or getattr(config, "_name_or_path", "") or type(model).__name__
        self.model_type = str(getattr(config, "model_type", ""))
        self.num_experts = self.layers[0].num_experts
        self.top_k: int | None = None
        self.requests: list[_Request] = []
        self._batch: list[_Request] = []  # the requests of the generation in progress, by batch row
        self._pass: ForwardPass | None = None
        self._routing: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (experts, weights) [T, k]
        self._names: list[str] = []
        self.passes = 0
        self.closed = False
        self._hooks = [
            decoder_model(model, self.layers).register_forward_pre_hook(self._before, with_kwargs=True),
            decoder_model(model, self.layers).register_forward_hook(self._after),
        ]
        self._hooks += [x.router.register_forward_hook(self._router_hook(x.index)) for x in self.layers]

    def name_next(self, *names: str) -> None:
        """Names for the next generation's requests (batch rows in order); default ``request-N``."""
        self._names = list(names)

    @property
    def rows(self) -> int:
        return sum(len(part[0]) for request in self.requests for part in request.parts)

    # --- hooks ------------------------------------------------------------------------------

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        info = forward_pass(args, kwargs)
        if info.new_generation or len(self._batch) != info.batch:
            self._batch = []
            for row in range(info.batch):
                name = self._names[row] if row < len(self._names) else f"request-{len(self.requests)}"
                if any(r.name == name for r in self.requests):
                    raise ValueError(f"request name {name!r} was recorded already")
                self._batch.append(_Request(name))
                self.requests.append(self._batch[-1])
            self._names = []
        self._pass = info
        self._routing = {}

    def _router_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._pass is not None:  # a router called outside a pass (a hint) is not routing
                self._routing[index] = (output[2].detach(), output[1].detach())

        return hook

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        info, self._pass = self._pass, None
        if info is None or len(self._routing) != len(self.layers):
            return  # a pass that never reached the MoE layers (or was interrupted)
        ranked = [rank_routing(*self._routing[x.index]) for x in self.layers]
        experts = torch.stack([e for e, _ in ranked]).numpy()  # [L, B*T, k]
        scores = torch.stack([w for _, w in ranked]).numpy()  # [L, B*T, k]
        num_layers, _, top_k = experts.shape
        if self.top_k is None:
            self.top_k = top_k
        experts = experts.reshape(num_layers, info.batch, info.tokens, top_k)
        scores = scores.reshape(num_layers, info.batch, info.tokens, top_k)
        phase = PHASE_PREFILL if info.is_prefill else PHASE_DECODE
        for row, request in enumerate(self._batch):
            real = np.ones(info.tokens, bool) if info.mask is None else info.mask[row].numpy()
            count = int(real.sum())
            if not count:
                continue
            tokens = np.repeat(np.arange(request.tokens, request.tokens + count), num_layers)  # [n*L]
            layers = np.tile(np.arange(num_layers), count)  # [n*L]
            e = experts[:, row, real].transpose(1, 0, 2).reshape(-1, top_k)  # [n*L, k], token-major
            s = scores[:, row, real].transpose(1, 0, 2).reshape(-1, top_k)
            request.parts.append((tokens, layers, e, s, np.full(len(tokens), phase, np.uint8)))
            request.tokens += count
        self.passes += 1

    # --- the file ---------------------------------------------------------------------------

    def close(self) -> Path | None:
        """Remove the hooks and write the trace (None, and no file, if nothing was recorded)."""
        if self.closed:
            return self.path if self.path.exists() else None
        self.closed = True
        for hook in self._hooks:
            hook.remove()
        requests = [r for r in self.requests if r.parts]
        if not requests or self.top_k is None:
            return None
        meta = TraceMeta(
            model=self.model_name,
            num_layers=len(self.layers),
            num_experts=self.num_experts,
            top_k=self.top_k,
            source="expertd.traces.record",
            requests=[r.name for r in requests],
            extra={
                "model_type": self.model_type,
                "checkpoint_layers": [x.decoder_layer for x in self.layers],
                "expert_bytes": self.layers[0].expert_bytes,  # for `expertd replay --timed --expert-mb`
                "passes": self.passes,
            },
            has_scores=True,
            has_phase=True,
        )
        with TraceWriter(self.path, meta) as writer:
            for request_id, request in enumerate(requests):
                for tokens, layers, experts, scores, phase in request.parts:
                    writer.append(request_id, tokens, layers, experts, scores, phase)
        return self.path


@contextlib.contextmanager
def record(
    model: nn.Module, path: str | os.PathLike[str], *, model_name: str | None = None
) -> Iterator[Recorder]:
    """Record every forward pass's routing of ``model`` while the block runs; write ``path`` at the end.

    The trace is written even if the block fails (what ran was real routing).
    """
    recorder = Recorder(model, path, model_name=model_name)
    try:
        yield recorder
    finally:
        recorder.close()
