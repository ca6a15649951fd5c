"""Client gate hints only: predicts exactly what clients hinted, nothing from history.

A client that applies layer l+1's router to layer l's hidden state (the speculative
gating of mixtral-offloading's paper, Pre-gated MoE) knows the next layer's experts
better than any history; `hint` passes that ranking on. Every `ProbabilityPredictor`
ranks hints above its own guesses; this one has no guesses of its own, for clients
that hint every layer and want no prefetch beyond their hints.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from expertd.policies.predict.predictor import Generation, ProbabilityPredictor, register_predictor


@register_predictor("hints")
class Hints(ProbabilityPredictor):
    """The hinted experts with probability ``hint_prob``; nothing else."""

    def learn(self, generation: Generation, layer: int, experts: Sequence[int]) -> None:
        pass

    def rows(self, generation: Generation, layer: int, n: int) -> np.ndarray:
        return np.zeros((n, self.geometry.num_experts))
