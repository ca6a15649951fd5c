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

from collections import OrderedDict
from collections.abc import Container, Iterable, Sequence

from expertd.policies.base import NO_PINS, EvictionPolicy, Key, NoVictimError, key_index
from expertd.policies.registry import register
from expertd.policies.steps import StepClock


@register("least-stale")
class LeastStale(EvictionPolicy):
    """Stale before fresh, then the layer just computed first, then LRU within a layer."""

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        self.clock = StepClock(geometry)
        layers = geometry.num_layers
        # Per layer: resident key -> forward pass of its last touch, least recent first.
        self._layers: list[OrderedDict[Key, int]] = [OrderedDict() for _ in range(layers)]
        self._fresh = [0] * layers  # per layer: keys touched in pass `_fresh_forward`
        self._fresh_forward = -1
        # Layers in eviction order while layer c is computed: its step done, c, c-1, ..., c+1;
        # still going (top-k), c-1, c-2, ..., c: its unused keys may be needed now.
        self._scan_done = [[(c - i) % layers for i in range(layers)] for c in range(layers)]
        self._scan_going = [[(c - 1 - i) % layers for i in range(layers)] for c in range(layers)]
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: object) -> bool:
        index = key_index(key, self.geometry.num_keys)
        return index >= 0 and index in self._layers[index // self.geometry.num_experts]

    def on_step(self, forward: int, layer: int) -> None:
        self.clock.step(forward, layer)

    def on_miss(self, key: Key, t: int) -> None:
        self.clock.observe(key)

    def on_hit(self, key: Key, t: int) -> None:
        self.clock.observe(key)
        self._touch(key)

    def on_insert(self, key: Key, t: int) -> None:
        self._touch(key)
        self._size += 1

    def _sync(self) -> int:
        forward = self.clock.forward
        if forward != self._fresh_forward:
            self._fresh = [0] * len(self._fresh)  # a new pass: nothing is fresh yet
            self._fresh_forward = forward
        return forward

    def _touch(self, key: Key) -> None:
        forward = self._sync()
        layer = key // self.geometry.num_experts
        order = self._layers[layer]
        if order.get(key) != forward:
            self._fresh[layer] += 1
        order[key] = forward
        order.move_to_end(key)

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        forward = self._sync()
        layers, fresh = self._layers, self._fresh
        clock = self.clock
        current = clock.layer if clock.layer >= 0 else len(layers) - 1
        scan = (self._scan_done if clock.step_done() else self._scan_going)[current]
        if self._size > sum(fresh):
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
        raise NoVictimError(f"least-stale: all {self._size} resident keys are pinned")

    def on_remove(self, key: Key) -> None:
        layer = key // self.geometry.num_experts
        if self._layers[layer].pop(key) == self._sync():
            self._fresh[layer] -= 1
        self._size -= 1

    def replay(self, keys: Sequence[Key], steps: Iterable[tuple[int, int, int]] = ()) -> int:
        # Same semantics as EvictionPolicy.replay with no pins; the hit path is inlined.
        layers, num_experts, clock = self._layers, self.geometry.num_experts, self.clock
        step_iter = iter(steps)
        next_step = next(step_iter, None)
        hits = 0
        for t, key in enumerate(keys.tolist() if hasattr(keys, "tolist") else keys):
            while next_step is not None and next_step[0] <= t:
                clock.step(next_step[1], next_step[2])
                next_step = next(step_iter, None)
            clock.observe(key)
            layer = key // num_experts
            order = layers[layer]
            last = order.get(key)
            if last is not None:
                hits += 1
                forward = clock.forward
                if forward != self._fresh_forward:
                    self._sync()
                if last != forward:
                    self._fresh[layer] += 1
                    order[key] = forward
                order.move_to_end(key)
                continue
            if self._size >= self.capacity:
                self.on_remove(self.victim(t, NO_PINS, key))
            self.on_insert(key, t)
        return hits
