"""Slabs: the fixed memory of each tier, allocated once at start and shared with clients.

`HostSlab` is one POSIX shared-memory file (``/dev/shm/expertd-*``) of fixed-size
slots that clients map read-only; it is registered as pinned memory when CUDA is
present so host->device copies are real DMA. `CpuDeviceSlab` is a second such file
standing in for GPU memory where there is no GPU (tests, CPU-only hosts).
`CudaDeviceSlab` is one CUDA allocation exported through a CUDA IPC handle.

Every file carries the daemon's pid in its name, so files of a daemon that died
without cleaning up are found and removed at the next start (`clean_stale`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from expertd.daemon.protocol.local import SHM_PREFIX, SlabError

SHM_DIR = Path("/dev/shm")
PAGE_BYTES = mmap.PAGESIZE
_SHM_NAME = re.compile(r"^expertd-(?P<pid>\d+)-(?P<tag>[A-Za-z0-9_.-]+)$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove this user's expertd shared-memory files whose daemon is dead; return what was removed.

    Another user's are theirs to remove (and /dev/shm's sticky bit would refuse us).
    """
    removed = []
    for path in shm_dir.glob(f"{SHM_PREFIX}*"):
        match = _SHM_NAME.match(path.name)
        if match and not pid_alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                if path.lstat().st_uid != os.geteuid():
                    continue
                path.unlink()
                removed.append(path)
    return removed


class _ShmSlab:
    """Slots of ``slot_bytes`` in one shared-memory file, owned by this process."""

    kind = "shm"

    def __init__(
        self,
        tag: str,
        num_slots: int,
        slot_bytes: int,
        *,
        shm_dir: Path = SHM_DIR,
        mode: int = 0o600,
    ) -> None:
        if num_slots < 1 or slot_bytes < 1 or slot_bytes % PAGE_BYTES:
            raise SlabError(f"{tag}: need >= 1 slot of a page multiple, got {num_slots} x {slot_bytes}")
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.nbytes = num_slots * slot_bytes
        self.path = shm_dir / f"{SHM_PREFIX}{os.getpid()}-{tag}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            try:  # commit the whole budget now: fail at start, never later
                os.posix_fallocate(fd, 0, self.nbytes)
            except OSError as exc:
                raise SlabError(
                    f"cannot allocate {self.nbytes / 2**30:.2f} GiB of shared memory at {self.path}: "
                    f"{exc.strerror} (is {shm_dir} large enough?)"
                ) from None
            self._mmap = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)  # [num_slots * slot_bytes]
        self._pinned = False

    def slot(self, index: int) -> np.ndarray:
        """A writable view of slot ``index`` (page-aligned, ``slot_bytes`` long)."""
        if not 0 <= index < self.num_slots:
            raise IndexError(f"slot {index} out of range [0, {self.num_slots})")
        start = index * self.slot_bytes
        return self.array[start : start + self.slot_bytes]

    def handle(self) -> dict[str, Any]:
        """What a client needs to map this slab (msgpack-able)."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "slots": self.num_slots,
            "slot_bytes": self.slot_bytes,
        }

    def pin_for_cuda(self) -> bool:
        """Register the slab as page-locked memory for async host->device copies."""
        import torch

        if not torch.cuda.is_available() or self._pinned:
            return self._pinned
        ptr = self.array.ctypes.data
        result = torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0)
        if int(result) != 0:
            raise SlabError(
                f"cudaHostRegister of {self.nbytes / 2**30:.2f} GiB failed with error {int(result)}; "
                "raise RLIMIT_MEMLOCK (LimitMEMLOCK= in the unit)"
            )
        self._pinned = True
        return True

    def close(self) -> None:
        """Unmap and remove the file (clients that mapped it keep their mapping)."""
        if self._pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.array.ctypes.data)
            self._pinned = False
        self.array = np.zeros(0, dtype=np.uint8)
        with contextlib.suppress(BufferError):  # a live export keeps it mapped until exit
            self._mmap.close()
        self.path.unlink(missing_ok=True)


class HostSlab(_ShmSlab):
    """The host tier: RAM slots in shared memory that clients map read-only."""

    kind = "host"


class CpuDeviceSlab(_ShmSlab):
    """Stands in for GPU memory where there is none: a second shared-memory slab."""

    kind = "cpu"


class CudaDeviceSlab:
    """The device tier: one CUDA allocation of fixed slots, exported by CUDA IPC."""

    kind = "cuda"

    def __init__(self, num_slots: int, slot_bytes: int, device: int = 0) -> None:
        import torch

        if not torch.cuda.is_available():
            raise SlabError("device = 'cuda' but CUDA is not available; use 'cpu' or 'off'")
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.nbytes = num_slots * slot_bytes
        self.device = device
        try:
            self.tensor = torch.empty(self.nbytes, dtype=torch.uint8, device=f"cuda:{device}")
        except torch.cuda.OutOfMemoryError:
            raise SlabError(f"cannot allocate {self.nbytes / 2**30:.2f} GiB on cuda:{device}") from None

    def slot(self, index: int):
        """A view of slot ``index`` as a CUDA uint8 tensor."""
        if not 0 <= index < self.num_slots:
            raise IndexError(f"slot {index} out of range [0, {self.num_slots})")
        start = index * self.slot_bytes
        return self.tensor[start : start + self.slot_bytes]

    def handle(self) -> dict[str, Any]:
        storage = self.tensor.untyped_storage()
        shared = storage._share_cuda_()  # the tuple torch.multiprocessing sends
        return {
            "kind": self.kind,
            "device": self.device,
            "slots": self.num_slots,
            "slot_bytes": self.slot_bytes,
            "ipc": list(shared),
        }

    def close(self) -> None:
        del self.tensor
