"""systemd glue: sd_notify (READY=1, STATUS=, WATCHDOG=1, STOPPING=1) without libsystemd.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the daemon runs
the same under a terminal, a test, or a unit with ``Type=notify``.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends sd_notify datagrams; pets the watchdog only when the loop made progress."""

    def __init__(self, environ: dict[str, str] | None = None, clock=time.monotonic) -> None:
        env = os.environ if environ is None else environ
        self._clock = clock
        self._address = env.get("NOTIFY_SOCKET") or None
        if self._address and self._address.startswith("@"):
            self._address = "\0" + self._address[1:]  # abstract namespace
        self._socket: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        owned = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and owned else None
        self._last_pet = self._clock()

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when not under systemd."""
        if self._address is None:
            return False
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def progress(self) -> None:
        """The event loop completed an iteration: pet the watchdog if half its period passed."""
        if self.watchdog_s is None:
            return
        now = self._clock()
        if now - self._last_pet >= self.watchdog_s / 2:
            self._last_pet = now
            self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
