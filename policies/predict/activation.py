"""Activation matrices (MoE-Infinity's request-level matching, arXiv 2401.14361), one per generation.

Each generation builds an activation matrix, its layer x expert choice counts so far. A
finished generation's matrix joins the tenant's library (at most ``library`` matrices, the
oldest replaced first; MoE-Infinity keeps up to 1,000). While a generation runs, its matrix
is matched by cosine similarity against the library, and the best match's choice rates
at the coming layers are the prediction, damped by layer distance:
``P(x at layer j) = rate_match[j, x] * (1 - (ahead - 1) / L)`` (MoE-Infinity prefetches
nearer layers first in the same way). With no match yet (an empty library, or no
overlap), the library's mean rates stand in.

Cosine similarity is kept incrementally: each observation adds the chosen experts'
library entries to the generation's dot products, so matching costs O(library) per step,
not O(library x L x E). The library is the warm-start state (`state`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from expertd.policies.base import PolicyError
from expertd.policies.predict.predictor import (
    Generation,
    ProbabilityPredictor,
    RecentGenerations,
    RowParams,
    check_state,
    pack_array,
    register_predictor,
    state_header,
    unpack_array,
)


@dataclasses.dataclass(frozen=True)
class ActivationParams(RowParams):
    """``library``: past matrices kept; ``min_tokens``: a generation's tokens before it is kept."""

    library: int = 1000
    min_tokens: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.library < 1:
            raise ValueError(f"library must be >= 1, got {self.library!r}")
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens!r}")


class _Running:
    """One generation's matrix, its squared norm, and its dot product with each library entry."""

    __slots__ = ("counts", "dots", "norm2", "tokens", "last")

    def __init__(self, shape: tuple[int, int], library: int) -> None:
        self.counts = np.zeros(shape, dtype=np.float32)  # [L, E]
        self.dots = np.zeros(library)  # [N]
        self.norm2 = 0.0
        self.tokens = 0
        self.last = 1 << 30


@register_predictor("activation-matrix")
class ActivationMatrix(ProbabilityPredictor):
    """MoE-Infinity's request-level activation matching, per generation; see the module docstring."""

    Params = ActivationParams
    MAX_GENERATIONS = 1024

    def __init__(self, geometry, params=None) -> None:
        super().__init__(geometry, params)
        shape = (geometry.num_layers, geometry.num_experts)
        self._shape = shape
        self.matrices = np.zeros((self.params.library, *shape), dtype=np.float32)  # [N, L, E]
        self.norms = np.zeros(self.params.library)  # [N]
        self.tokens = np.ones(self.params.library)  # [N] tokens of each entry's generation
        self.size = 0  # library entries filled
        self._next = 0  # the entry the next finished generation replaces
        self._sum = np.zeros(shape)  # [L, E] sum of the library's choice rates, for the fallback
        self._running: RecentGenerations[_Running] = RecentGenerations(self.MAX_GENERATIONS)

    def _new_running(self) -> _Running:
        return _Running(self._shape, self.params.library)

    def learn(self, generation: Generation, layer: int, experts: Sequence[int]) -> None:
        run = self._running.touch(generation, self._new_running)
        if layer <= run.last:
            run.tokens += 1
        run.last = layer
        chosen = list(experts)
        row = run.counts[layer]  # [E]
        run.norm2 += float(2.0 * row[chosen].sum() + len(chosen))
        row[chosen] += 1.0
        if self.size:
            run.dots[: self.size] += self.matrices[: self.size, layer][:, chosen].sum(axis=1)

    def match(self, generation: Generation) -> int | None:
        """The library entry most similar to ``generation``'s matrix so far, or None."""
        run = self._running.get(generation)
        if run is None or not self.size or run.norm2 <= 0.0:
            return None
        cosine = run.dots[: self.size] / (self.norms[: self.size] * np.sqrt(run.norm2))
        best = int(np.argmax(cosine))
        return best if cosine[best] > 0.0 else None

    def rows(self, generation: Generation, layer: int, n: int) -> np.ndarray:
        best = self.match(generation)
        if best is not None:
            rates = self.next_rows(self.matrices[best], layer, n) / self.tokens[best]  # [n, E]
        elif self.size:
            rates = self.next_rows(self._sum, layer, n) / self.size
        else:
            return np.zeros((n, self.geometry.num_experts))
        ahead = np.arange(n, dtype=np.float64)[:, None]  # [n, 1]: steps ahead - 1
        return np.minimum(rates * (1.0 - ahead / self.geometry.num_layers), 1.0)

    def forget(self, generation: Generation) -> None:
        super().forget(generation)
        run = self._running.pop(generation, None)
        if run is not None and run.tokens >= self.params.min_tokens:
            self.add(run.counts, run.tokens)

    def add(self, counts: np.ndarray, tokens: int) -> None:
        """Put a finished generation's matrix ``counts`` [L, E] of ``tokens`` tokens in the library."""
        entry = self._next
        if self.size == self.params.library:
            self._sum -= self.matrices[entry] / self.tokens[entry]
        self.matrices[entry] = counts
        self.tokens[entry] = tokens
        self.norms[entry] = float(np.sqrt(np.square(counts, dtype=np.float64).sum()))
        self._sum += self.matrices[entry] / tokens
        self.size = max(self.size, entry + 1)
        self._next = (entry + 1) % self.params.library
        flat = self.matrices[entry].reshape(-1).astype(np.float64)
        for run in self._running.values():  # the entry changed under the running generations
            run.dots[entry] = float(run.counts.reshape(-1) @ flat)

    def state(self) -> dict[str, Any]:
        order = [(self._next + i) % self.size for i in range(self.size)] if self.size else []
        return {
            **state_header(self.name, self.geometry),
            "matrices": pack_array(self.matrices[order]),
            "tokens": pack_array(self.tokens[order]),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        check_state(state, self.name, self.geometry)
        tokens = unpack_array(state["tokens"])
        matrices = unpack_array(state["matrices"], (len(tokens), *self._shape))
        if (tokens < 1).any():
            raise PolicyError(f"{self.name}: saved token counts must be >= 1")
        keep = self.params.library
        for counts, n in zip(matrices[-keep:], tokens[-keep:].tolist(), strict=True):
            self.add(counts, int(n))
