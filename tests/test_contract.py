"""The wire contract alone: every reply the daemon builds is what the client parses."""

from __future__ import annotations

import pytest

from expertd.daemon import protocol as proto


def _hello(**changes) -> proto.HelloReply:
    fields = dict(
        protocol=proto.PROTOCOL_VERSION, daemon="0.1.0", model="m", num_layers=2, num_experts=4,
        checkpoint_layers=(1, 3), dtype="bfloat16",
        tensors=(proto.TensorSpec("w1", "bfloat16", (4, 8), 0), proto.TensorSpec("w2", "float32", (8,), 256)),
        raw_bytes=320, slot_bytes=4096, tiers={"host": {"kind": "host", "slots": 3, "slot_bytes": 4096}},
        default_tier="host", heartbeat_s=1.0, lease_timeout_s=4.0,
    )  # fmt: skip
    fields.update(changes)
    return proto.HelloReply(**fields)


LAYOUT = {"family": "gpt_oss", "weights": {"gate_up_proj": ["gate_up_proj"]}, "transposed": True}
REPLIES = [
    (proto.Op.HELLO, _hello()),
    (proto.Op.HELLO, _hello(expert_layout=LAYOUT)),
    (proto.Op.ACQUIRE, proto.LeaseReply(7, "device", (3, 1), 1)),
    (proto.Op.ACQUIRE, proto.LeaseReply(8, "auto", (3, 1), 1, ("device", "host"))),
    (proto.Op.RELEASE, proto.Done()),
    (proto.Op.STATS, proto.StatsReply({"tiers": {"host": {"hits": 3}}})),
    (proto.Op.PING, proto.Pong()),
    (proto.Op.SHUTDOWN, proto.Done()),
    (proto.Op.LOAD_STATE, proto.LoadStateReply("/tmp/x.state")),
]


@pytest.mark.parametrize(("op", "reply"), REPLIES, ids=[op.value for op, _ in REPLIES])
def test_every_reply_survives_the_wire_as_its_type(op, reply):
    request_id, ok = proto.decode_reply(proto.encode_reply(41, reply))
    assert request_id == 41
    assert proto.parse_reply(op, ok) == reply


def test_every_answered_op_has_a_reply_type_and_no_other_does():
    # ping is fire-and-forget unless it asks for a reply
    assert set(proto.REPLY_TYPES) == set(proto.Op) - (proto.NO_REPLY - {proto.Op.PING})


def test_every_error_code_comes_back_as_its_class():
    for code in proto.ErrorCode:
        _, error = proto.decode_reply(proto.encode_error(1, code, "why"))
        assert isinstance(error, proto.error_class(code)) and error.code == code and str(error) == "why"


def test_a_reply_from_another_protocol_version_is_refused_by_name():
    ok = {**_hello().to_wire(), "protocol": 1}  # 2 is still spoken (`SUPPORTED_VERSIONS`)
    with pytest.raises(proto.ProtocolError, match="speaks protocol 1, this client"):
        proto.HelloReply.from_wire(ok)


@pytest.mark.parametrize(
    ("op", "ok", "message"),
    [
        (proto.Op.ACQUIRE, {"lease": 1, "tier": "host"}, "acquire reply is malformed"),
        (proto.Op.ACQUIRE, {"lease": "x", "tier": "host", "slots": [1]}, "acquire reply is malformed"),
        (proto.Op.HELLO, {"protocol": proto.PROTOCOL_VERSION}, "hello reply lacks"),
        (proto.Op.HELLO, {**_hello().to_wire(), "expert_layout": 3}, "expert_layout must be a map or nil"),
    ],
)
def test_malformed_replies_are_protocol_errors(op, ok, message):
    with pytest.raises(proto.ProtocolError, match=message):
        proto.parse_reply(op, ok)
