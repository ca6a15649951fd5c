"""Forward steps in a flat access sequence, for the policies that follow the layer order.

A step is ``(t_start, forward, layer)``: forward pass ``forward`` computes MoE layer
``layer``, and its accesses start at index ``t_start`` of the access sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from expertd.policies.base import Geometry, Key

Step = tuple[int, int, int]


def steps_from_rows(
    forward_ids: Sequence[int] | np.ndarray, layers: Sequence[int] | np.ndarray, width: int
) -> Iterator[Step]:
    """The steps of a trace whose row ``i`` (one forward pass at one layer) holds ``width`` keys.

    ``forward_ids`` identifies each row's forward pass (e.g. ``request << 32 | token``);
    forwards are numbered 0, 1, ... in order of change. Returns a one-shot iterator.
    """
    ids = np.asarray(forward_ids, dtype=np.int64)
    starts = np.arange(len(ids), dtype=np.int64) * width
    forward = np.zeros(len(ids), dtype=np.int64)
    if len(ids) > 1:
        np.cumsum(ids[1:] != ids[:-1], out=forward[1:])
    return zip(starts.tolist(), forward.tolist(), np.asarray(layers).tolist(), strict=True)


class StepClock:
    """Where a run is: the forward pass, the layer being computed, the keys used in this step.

    Steps come from `step` (the caller's `on_step`). A caller that reports none gets
    them inferred from demand accesses (`observe`): a new step starts when the layer
    changes or a key repeats within the step (top-k experts are distinct), a new
    forward pass when the layer does not rise.
    """

    def __init__(self, geometry: Geometry) -> None:
        self.num_experts = geometry.num_experts
        self.forward = -1
        self.layer = -1
        self.in_step: set[Key] = set()  # keys accessed in the current step
        self.widest = 0  # most keys accessed in one finished step (top-k, once seen)
        self.explicit = False

    def step(self, forward: int, layer: int) -> None:
        """The caller's step: pass ``forward`` computes ``layer`` now."""
        self.explicit = True
        self._begin(forward, layer)

    def observe(self, key: Key) -> bool:
        """A demand access to ``key``; True when it began an inferred step."""
        began = False
        if not self.explicit:
            layer = key // self.num_experts
            if layer != self.layer or key in self.in_step:
                forward = self.forward + 1 if layer <= self.layer or self.forward < 0 else self.forward
                self._begin(forward, layer)
                began = True
        self.in_step.add(key)
        return began

    def step_done(self) -> bool:
        """Whether the current step already used as many keys as the widest step so far."""
        return len(self.in_step) >= self.widest

    def _begin(self, forward: int, layer: int) -> None:
        if len(self.in_step) > self.widest:
            self.widest = len(self.in_step)
        self.forward = forward
        self.layer = layer
        self.in_step = set()
