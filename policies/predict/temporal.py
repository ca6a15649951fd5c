"""Temporal predictor: a layer's next experts are the ones this generation chose there lately.

Routing is consistent across a generation's tokens (the next token reuses about a third
of a token's experts at the same layer on our traces). Per generation and layer, a
decayed count of how often each expert was chosen: ``c <- decay * c + chosen``, so an
expert chosen at every computation converges to ``1 / (1 - decay)``; its probability
of being chosen next time is estimated as ``c * (1 - decay)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from expertd.policies.predict.predictor import Generation, ProbabilityPredictor, RowParams, register_predictor


@dataclasses.dataclass(frozen=True)
class TemporalParams(RowParams):
    """``decay``: weight of the past (plus `RowParams`)."""

    decay: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay!r}")


@register_predictor("temporal")
class Temporal(ProbabilityPredictor):
    """Per generation, per layer: decayed choice counts; predicts the largest."""

    Params = TemporalParams

    def __init__(self, geometry, params=None) -> None:
        super().__init__(geometry, params)
        self._counts: dict[Generation, np.ndarray] = {}  # generation -> [L, E] float64

    def learn(self, generation: Generation, layer: int, experts: Sequence[int]) -> None:
        counts = self._counts.get(generation)
        if counts is None:
            shape = (self.geometry.num_layers, self.geometry.num_experts)
            counts = self._counts[generation] = np.zeros(shape)
        row = counts[layer]  # [E]
        row *= self.params.decay
        row[list(experts)] += 1.0

    def rows(self, generation: Generation, layer: int, n: int) -> np.ndarray:
        counts = self._counts.get(generation)
        if counts is None:
            return np.zeros((n, self.geometry.num_experts))
        return np.minimum(self.next_rows(counts, layer, n) * (1.0 - self.params.decay), 1.0)  # [n, E]

    def forget(self, generation: Generation) -> None:
        super().forget(generation)
        self._counts.pop(generation, None)
