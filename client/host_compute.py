"""CPU threads that compute host-placed experts while the device computes its own.

A ``tier="auto"`` lease names, per expert, the device slot or the host slot (a read-only view
of shared memory) the client computes it from. `HostCompute` runs the host ones on a small
pool of CPU threads; the caller adds every expert's contribution on the device in expert-id
order, so the sum is the same, bit for bit, as one loop over all of them.

How many threads (`default_threads`): a daemon on this machine (ipc://) says in its hello
reply (``host_compute.threads``: ``[placement] threads``, or its rule); otherwise the rule here:
the cores this process may run on, minus the daemon's reader threads (``[transfers]
load_threads``) when it runs on this machine, minus one for the thread that drives the
device; never fewer than one. The daemon's readers fill host slots from the store while the client
computes: taking their cores would slow every miss for every client. torch's intra-op pool
(`torch.set_num_threads`) multiplies each thread's matmuls: keep ``threads *
torch.get_num_threads()`` within the same budget.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

HOST = "host"  # the tier whose slots the CPU computes from


def default_threads(hello_info: Mapping[str, Any] | None = None, address: str = "ipc://") -> int:
    """Host compute threads that leave the daemon's readers (and the device's driver) a core each."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    readers = 0
    if address.startswith("ipc://") and hello_info is not None:
        host = hello_info.get("host_compute") or {}
        host = host if isinstance(host, Mapping) else {}
        said = host.get("threads")
        if _count(said):
            return min(int(said), cores)  # the daemon's figure was measured on these threads
        value = host.get("reader_threads", 0)
        readers = int(value) if _count(value) else 0
    return max(1, cores - readers - 1)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class HostCompute:
    """A pool of ``threads`` CPU threads for host-placed experts (`default_threads` if None)."""

    def __init__(self, threads: int | None = None, *, hello_info: Mapping[str, Any] | None = None,
                 address: str = "ipc://") -> None:  # fmt: skip
        self.threads = default_threads(hello_info, address) if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"host compute threads must be at least 1, got {threads}")
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="expertd-host")
        self.computed = 0  # experts computed on the host

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        self.computed += 1
        return self._pool.submit(torch.no_grad()(fn), *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> HostCompute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def on(device: torch.device, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors on ``device`` (a no-op for those already there): activations are small."""
    return tuple(t if t.device == device else t.to(device) for t in tensors)
