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

    def slab_files(self) -> list[Path]:
        """The tiers' slabs (not the residency tables nor clients' pin files of the fast path)."""
        return [p for p in self.shm_files() if "-table-" not in p.name and "-pins-" not in p.name]


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


def as_root_or_skip() -> None:
    """Tests of what another local user can do need root to become one (CI runs as root)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second local user (CI runs as root)")


def _import_before_dropping_root() -> None:
    """What a forked child will import lazily, imported while it can still read the interpreter's files."""
    import importlib

    for module in (
        "hmac", "expertd.daemon.cli.main", "expertd.daemon.cli.serve_cli", "expertd.daemon.service.server",
        "expertd.daemon.cli.status_view", "expertd.daemon.core.prefetch_state", "expertd.policies.registry",
        "expertd.client.client",
    ):  # fmt: skip
        importlib.import_module(module)
    from expertd.policies.registry import policy_class

    for name in ("lru", "predictive", "layer-distance"):
        policy_class(name)


def run_as(uid: int, gid: int, fn, *args, groups: tuple[int, ...] = (), timeout_s: float = 60.0):
    """``fn(*args)`` in a forked child running as ``uid``/``gid``; its JSON-able result.

    Forked, not exec'd: the interpreter may live where another user cannot read it (a
    pyenv under /root), and the child needs only what this process has imported. An
    exception in the child comes back as ``{"error": "Class: message"}``.
    """
    import json
    import select

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        try:
            _import_before_dropping_root()
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            payload = {"ok": fn(*args)}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write_end, json.dumps(payload, default=str).encode())
        os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"child as uid {uid} did not finish within {timeout_s} s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"error": "child died without a word"}')
    return result.get("ok") if "ok" in result else result


class ForkedDaemon:
    """`expertd serve` as another user: a forked child that setuid()s and runs the CLI (see `run_as`)."""

    def __init__(
        self,
        argv: list[str],
        uid: int,
        gid: int,
        log_path: Path,
        address: str,
        groups: list[int] | None = None,
        timeout_s: float = 30.0,
    ):
        self.address, self.log_path = address, log_path
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                import logging

                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                sys.stdout = sys.stderr = os.fdopen(os.dup(log_fd), "w", buffering=1)
                logging.root.handlers.clear()  # pytest's capture handlers: serve configures its own
                _import_before_dropping_root()
                os.setgroups(groups or [])
                os.setgid(gid)
                os.setuid(uid)
                from expertd.daemon.cli.main import main

                code = main(argv)
            except BaseException as exc:  # noqa: BLE001 - into the log, then out
                os.write(2, f"forked daemon: {type(exc).__name__}: {exc}\n".encode())
            os._exit(code or 0)
        os.close(log_fd)
        deadline = time.monotonic() + timeout_s
        while "INFO expertd: serving" not in self.log():
            if os.waitpid(self.pid, os.WNOHANG) != (0, 0):
                self.pid = 0
                raise RuntimeError(f"daemon as uid {uid} exited:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"daemon as uid {uid} did not start within {timeout_s} s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then wait; the exit status (None if it had gone already)."""
        if not self.pid:
            return None
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.pid = 0
        return -signal.SIGKILL
