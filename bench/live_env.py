"""What bench/live_vs_mmap.py changes on the machine, each undone: cgroup v1 memory groups, readahead."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def load_average() -> float:
    """The 1-minute load average (the machine is shared: printed beside every figure)."""
    return os.getloadavg()[0]


class Cgroup:
    """A cgroup v1 memory group; `available` False where it cannot be made (or is not wanted)."""

    def __init__(self, name: str, enabled: bool = True) -> None:
        self.path = CGROUP_ROOT / name
        self.available = False
        if not enabled:
            return
        try:
            self.path.mkdir(exist_ok=True)
            self.available = (self.path / "memory.limit_in_bytes").exists()
        except OSError:
            self.available = False

    def add(self, pid: int) -> None:
        if self.available:
            (self.path / "cgroup.procs").write_text(str(pid))

    def usage(self) -> int:
        return int((self.path / "memory.usage_in_bytes").read_text()) if self.available else 0

    def limit(self, nbytes: int) -> None:
        if self.available:
            (self.path / "memory.limit_in_bytes").write_text(str(nbytes))

    def peak(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text()) if self.available else 0

    def remove(self) -> None:
        """Remove the group; a process left in it (it should not be) is moved to the root first."""
        if not self.available:
            return
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                (CGROUP_ROOT / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()


class Readahead:
    """The readahead of the disk under ``path`` (sysfs ``read_ahead_kb``): set per run, restored."""

    def __init__(self, path: Path, enabled: bool) -> None:
        path.mkdir(parents=True, exist_ok=True)
        dev = os.stat(path).st_dev
        block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        queue = block / "queue" if (block / "queue").exists() else block.resolve().parent / "queue"
        self.knob = queue / "read_ahead_kb"
        self.device = block.resolve().name
        self.original = int(self.knob.read_text()) if self.knob.exists() else None
        self.enabled = enabled and self.original is not None

    def current(self) -> int | None:
        return int(self.knob.read_text()) if self.knob.exists() else None

    def describe(self) -> str:
        getra = subprocess.run(
            ["blockdev", "--getra", f"/dev/{self.device}"], capture_output=True, text=True, check=False
        )
        sectors = getra.stdout.strip() if getra.returncode == 0 else f"n/a ({getra.stderr.strip()})"
        return f"/dev/{self.device} read_ahead_kb {self.current()} (blockdev --getra: {sectors})"

    def apply(self, setting: str) -> int | None:
        """``machine`` (the value found at start) or KiB; returns the KiB in force."""
        want = self.original if setting == "machine" else int(setting)
        if self.enabled and want is not None and want != self.current():
            self.knob.write_text(str(want))
        return self.current()

    def restore(self) -> None:
        if self.enabled and self.original is not None and self.current() != self.original:
            self.knob.write_text(str(self.original))
