"""How fast this machine's CPU computes one expert: the host compute bandwidth placement weighs.

`measure_host_gbps` times a SwiGLU expert pass (``w2 @ (silu(w1 @ x) * (w3 @ x))``, the
Mixtral / DeepSeek / Qwen MoE expert) on the host threads the daemon may use, at the real
shape, rotating over enough copies of the weights that no pass is served from the CPU's
caches; the bandwidth is the expert's bytes over one pass's seconds. `measure_memory_gbps`
times a plain copy of a buffer as large, in the same process, for comparison. Both import
torch lazily: the daemon pays for it only when it calibrates (bench/cpu_expert.py prints both).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

MIN_WORKING_SET_BYTES = 512 * 2**20  # rotate over at least this much weight (far beyond any L3)
DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class HostPass:
    """One shape's measured host pass."""

    hidden: int
    ffn: int
    dtype: str
    tokens: int
    threads: int
    expert_bytes: int
    seconds: float  # median seconds of one pass
    passes: int

    @property
    def gbps(self) -> float:
        """Expert bytes per second of pass (GB = 1e9 bytes)."""
        return self.expert_bytes / self.seconds / 1e9


def measure_host_gbps(
    hidden: int,
    ffn: int,
    *,
    dtype: str = "bfloat16",
    tokens: int = 1,
    threads: int | None = None,
    passes: int = 20,
    working_set_bytes: int = MIN_WORKING_SET_BYTES,
    timer: Callable[[], float] = time.perf_counter,
) -> HostPass:
    """Time ``passes`` expert passes of ``tokens`` tokens at shape (``hidden``, ``ffn``) on ``threads``.

    The passes rotate over copies of the weights, at least two and at least
    ``working_set_bytes`` in all (keep it past the CPU's last-level cache: a smaller set
    measures the cache, not RAM).
    """
    import torch

    if hidden < 1 or ffn < 1 or tokens < 1 or passes < 1:
        raise ValueError(f"shape, tokens and passes must be >= 1, got {hidden}x{ffn}, {tokens}, {passes}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        expert_bytes = 3 * hidden * ffn * itemsize
        copies = max(2, math.ceil(working_set_bytes / expert_bytes))
        gen = torch.Generator().manual_seed(0)
        # Small uniform weights, filled in place (randn of a whole Mixtral expert is slow).
        experts = [
            tuple(
                torch.empty(shape, dtype=torch_dtype).uniform_(-0.02, 0.02, generator=gen)
                for shape in ((ffn, hidden), (ffn, hidden), (hidden, ffn))
            )
            for _ in range(copies)
        ]  # w1, w3: [F, D]; w2: [D, F]
        x = torch.empty(tokens, hidden, dtype=torch_dtype).uniform_(-1.0, 1.0, generator=gen)  # [T, D]

        def one(i: int) -> None:
            w1, w3, w2 = experts[i % copies]
            h = torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)  # [T, F]
            h @ w2.T  # [T, D]

        with torch.inference_mode():
            for i in range(copies):  # warm: every copy touched once
                one(i)
            times = []
            for i in range(passes):
                start = timer()
                one(i)
                times.append(timer() - start)
    finally:
        torch.set_num_threads(before)
    times.sort()
    median = times[len(times) // 2]
    return HostPass(hidden, ffn, dtype, tokens, used_threads, expert_bytes, median, passes)


def measure_memory_gbps(nbytes: int = MIN_WORKING_SET_BYTES, repeats: int = 5) -> float:
    """Bytes copied per second by one large buffer copy (each byte read once and written once)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9
