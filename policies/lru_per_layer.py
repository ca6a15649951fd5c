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

from collections import OrderedDict
from collections.abc import Container, Iterable, Sequence

from expertd.policies.base import NO_PINS, EvictionPolicy, Key, NoVictimError, PolicyError, key_index
from expertd.policies.registry import register


@register("lru-per-layer")
class LRUPerLayer(EvictionPolicy):
    """One LRU of ``quota[layer]`` slots per layer; values are the last access time."""

    def __init__(self, capacity, geometry, params=None) -> None:
        super().__init__(capacity, geometry, params)
        layers = geometry.num_layers
        if capacity < layers:
            raise PolicyError(
                f"lru-per-layer: capacity {capacity} is less than one slot for each of {layers} layers"
            )
        share, extra = divmod(capacity, layers)
        self.quota = [share + (1 if layer < extra else 0) for layer in range(layers)]
        self._layers: list[OrderedDict[Key, int]] = [OrderedDict() for _ in range(layers)]
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: object) -> bool:
        index = key_index(key, self.geometry.num_keys)
        return index >= 0 and index in self._layers[index // self.geometry.num_experts]

    def on_hit(self, key: Key, t: int) -> None:
        order = self._layers[key // self.geometry.num_experts]
        order[key] = t
        order.move_to_end(key)

    def on_insert(self, key: Key, t: int) -> None:
        self._layers[key // self.geometry.num_experts][key] = t
        self._size += 1

    def needs_eviction(self, incoming: Key) -> bool:
        layer = incoming // self.geometry.num_experts
        return len(self._layers[layer]) >= self.quota[layer] or self._size >= self.capacity

    def victim(self, t: int, pinned: Container[Key] = NO_PINS, incoming: Key | None = None) -> Key:
        if incoming is not None:
            layer = incoming // self.geometry.num_experts
            if len(self._layers[layer]) >= self.quota[layer]:
                for key in self._layers[layer]:
                    if key not in pinned:
                        return key
                raise NoVictimError(
                    f"lru-per-layer: all {len(self._layers[layer])} keys of layer {layer} are pinned"
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
                f"lru-per-layer: all keys of the full layers ({self._size} resident) are pinned"
            )
        return best[2]

    def on_remove(self, key: Key) -> None:
        del self._layers[key // self.geometry.num_experts][key]
        self._size -= 1

    def replay(self, keys: Sequence[Key], steps: Iterable[tuple[int, int, int]] = ()) -> int:
        # Same semantics as EvictionPolicy.access with no pins, in one loop, while no layer
        # is over its share (only inserts that skipped needs_eviction put one there).
        layers, quota, num_experts = self._layers, self.quota, self.geometry.num_experts
        hits = 0
        for t, key in enumerate(keys.tolist() if hasattr(keys, "tolist") else keys):
            layer = key // num_experts
            order = layers[layer]
            if key in order:
                order[key] = t
                order.move_to_end(key)
                hits += 1
                continue
            if len(order) >= quota[layer]:
                order.popitem(last=False)
            else:
                self._size += 1
            order[key] = t
        return hits
