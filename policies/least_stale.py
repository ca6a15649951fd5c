"""Least-Stale (SpecMD, Hoang et al., arXiv 2602.03921): keep what this forward pass touched.

SpecMD's rule: experts not touched in the current forward pass (stale) are evicted
before those that were (fresh). What we could read of the paper (abstract and
summaries) does not fix the order within each class; ours follows the cyclic layer
order, then recency:

1. stale keys before fresh ones;
2. within a class, by layer, furthest from its next computation first: the layer
   just computed, then the one before, ..., wrapping round. While the current
   layer's step is still going (fewer keys used than the widest step seen, i.e.
   top-k) its unused keys may be needed now, so that layer comes last and the
   previous one first;
3. within a layer, least recently used first.

Why not plain LRU within the stale class: when forward passes run one after the
other, every stale key was last used before every fresh one, so "stale first, then
LRU" evicts exactly what LRU evicts. The layer order is what makes the policy
differ: in a cycle the least recently used key is the one whose layer comes round
soonest, so when a pass does not fit LRU evicts just what is needed next.

An insert counts as a touch in the current pass (a prefetch is for this pass or
the next and must not go first). Steps come from `on_step`, or are inferred from
demand accesses when the caller gives none (`StepClock`).
"""

from __future__ import annotations

from collections.abc import Container

from expertd.policies.base import NO_PINS, Key, LayeredPolicy, NoVictimError
from expertd.policies.registry import register
from expertd.policies.steps import StepClock


@register("least-stale")
class LeastStale(LayeredPolicy):
    """Stale before fresh, then the layer just computed first, then LRU within a layer.

    Stamps are the forward pass of each key's last touch.
    """

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        self.clock = StepClock(geometry)
        layers = geometry.num_layers
        self._fresh = [0] * layers  # per layer: keys touched in pass `_fresh_forward`
        self._fresh_forward = -1
        # Layers in eviction order while layer c is computed: its step done, c, c-1, ..., c+1;
        # still going (top-k), c-1, c-2, ..., c: its unused keys may be needed now.
        self._scan_done = [[(c - i) % layers for i in range(layers)] for c in range(layers)]
        self._scan_going = [[(c - 1 - i) % layers for i in range(layers)] for c in range(layers)]

    def on_step(self, forward: int, layer: int) -> None:
        self.clock.step(forward, layer)

    def on_miss(self, key: Key, t: int) -> None:
        self.clock.observe(key)

    def on_hit(self, key: Key, t: int) -> None:
        self.clock.observe(key)
        self._fresh_touch(key)

    def on_insert(self, key: Key, t: int) -> None:
        self._fresh[self._admit_at(key, self._sync())] += 1

    def _sync(self) -> int:
        forward = self.clock.forward
        if forward != self._fresh_forward:
            self._fresh = [0] * len(self._fresh)  # a new pass: nothing is fresh yet
            self._fresh_forward = forward
        return forward

    def _fresh_touch(self, key: Key) -> None:
        forward = self._sync()
        if self._touch(key, forward) != forward:
            self._fresh[key // self.geometry.num_experts] += 1

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        forward = self._sync()
        layers, fresh = self._layers, self._fresh
        clock = self.clock
        current = clock.layer if clock.layer >= 0 else len(layers) - 1
        scan = (self._scan_done if clock.step_done() else self._scan_going)[current]
        if len(self._resident) > sum(fresh):
            for layer in scan:
                order = layers[layer]
                if len(order) > fresh[layer]:
                    for key, last in order.items():
                        if last >= forward:
                            break  # the rest of this layer was touched in this pass
                        if key not in pinned:
                            return key
        for layer in scan:
            for key in layers[layer]:
                if key not in pinned:
                    return key
        raise NoVictimError(f"least-stale: all {len(self._resident)} resident keys are pinned")

    def on_remove(self, key: Key) -> None:
        if self._evict_stamped(key) == self._sync():
            self._fresh[key // self.geometry.num_experts] -= 1
