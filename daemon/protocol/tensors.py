"""The layout of one expert: where each tensor lies in a slot. The store writes it into its
manifest, the daemon sends it at hello, the client makes its views from it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from expertd.daemon.protocol.errors import ProtocolError

# Element sizes of the dtypes a slot may hold (torch names).
DTYPE_BYTES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor inside an expert blob: name, dtype (torch name), shape, byte offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}


def parse_layout(tensors: Sequence[Mapping[str, Any]], slot_bytes: int) -> tuple[TensorSpec, ...]:
    """A hello reply's ``tensors``; `ProtocolError` names a bad entry (one outside the slot too)."""
    out = []
    for entry in tensors:
        try:
            name, dtype, shape, offset = entry["name"], entry["dtype"], entry["shape"], entry["offset"]
            if dtype not in DTYPE_BYTES:
                raise ProtocolError(f"layout tensor {name!r}: unknown dtype {dtype!r}")
            spec = TensorSpec(str(name), str(dtype), tuple(int(d) for d in shape), int(offset))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"layout tensor {entry!r:.80} is malformed ({exc})") from None
        if spec.offset < 0 or spec.offset + spec.nbytes > slot_bytes or min(spec.shape, default=1) < 0:
            raise ProtocolError(
                f"layout tensor {spec.name!r} spans bytes [{spec.offset}, "
                f"{spec.offset + spec.nbytes}) of a {slot_bytes}-byte slot"
            )
        if spec.offset % spec.itemsize:
            raise ProtocolError(f"layout tensor {spec.name!r} offset {spec.offset} is misaligned")
        out.append(spec)
    return tuple(out)
