"""A scripted stand-in for expertd, for the client's own logic: real zmq, real frames, real slab.

`FakeDaemon` binds a real ROUTER socket in a thread, decodes requests with the protocol
module, and serves acquires from a tiny cache over a real `HostSlab` filled through a real
`StoreReader`. Tests script it: hold replies and send them in reverse order, mute ops,
answer an op with an error, forget every session (a restart, with a new slab).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from expertd.daemon import protocol as proto
from expertd.daemon.service.slabs import HostSlab
from expertd.daemon.store.reader import StoreReader

_tags = itertools.count()


def wait_for(predicate: Callable[[], Any], timeout_s: float = 2.0) -> Any:
    """Poll ``predicate`` until it is truthy; its value, or AssertionError after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise AssertionError(f"condition not met within {timeout_s} s")


class FakeDaemon:
    """ROUTER socket + a tiny LRU cache of ``slots`` host slots; records every request."""

    def __init__(self, address: str, store_dir: str, *, slots: int = 8, heartbeat_s: float = 5.0) -> None:
        self.address = address
        self.reader = StoreReader(store_dir)
        self.manifest = self.reader.manifest
        self.num_slots = slots
        self.heartbeat_s = heartbeat_s
        self.requests: list[tuple[bytes, int, proto.Request]] = []
        self.mute: set[str] = set()  # ops that get no reply
        self.errors: dict[str, proto.ExpertdError] = {}  # op -> error to answer with
        self.reorder = 0  # hold this many acquire replies, then send them in reverse order
        self._held: list[tuple[bytes, bytes]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.slabs: list[HostSlab] = []
        self._reset()
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)
        self._thread = threading.Thread(target=self._run, name="fake-expertd", daemon=True)
        self._thread.start()

    # --- scripting --------------------------------------------------------------------------

    def restart(self) -> None:
        """Forget every session and lease, and move to a new slab (as a restarted daemon)."""
        with self._lock:
            self._reset()

    def ops(self, op: str) -> list[proto.Request]:
        """The requests received with ``op``, in arrival order."""
        with self._lock:
            return [r for _, _, r in self.requests if r.op.value == op]

    def slot_of(self, layer: int, expert: int) -> int:
        return self.resident[(layer, expert)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)
        self.reader.close()
        for slab in self.slabs:
            slab.close()

    def __enter__(self) -> FakeDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the daemon's side ------------------------------------------------------------------

    def _reset(self) -> None:
        self.slab = HostSlab(f"fake{next(_tags)}", self.num_slots, self.manifest.slot_bytes)
        self.slabs.append(self.slab)
        self.sessions: set[bytes] = set()
        self.leases: dict[int, list[int]] = {}
        self.lease_ids = itertools.count(100)
        self.resident: dict[tuple[int, int], int] = {}
        self.pins = [0] * self.num_slots
        self.lru: list[int] = list(range(self.num_slots))  # least recently used first

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(10):
                continue
            identity, frame = self._sock.recv_multipart()
            request_id, request = proto.decode_request(frame)
            with self._lock:
                self.requests.append((identity, request_id, request))
                reply = self._answer(identity, request)
            if reply is None or request.op.value in self.mute:
                continue
            out = (
                proto.encode_error(request_id, reply.code, str(reply))
                if isinstance(reply, proto.ExpertdError)
                else proto.encode_reply(request_id, reply)
            )
            if self.reorder and request.op == proto.Op.ACQUIRE:
                self._held.append((identity, out))
                if len(self._held) == self.reorder:
                    for held in reversed(self._held):
                        self._sock.send_multipart(held)
                    self._held.clear()
                continue
            self._sock.send_multipart([identity, out])

    def _answer(self, identity: bytes, request: proto.Request) -> Any:
        op = request.op.value
        if op in self.errors:
            return self.errors[op]
        if isinstance(request, proto.Hello):
            self.sessions.add(identity)
            return self._hello()
        if identity not in self.sessions:
            return None if op == "bye" else proto.SessionError("unknown client: say hello", "no_session")
        if isinstance(request, proto.Acquire):
            return self._acquire(request)
        if isinstance(request, proto.Release):
            unknown = [lease_id for lease_id in request.leases if self._release(lease_id)]
            return proto.LeaseError(f"no lease {unknown}", "unknown_lease") if unknown else {}
        if isinstance(request, proto.Ping):
            return {"pong": True} if request.reply else None
        if isinstance(request, proto.Stats):
            return {"leases": len(self.leases), "resident": len(self.resident)}
        if isinstance(request, proto.Shutdown):
            return {}
        return None  # hint, bye

    def _hello(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "protocol": proto.PROTOCOL_VERSION,
            "daemon": "fake",
            "model": m.model,
            "num_layers": m.num_layers,
            "num_experts": m.num_experts,
            "dtype": m.dtype,
            "tensors": [t.to_json() for t in m.tensors],
            "raw_bytes": m.raw_bytes,
            "slot_bytes": m.slot_bytes,
            "tiers": {"host": self.slab.handle()},
            "default_tier": "host",
            "heartbeat_s": self.heartbeat_s,
            "lease_timeout_s": 4 * self.heartbeat_s,
        }

    def _release(self, lease_id: int) -> proto.ExpertdError | None:
        slots = self.leases.pop(lease_id, None)
        if slots is None:
            return proto.LeaseError(f"no lease {lease_id}", "unknown_lease")
        for slot in slots:
            self.pins[slot] -= 1
        return None

    def _acquire(self, request: proto.Acquire) -> Any:
        # as the real daemon: every check first, then the releases, then the acquire
        if request.layer >= self.manifest.num_layers or any(
            e >= self.manifest.num_experts for e in request.experts
        ):
            return proto.RangeError(f"layer {request.layer} experts {request.experts} out of range")
        for lease_id in request.release:  # unknown ones are gone already: ignored
            self._release(lease_id)
        slots, hits = [], 0
        for expert in request.experts:
            key = (request.layer, expert)
            slot = self.resident.get(key)
            if slot is None:
                free = [s for s in self.lru if self.pins[s] == 0]
                if not free:
                    return proto.CapacityError(f"no free slot for {key}", "capacity")
                slot = free[0]
                for old, s in list(self.resident.items()):
                    if s == slot:
                        del self.resident[old]
                self.reader.read_expert(request.layer, expert, self.slab.slot(slot))
                self.resident[key] = slot
            else:
                hits += 1
            self.pins[slot] += 1
            self.lru.remove(slot)
            self.lru.append(slot)
            slots.append(slot)
        lease_id = next(self.lease_ids)
        self.leases[lease_id] = slots
        return {"lease": lease_id, "tier": "host", "slots": slots, "hits": hits}
