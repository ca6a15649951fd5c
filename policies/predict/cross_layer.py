"""Cross-layer predictor: which experts layer l+d chooses after layer l chose expert e.

Per tenant (one predictor each), online and decayed: for each distance d in
``1..reach``, a table ``follow[d][l, e, x]`` of how often expert x was chosen at layer
l+d in the tokens whose layer l chose e, and ``seen[d][l, e]``, how often e was chosen
at l with layer l+d observed after it. ``P(x at l+d | e at l)`` is
``(follow + prior * marginal) / (seen + prior)``: the table shrunk towards the tenant's
marginal choice rate of layer l+d while e is rarely seen. Only the rows of the experts
just chosen decay (``decay`` per observation), so rare experts keep their statistics.

A layer of the current token within ``reach`` of the layer just observed is predicted
from that layer's choice (a top-k choice averages its k rows); others, and the next
token's layers, get the marginal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

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

_RENORMALIZE_ABOVE = 1e100  # fold the lazy decay back into a row's counts before overflow
_MARGINAL_FLOOR = 1e-12


@dataclasses.dataclass(frozen=True)
class CrossLayerParams(RowParams):
    """``reach``: distances learned; ``decay``: per observation; ``prior``: marginal's weight."""

    reach: int = 3
    decay: float = 0.999
    prior: float = 2.0
    marginal_decay: float = 0.995

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reach < 1:
            raise ValueError(f"reach must be >= 1, got {self.reach!r}")
        for name in ("decay", "marginal_decay"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if self.prior <= 0.0:
            raise ValueError(f"prior must be > 0, got {self.prior!r}")


class Token:
    """The current token of one generation: the experts each of its layers chose so far."""

    __slots__ = ("chosen", "last")

    def __init__(self) -> None:
        self.chosen: dict[int, list[int]] = {}
        self.last = -1

    def add(self, layer: int, experts: Sequence[int]) -> None:
        if layer <= self.last:  # the layers start over: a new token
            self.chosen = {}
        self.chosen[layer] = list(experts)
        self.last = layer


@register_predictor("cross-layer")
class CrossLayer(ProbabilityPredictor):
    """Decayed transition tables from layer l's choice to layers l+1..l+reach; see the module."""

    Params = CrossLayerParams
    MAX_GENERATIONS = 1024

    def __init__(self, geometry, params=None) -> None:
        super().__init__(geometry, params)
        layers, experts, reach = geometry.num_layers, geometry.num_experts, self.params.reach
        # Counts are kept scaled up by _boost / grow (lazy decay): divide to read them.
        self.follow = np.zeros((reach, layers, experts, experts))  # [D, L, E, E]
        self.seen = np.zeros((reach, layers, experts))  # [D, L, E]
        self._boost = np.ones((reach, layers, experts))  # [D, L, E] weight of the next observation
        # [L, E] decayed choices per computation of each layer (rows sum to top-k, in time)
        self.marginal = np.full((layers, experts), 1.0 / experts)
        self.widest = 1  # top-k, as observed
        self._none = np.zeros((0, experts))
        self._tokens: RecentGenerations[Token] = RecentGenerations(self.MAX_GENERATIONS)

    def learn(self, generation: Generation, layer: int, experts: Sequence[int]) -> None:
        token = self._tokens.touch(generation, Token)
        token.add(layer, experts)
        chosen = list(experts)
        self.widest = max(self.widest, len(chosen))
        follow, seen, boost, grow = self.follow, self.seen, self._boost, 1.0 / self.params.decay
        for d in range(1, min(self.params.reach, layer) + 1):
            before = token.chosen.get(layer - d)
            if before is None:
                continue
            source = layer - d
            for e in before:
                # Decay by growing the weight of new observations instead of shrinking old ones.
                weight = float(boost[d - 1, source, e])
                row = follow[d - 1, source, e]  # [E], a view
                if len(chosen) == 1:
                    row[chosen[0]] += weight
                else:
                    row[chosen] += weight
                seen[d - 1, source, e] += weight
                boost[d - 1, source, e] = weight * grow
                if weight > _RENORMALIZE_ABOVE:
                    row /= weight
                    seen[d - 1, source, e] /= weight
                    boost[d - 1, source, e] = grow
        row = self.marginal[layer]  # [E]
        row *= self.params.marginal_decay
        row += _MARGINAL_FLOOR  # a rate decayed to nothing still has a log
        gain = 1.0 - self.params.marginal_decay
        for x in chosen:
            row[x] += gain

    def rows(self, generation: Generation, layer: int, n: int) -> np.ndarray:
        out = self.next_rows(self.marginal, layer, n).copy()  # [n, E]
        near = self.near(generation, layer, n)
        out[: len(near)] = near
        return out

    def near(self, generation: Generation, layer: int, n: int) -> np.ndarray:
        """[m, E] rows of the first ``m`` of the next ``n`` computations: this token's, within reach."""
        token = self._tokens.get(generation)
        if token is None or token.last != layer:
            return self._none
        n = min(n, self.params.reach, self.geometry.num_layers - 1 - layer)
        if n <= 0:
            return self._none
        prior, decay = self.params.prior, self.params.decay
        before = token.chosen[layer]
        # (follow / scale + prior * m) / (seen / scale + prior), scale: the lazy decay
        if len(before) == 1:
            e = before[0]
            weight = prior * decay * self._boost[:n, layer, e][:, None]  # [n, 1]
            follow = self.follow[:n, layer, e]  # [n, E]
            seen = self.seen[:n, layer, e][:, None]  # [n, 1]
            return (follow + weight * self.marginal[layer + 1 : layer + n + 1]) / (seen + weight)
        weight = prior * decay * self._boost[:n, layer][:, before, None]  # [n, k, 1]
        follow = self.follow[:n, layer][:, before]  # [n, k, E]
        seen = self.seen[:n, layer][:, before, None]  # [n, k, 1]
        marginal = self.marginal[layer + 1 : layer + n + 1, None]  # [n, 1, E]
        return ((follow + weight * marginal) / (seen + weight)).mean(axis=1)

    def forget(self, generation: Generation) -> None:
        super().forget(generation)
        self._tokens.pop(generation, None)

    def state(self) -> dict[str, Any]:
        # The tables as kept (counts scaled by the lazy decay, with the scale): exact on reload.
        return {
            **state_header(self.name, self.geometry),
            "reach": self.params.reach,
            "decay": self.params.decay,
            "widest": self.widest,
            "follow": pack_array(self.follow),
            "seen": pack_array(self.seen),
            "boost": pack_array(self._boost),
            "marginal": pack_array(self.marginal),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        check_state(state, self.name, self.geometry)
        saved = int(state["reach"])
        reach = min(saved, self.params.reach)
        layers, experts = self.geometry.num_layers, self.geometry.num_experts
        follow = unpack_array(state["follow"], (saved, layers, experts, experts))
        seen = unpack_array(state["seen"], (saved, layers, experts))
        boost = unpack_array(state["boost"], (saved, layers, experts))
        # Saved with another decay: keep the decayed counts, restart the lazy scale.
        rescale = float(state["decay"]) != self.params.decay
        self.follow[:] = 0.0
        self.seen[:] = 0.0
        self._boost[:] = 1.0 / self.params.decay
        if rescale:
            scale = boost[:reach] * float(state["decay"])  # [D, L, E]
            self.follow[:reach] = follow[:reach] / scale[..., None]
            self.seen[:reach] = seen[:reach] / scale
        else:
            self.follow[:reach] = follow[:reach]
            self.seen[:reach] = seen[:reach]
            self._boost[:reach] = boost[:reach]
        self.marginal = unpack_array(state["marginal"], (layers, experts)).astype(np.float64)
        self.widest = int(state["widest"])
