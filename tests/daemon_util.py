"""Real daemons for tests: a real `expertd serve` process on a temporary ipc:// socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from expertd.daemon import protocol as proto

EXPERTD = [sys.executable, "-m", "expertd.daemon"]


class DaemonProcess:
    """`expertd serve` in a subprocess; `address` is ready once the constructor returns."""

    def __init__(
        self,
        store: Path,
        workdir: Path,
        *flags: str,
        env: dict[str, str] | None = None,
        probe: bool = True,
        address: str | None = None,
    ):
        """``probe`` False: wait for the log to say it serves (a CURVE daemon ignores plain pings)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.address = address or f"ipc://{workdir / 'expertd.sock'}"
        self.log_path = workdir / "daemon.log"
        self.args = [*EXPERTD, "serve", "--store", str(store), "--address", self.address, *flags]
        self.env = {**os.environ, **(env or {})}
        self.probe = probe
        self.start()

    def start(self, timeout_s: float = 20.0) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_s
        while not (
            ping(self.address, timeout_ms=100) if self.probe else "INFO expertd: serving" in self.log()
        ):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"daemon did not answer within {timeout_s} s:\n{self.log()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.wait(10)

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout_s)
        self._log.close()
        return code

    def shm_files(self) -> list[Path]:
        return sorted(Path("/dev/shm").glob(f"expertd-{self.pid}-*"))


def ping(address: str, timeout_ms: int = 1000) -> bool:
    """Does a daemon answer at ``address``? (the probe the daemon itself uses at start)"""
    from expertd.daemon.service.listener import answers

    return answers(zmq.Context.instance(), address, timeout_ms)


class RawClient:
    """Speaks the wire protocol by hand: for tests of what the daemon does with bad input."""

    def __init__(self, address: str, timeout_ms: int = 5000) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.timeout_ms = timeout_ms

    def send_frames(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self):
        if not self.sock.poll(self.timeout_ms):
            raise TimeoutError("no reply")
        return proto.decode_reply(self.sock.recv())

    def request(self, request_id: int, message) -> dict | proto.ExpertdError:
        self.sock.send(proto.encode_request(request_id, message))
        reply_id, reply = self.recv()
        assert reply_id == request_id, (reply_id, request_id)
        return reply

    def hello(self, name: str = "raw", tenant: str = "default") -> dict:
        reply = self.request(1, proto.Hello(version=proto.PROTOCOL_VERSION, client=name, tenant=tenant))
        assert isinstance(reply, dict), reply
        return reply

    def close(self) -> None:
        self.sock.close()
