"""tier="auto" on the wire: request checks, per-expert places, and a protocol-2 client still served."""

from __future__ import annotations

from pathlib import Path

import pytest
from daemon_util import DaemonProcess, RawClient

from expertd.daemon import protocol as proto
from expertd.daemon.protocol.wire import pack
from expertd.daemon.store.pack import pack_synthetic


def acquire_frame(**fields) -> bytes:
    return pack({"op": "acquire", "id": 5, "layer": 0, "experts": [1, 2], **fields})


def test_an_auto_acquire_with_tokens_decodes() -> None:
    _, request = proto.decode_request(acquire_frame(tier="auto", tokens=[3, 1]))
    assert request == proto.Acquire(0, [1, 2], "auto", tokens=[3, 1])
    _, plain = proto.decode_request(acquire_frame(tier="auto"))
    assert plain.tokens is None and plain.tier == "auto"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"tier": "device", "tokens": [1, 1]}, "tokens is for tier 'auto' only, not 'device'"),
        ({"tier": "auto", "tokens": [1]}, "tokens has 1 counts for 2 experts"),
        ({"tier": "auto", "tokens": [1, 0]}, r"tokens\[1\] must be a token count in \[1, 1048576\], got 0"),
        ({"tier": "auto", "tokens": [2**20 + 1, 1]}, r"tokens\[0\] must be a token count"),
        (
            {"tier": "auto", "tokens": [True, 1]},
            r"tokens\[0\] must be a token count in \[1, 1048576\], got True",
        ),
        ({"tier": "auto", "tokens": [1.5, 1]}, r"tokens\[0\] must be a token count"),
        ({"tier": "auto", "tokens": "many"}, "tokens must be a list of at most 1024 counts"),
        ({"tier": "auto", "tokens": [1] * 1025}, "not valid msgpack|tokens must be a list of at most 1024"),
    ],
)
def test_bad_token_counts_are_refused_by_name(fields, says) -> None:
    with pytest.raises(proto.ProtocolError, match=says):
        proto.decode_request(acquire_frame(**fields))


def test_an_auto_reply_must_place_every_slot() -> None:
    ok = {"lease": 1, "tier": "auto", "slots": [0, 4], "hits": 0, "places": ["device"]}
    with pytest.raises(proto.ProtocolError, match="1 places for 2 slots"):
        proto.LeaseReply.from_wire(ok)
    reply = proto.LeaseReply.from_wire({**ok, "places": ["device", "host"]})
    assert (reply.tier_of(0), reply.tier_of(1)) == ("device", "host")
    assert proto.LeaseReply.from_wire({"lease": 1, "tier": "host", "slots": [2]}).tier_of(0) == "host"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "mixtral"
    pack_synthetic(path, "mixtral-8x7b", scale=64, layers=2)  # 2 layers x 8 experts
    return path


@pytest.fixture
def daemon(store, short_dir):
    proc = DaemonProcess(
        store, short_dir, "--host-size", "16 slots", "--device", "cpu", "--device-size", "4 slots"
    )
    yield proc
    proc.kill()


def test_a_protocol_2_client_is_served_as_before_and_refused_auto_by_name(daemon) -> None:
    old = RawClient(daemon.address)
    hello = old.request(1, proto.Hello(version=2, client="old"))
    assert isinstance(hello, dict) and hello["protocol"] == 2, hello
    proto.HelloReply.from_wire(hello)  # what a version-2 client parses
    lease = old.request(2, proto.Acquire(0, [1, 2], "device"))
    assert isinstance(lease, dict) and "places" not in lease and lease["tier"] == "device"
    assert len(lease["slots"]) == 2
    refused = old.request(3, proto.Acquire(1, [1], "auto", release=[lease["lease"]]))
    assert isinstance(refused, proto.ExpertdError) and refused.code == "bad_request"
    assert "tier 'auto' needs protocol 3; this session said hello with 2" in str(refused)
    old.close()


def test_protocol_1_and_unknown_tiers_are_refused_by_name(daemon) -> None:
    raw = RawClient(daemon.address)
    error = raw.request(1, proto.Hello(version=1, client="older"))
    assert isinstance(error, proto.ExpertdError) and error.code == "unsupported_version"
    raw.hello()
    unknown = raw.request(2, proto.Acquire(0, [1], "gpu"))
    assert isinstance(unknown, proto.ExpertdError) and "unknown tier 'gpu'" in str(unknown)
    bad = raw.request(3, proto.Acquire(0, [1], "device", tokens=[4]))
    assert isinstance(bad, proto.ExpertdError) and "tokens is for tier 'auto' only" in str(bad)
    assert raw.request(4, proto.Ping(reply=True)) == {"pong": True}  # still serving
    raw.close()


def test_a_private_tenant_is_refused_auto_and_a_shared_one_is_placed(store, short_dir) -> None:
    """Host placement has no timing shadow: a private tenant's auto acquire would tell, by where its
    experts are placed, what the others keep on the device. So it is refused, by name."""
    conf = short_dir / "expertd.toml"
    conf.write_text('[tenants.eve]\nisolation = "private"\n')
    daemon = DaemonProcess(
        store, short_dir, "--config", str(conf), "--host-size", "16 slots", "--device", "cpu",
        "--device-size", "4 slots", "--host-gbps", "100", "--max-pinned-share", "1",
    )  # fmt: skip
    try:
        eve, bob = RawClient(daemon.address), RawClient(daemon.address)
        eve.hello("eve", tenant="eve")
        bob.hello("bob")
        refused = eve.request(2, proto.Acquire(0, [1], "auto", tokens=[1]))
        assert isinstance(refused, proto.ExpertdError) and refused.code == "bad_request"
        assert "not offered to a private tenant" in str(refused)
        assert isinstance(eve.request(3, proto.Acquire(0, [1], "device")), dict)  # its own tiers still serve
        placed = bob.request(2, proto.Acquire(0, [2, 3], "auto", tokens=[1, 1]))
        assert isinstance(placed, dict) and placed["tier"] == "auto" and len(placed["places"]) == 2
        eve.close()
        bob.close()
    finally:
        daemon.kill()
