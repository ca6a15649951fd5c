"""The transfer engine: worker threads that move bytes, and nothing else.

The cache manager decides what moves, when, and into which slot (its queues
hold the priorities); the engine only executes `StartTransfer` commands: store
reads into host slots on ``load_threads`` threads, host->device copies on
``h2d_depth`` threads (a dedicated CUDA stream each, or a memcpy for the CPU
stand-in). Each finished transfer is reported to the event loop as one frame,
``secret + msgpack([transfer_id, ok, error])``, from a DEALER socket connected
over inproc to the loop's own ROUTER, so the loop's thread stays the only owner
of state and blocks on a single socket.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import zmq

from expertd.daemon.core.events import H2D, LOAD, StartTransfer
from expertd.daemon.store.manifest import StoreError

log = logging.getLogger("expertd.engine")

_STOP = None
ENGINE_PREFIX = b"expertd-engine-"


class TransferEngine:
    """Runs transfers on worker threads and reports completions on ``completion_address``."""

    def __init__(
        self,
        context: zmq.Context,
        completion_address: str,
        *,
        read_expert: Callable[[int, int, np.ndarray], int],
        num_experts: int,
        host_slot: Callable[[int], np.ndarray],
        copy_to_device: Callable[[int, int, int], None] | None,
        raw_bytes: int,
        load_threads: int,
        h2d_depth: int,
        prepare_thread: Callable[[], None] | None = None,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        """``curve``: (server public, own public, own secret) key when the loop's socket needs CURVE."""
        self._curve = curve
        self._context = context
        self._address = completion_address
        self._read_expert = read_expert
        self._num_experts = num_experts
        self._host_slot = host_slot
        self._copy_to_device = copy_to_device
        self._raw_bytes = raw_bytes
        self._prepare_thread = prepare_thread
        self._queues: dict[str, queue.SimpleQueue[StartTransfer | None]] = {
            LOAD: queue.SimpleQueue(),
            H2D: queue.SimpleQueue(),
        }
        self._threads = [
            threading.Thread(target=self._work, args=(LOAD,), name=f"expertd-load-{i}", daemon=True)
            for i in range(load_threads)
        ]
        if copy_to_device is not None:
            self._threads += [
                threading.Thread(target=self._work, args=(H2D,), name=f"expertd-h2d-{i}", daemon=True)
                for i in range(h2d_depth)
            ]
        self.busy = {LOAD: 0, H2D: 0}  # informational; written by workers without a lock
        self.secret = os.urandom(16)  # proves a completion frame came from our workers

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, command: StartTransfer) -> None:
        """Queue one transfer; the manager never starts more than a link's depth at once."""
        self._queues[command.link].put(command)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Let running transfers finish, stop the workers; False if one did not stop in time."""
        for thread in self._threads:
            link = H2D if "h2d" in thread.name else LOAD
            self._queues[link].put(_STOP)
        stopped = True
        for thread in self._threads:
            thread.join(timeout_s)
            stopped &= not thread.is_alive()
        return stopped

    def _work(self, link: str) -> None:
        push = self._context.socket(zmq.DEALER)
        push.setsockopt(zmq.LINGER, 1000)
        push.setsockopt(zmq.ROUTING_ID, ENGINE_PREFIX + threading.current_thread().name.encode())
        if self._curve is not None:
            push.curve_serverkey, push.curve_publickey, push.curve_secretkey = self._curve
        push.connect(self._address)
        if link == LOAD and self._prepare_thread is not None:
            self._prepare_thread()
        work = self._queues[link]
        try:
            while (command := work.get()) is not _STOP:
                ok, error = True, ""
                self.busy[link] += 1
                try:
                    self._run(command)
                except StoreError as exc:
                    ok, error = False, str(exc)
                except Exception as exc:  # a worker must report, never die silently
                    log.exception("transfer %s failed", command)
                    ok, error = False, f"{type(exc).__name__}: {exc}"
                finally:
                    self.busy[link] -= 1
                push.send(self.secret + msgpack.packb([command.transfer_id, ok, error]))
        finally:
            push.close()

    def _run(self, command: StartTransfer) -> None:
        layer, expert = divmod(command.key, self._num_experts)
        if command.link == LOAD:
            self._read_expert(layer, expert, self._host_slot(command.dst_slot))
        else:
            assert self._copy_to_device is not None and command.src_slot is not None
            self._copy_to_device(command.src_slot, command.dst_slot, self._raw_bytes)


def decode_completion(frame: bytes) -> tuple[int, bool, str]:
    """The loop's side of a completion frame (our own workers wrote it)."""
    transfer_id, ok, error = msgpack.unpackb(frame)
    return int(transfer_id), bool(ok), str(error)


def cpu_copier(host_slot: Callable[[int], np.ndarray], device_slot: Callable[[int], np.ndarray]):
    """host->device for the CPU stand-in: a memcpy between two shared-memory slabs."""

    def copy(src: int, dst: int, nbytes: int) -> None:
        np.copyto(device_slot(dst)[:nbytes], host_slot(src)[:nbytes])

    return copy


def cuda_copier(host_slab: Any, device_slab: Any):
    """host->device on a dedicated CUDA stream per worker thread, from pinned host memory."""
    import torch

    host = torch.from_numpy(host_slab.array)  # pinned via cudaHostRegister at start
    local = threading.local()

    def copy(src: int, dst: int, nbytes: int) -> None:
        stream = getattr(local, "stream", None)
        if stream is None:
            stream = local.stream = torch.cuda.Stream(device=device_slab.device)
        start = src * host_slab.slot_bytes
        with torch.cuda.stream(stream):
            device_slab.slot(dst)[:nbytes].copy_(host[start : start + nbytes], non_blocking=True)
        stream.synchronize()  # the copy is done before the loop hears of it

    return copy
