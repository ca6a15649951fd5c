"""LRU per layer, as mixtral-offloading: each layer owns a fixed number of slots.

Capacity is split evenly across layers, the remainder to the first layers; each
layer is its own LRU, and a key entering a full layer evicts that layer's least
recently used key, whatever the other layers hold. Equals the sum of one
independent LRU per layer (a test checks it against libCacheSim's LRU).

When the caller evicts without naming the incoming key (``incoming=None``), or a
layer went over its share because keys were inserted without `needs_eviction`,
the victim comes from the layer most over its share (ties: the layer whose LRU key
is oldest).
"""

from __future__ import annotations

from collections.abc import Container

from expertd.policies.base import NO_PINS, Key, LayeredPolicy, NoVictimError, PolicyError
from expertd.policies.registry import register


@register("lru-per-layer")
class LRUPerLayer(LayeredPolicy):
    """One LRU of ``quota[layer]`` slots per layer; stamps are the last access time."""

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        layers = geometry.num_layers
        if capacity < layers:
            raise PolicyError(
                f"lru-per-layer: capacity {capacity} is less than one slot for each of {layers} layers"
            )
        share, extra = divmod(capacity, layers)
        self.quota = [share + (1 if layer < extra else 0) for layer in range(layers)]

    def on_hit(self, key: Key, t: int) -> None:
        self._touch(key, t)

    def on_insert(self, key: Key, t: int) -> None:
        self._admit_at(key, t)

    def needs_eviction(self, incoming: Key) -> bool:
        layer = incoming // self.geometry.num_experts
        return self._layer_size[layer] >= self.quota[layer] or len(self._resident) >= self.capacity

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        if incoming is not None:
            layer = incoming // self.geometry.num_experts
            if self._layer_size[layer] >= self.quota[layer]:
                for key in self._layers[layer]:
                    if key not in pinned:
                        return key
                raise NoVictimError(
                    f"lru-per-layer: all {self._layer_size[layer]} keys of layer {layer} are pinned"
                )
        best: tuple[int, int, Key] | None = None  # (-(over quota), last access, key)
        for layer, order in enumerate(self._layers):
            over = len(order) - self.quota[layer]
            if over < 0 or (best is not None and -over > best[0]):
                continue
            for key, last in order.items():
                if key not in pinned:
                    if best is None or (-over, last) < best[:2]:
                        best = (-over, last, key)
                    break
        if best is None:
            raise NoVictimError(
                f"lru-per-layer: all keys of the full layers ({len(self._resident)} resident) are pinned"
            )
        return best[2]

    def on_remove(self, key: Key) -> None:
        self._evict_stamped(key)
