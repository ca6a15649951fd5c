"""Temporal predictor: a layer's next experts are the ones this request chose there lately.

Routing is consistent across a request's tokens (the next token reuses about a third
of a token's experts at the same layer on our traces). Per request and layer, a
decayed count of how often each expert was chosen: ``c <- decay * c + chosen``, so an
expert chosen at every computation converges to ``1 / (1 - decay)``; its probability
of being chosen next time is estimated as ``c * (1 - decay)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from expertd.policies.predictor import Prediction, Predictor, Request, register_predictor


@dataclasses.dataclass(frozen=True)
class TemporalParams:
    """``decay``: weight of the past; ``width``: candidates per layer at most."""

    decay: float = 0.6
    width: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay!r}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width!r}")


@register_predictor("temporal")
class Temporal(Predictor):
    """Per request, per layer: decayed choice counts; predicts the largest."""

    Params = TemporalParams

    def __init__(self, geometry, params=None) -> None:
        super().__init__(geometry, params)
        self._counts: dict[Request, np.ndarray] = {}  # request -> [L, E] float32

    def observe(self, request: Request, layer: int, experts: Sequence[int]) -> None:
        counts = self._counts.get(request)
        if counts is None:
            shape = (self.geometry.num_layers, self.geometry.num_experts)
            counts = self._counts[request] = np.zeros(shape, dtype=np.float32)
        row = counts[layer]  # [E]
        row *= self.params.decay
        row[list(experts)] += 1.0

    def predict(self, request: Request, layer: int, horizon: int) -> list[Prediction]:
        counts = self._counts.get(request)
        if counts is None:
            return []
        scale = 1.0 - self.params.decay
        out: list[Prediction] = []
        num_layers = self.geometry.num_layers
        for ahead in range(1, min(horizon, num_layers) + 1):
            target = (layer + ahead) % num_layers
            row = counts[target]  # [E]
            top = np.argsort(row)[::-1][: self.params.width]
            for expert in top.tolist():
                prob = min(1.0, float(row[expert]) * scale)
                if prob > 0.0:
                    out.append(Prediction(target, expert, prob, ahead))
        return out

    def forget(self, request: Request) -> None:
        self._counts.pop(request, None)
