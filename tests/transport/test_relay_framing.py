"""The relay protocol without I/O: framing, frames, error codes, auth bytes, states, limits."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hushchat.protocol import consts
from hushchat.protocol.encoding import pack
from hushchat.protocol.errors import (
    DecodeError,
    HushchatError,
    InvalidArgument,
    ProtocolError,
    RemoteProtocolError,
    all_error_classes,
)
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic
from hushchat.transport.relay.config import RelayLimits, parse_duration
from hushchat.transport.relay.ratelimit import (
    KeyedRateLimiter,
    LogThrottle,
    RateLimit,
    TokenBucket,
)
from hushchat.transport.wire import limits
from hushchat.transport.wire.auth import RELAY_AUTH_CONTEXT, auth_message, sign_auth, verify_auth
from hushchat.transport.wire.errors import (
    RELAY_ERROR_CLASSES,
    BadFrame,
    FrameTooLarge,
    PayloadTooLarge,
    RelayError,
    TooManyRecipients,
    UnknownFrame,
    relay_error_from_wire,
)
from hushchat.transport.wire.frames import (
    Accepted,
    Ack,
    BadRequest,
    EnvelopePush,
    ErrorFrame,
    FrameType,
    Hello,
    Ping,
    QueueEmpty,
    RequestLimits,
    SendDirect,
    SendGroup,
    UploadPreKeys,
    decode_relay_frame,
    decode_request,
    encode_body,
)
from hushchat.transport.wire.framing import FrameDecoder, encode_frame
from hushchat.transport.wire.limits import MAX_IN_FLIGHT, RELAY_PROTOCOL_VERSION
from hushchat.transport.wire.records import Envelope
from hushchat.transport.wire.states import ALLOWED_REQUESTS, ConnectionState, check_request
from tests.support.wire_samples import ERRORS, RELAY_FRAMES, REQUESTS, SIGNATURE

# ------------------------------------------------------------------ framing


@settings(max_examples=60)
@given(
    bodies=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=10),
)
def test_decoder_reassembles_frames_however_the_stream_is_cut(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder(max_frame_size=300)
    got = []
    previous = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        decoder.receive_data(stream[previous:cut])
        previous = cut
        while (body := decoder.next_frame()) is not None:
            got.append(body)
    assert got == bodies
    assert not decoder.in_frame


def test_oversized_length_prefix_is_refused_before_the_body() -> None:
    # As h11's max_incomplete_event_size countermeasure: a parameter, checked early.
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data((101).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()
    exact = FrameDecoder(max_frame_size=100)
    exact.receive_data(encode_frame(b"x" * 100, max_frame_size=100))
    assert exact.next_frame() == b"x" * 100


def test_default_decoder_refuses_a_huge_prefix() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_in_frame_tracks_partial_frames() -> None:
    decoder = FrameDecoder()
    assert not decoder.in_frame
    decoder.receive_data(b"\x00\x00")
    assert decoder.in_frame and decoder.next_frame() is None
    decoder.receive_data(b"\x00\x02a")
    assert decoder.next_frame() is None and decoder.in_frame
    decoder.receive_data(b"b")
    assert decoder.next_frame() == b"ab"
    assert not decoder.in_frame


def test_encode_frame_refuses_oversized_bodies() -> None:
    with pytest.raises(InvalidArgument):
        encode_frame(b"x" * 11, max_frame_size=10)
    with pytest.raises(InvalidArgument):
        FrameDecoder(max_frame_size=0)
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"


# ------------------------------------------------------------------ frames


@pytest.mark.parametrize("request_frame", REQUESTS, ids=lambda f: type(f).__name__)
def test_requests_round_trip(request_frame: Any) -> None:
    body = encode_body(request_frame)
    assert msgpack.unpackb(body)[0] == request_frame.TYPE
    assert decode_request(body) == request_frame


@pytest.mark.parametrize("frame", RELAY_FRAMES, ids=lambda f: type(f).__name__)
def test_relay_frames_round_trip(frame: Any) -> None:
    assert decode_relay_frame(encode_body(frame)) == frame


def test_exact_bodies() -> None:
    assert encode_body(Hello(1, 1, 10)) == bytes([0x94, 0x01, 0x01, 0x01, 0x0A])
    assert encode_body(Ping(5)) == bytes([0x92, 0x16, 0x05])
    assert encode_body(QueueEmpty()) == bytes([0x91, 0x1F])
    assert encode_body(Ack(1, (bytes(16),))) == bytes([0x93, 0x15, 0x01, 0x91, 0xC4, 0x10]) + bytes(
        16
    )
    # Relay protocol 3: sends end with their resend flag, ACCEPTED with the full mailboxes.
    assert encode_body(SendDirect(1, "b", ((2, b"p"),))) == pack([18, 1, "b", [[2, b"p"]], False])
    assert encode_body(SendGroup(1, b"p", (("b", 2),), resend=True)) == pack(
        [19, 1, b"p", [["b", 2]], True]
    )
    assert encode_body(Accepted(1, 5, (("b", 2),))) == pack([20, 1, 5, [["b", 2]]])
    assert encode_body(Accepted(1, 5)) == pack([20, 1, 5, []])
    envelope = Envelope(b"\x01" * 16, 5, "a", 2, 1, b"p")
    assert encode_body(EnvelopePush(envelope)) == pack([30, [b"\x01" * 16, 5, "a", 2, 1, b"p"]])


def bad(body: bytes, limits_: RequestLimits | None = None) -> BadRequest:
    result = decode_request(body, limits_ or RequestLimits())
    assert isinstance(result, BadRequest)
    return result


def test_undecodable_requests_name_their_error_and_request_id() -> None:
    assert bad(b"").request_id is None
    assert isinstance(bad(b"\xc1").error, BadFrame)
    assert isinstance(bad(pack({"a": 1})).error, BadFrame)
    unknown = bad(pack([99, 42]))
    assert (unknown.request_id, type(unknown.error)) == (42, UnknownFrame)
    # A relay-to-client frame type sent by a client is unknown as a request.
    assert isinstance(bad(pack([FrameType.WELCOME, 1, 1, "x", bytes(32)])).error, UnknownFrame)
    trailing = bad(pack([FrameType.PING, 7, "extra"]))
    assert (trailing.request_id, type(trailing.error)) == (7, BadFrame)
    assert isinstance(bad(pack([FrameType.AUTH, 1, "alice", 1, b"short"])).error, BadFrame)
    assert isinstance(
        bad(pack([FrameType.HELLO, 1, RELAY_PROTOCOL_VERSION, 0])).error, BadFrame
    )  # window 0
    assert isinstance(bad(pack([FrameType.HELLO, 1, RELAY_PROTOCOL_VERSION])).error, BadFrame)
    assert isinstance(bad(pack([FrameType.FETCH_DEVICE_LIST, 1, ""])).error, BadFrame)
    assert isinstance(bad(pack([FrameType.FETCH_DEVICE_LIST, 1, "x" * 65])).error, BadFrame)
    # Non-canonical: an integer in a wider format than needed.
    assert isinstance(bad(b"\x92\x16\xcd\x00\x05").error, BadFrame)
    # Version 2's sends, without the resend flag, and a flag that is not a bool.
    assert isinstance(bad(pack([FrameType.SEND_DIRECT, 1, "b", [[1, b"p"]]])).error, BadFrame)
    assert isinstance(bad(pack([FrameType.SEND_GROUP, 1, b"p", [["b", 1]], 1])).error, BadFrame)


def test_accepted_of_relay_protocol_2_does_not_decode() -> None:
    with pytest.raises(DecodeError):
        decode_relay_frame(pack([FrameType.ACCEPTED, 1, 5]))
    with pytest.raises(DecodeError):
        decode_relay_frame(pack([FrameType.ACCEPTED, 1, 5, [["bob"]]]))


def test_hello_of_another_version_is_read_whatever_follows() -> None:
    # So that the relay can answer UNSUPPORTED_VERSION to any future client.
    future = RELAY_PROTOCOL_VERSION + 1
    assert decode_request(pack([FrameType.HELLO, 4, future, [b"new", "fields"], None])) == Hello(
        4, future, 0
    )
    assert decode_request(pack([FrameType.HELLO, 4, 1])) == Hello(4, 1, 0)  # an older one


def test_static_limits_are_checked_while_decoding() -> None:
    small = RequestLimits(max_payload_size=4, max_recipients=2, max_prekeys_per_upload=1)
    big = bad(encode_body(SendDirect(3, "bob", ((1, b"12345"),))), small)
    assert (big.request_id, type(big.error)) == (3, PayloadTooLarge)
    assert isinstance(
        bad(encode_body(SendGroup(1, b"12345", (("b", 1),))), small).error, PayloadTooLarge
    )
    many = SendGroup(4, b"x", (("a", 1), ("b", 1), ("c", 1)))
    assert isinstance(bad(encode_body(many), small).error, TooManyRecipients)
    twice = SendGroup(5, b"x", (("a", 1), ("a", 1)))
    assert isinstance(bad(encode_body(twice)).error, BadFrame)
    direct_twice = SendDirect(6, "a", ((1, b"x"), (1, b"y")))
    assert isinstance(bad(encode_body(direct_twice)).error, BadFrame)
    keys = tuple(OneTimePreKeyPublic(i, bytes(32)) for i in range(2))
    assert isinstance(
        bad(encode_body(UploadPreKeys(1, None, None, keys, ())), small).error, BadFrame
    )
    oversize = bad(encode_body(Ping(1)), RequestLimits(max_frame_size=2))
    assert isinstance(oversize.error, BadFrame)


def test_ack_names_one_to_max_distinct_guids() -> None:
    guids = tuple(bytes([i]) * 16 for i in range(3))
    assert decode_request(encode_body(Ack(1, guids)), RequestLimits(max_ack_guids=3)) == Ack(
        1, guids
    )
    too_many = bad(encode_body(Ack(2, guids)), RequestLimits(max_ack_guids=2))
    assert (too_many.request_id, type(too_many.error)) == (2, BadFrame)
    for wrong in ([], [guids[0], guids[0]], [b"short"], [bytes(17)], ["x" * 16], [None]):
        refused = bad(pack([FrameType.ACK, 3, wrong]))
        assert (refused.request_id, type(refused.error)) == (3, BadFrame)
    assert isinstance(bad(pack([FrameType.ACK, 4, guids[0]])).error, BadFrame)  # not a list
    # A relay with a smaller window still takes ACKs up to the protocol's bound.
    assert RelayLimits(max_in_flight=2).request_limits.max_ack_guids == MAX_IN_FLIGHT
    for outside in (0, MAX_IN_FLIGHT + 1):
        with pytest.raises(InvalidArgument):
            RelayLimits(max_in_flight=outside)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=6),
    max_leaves=25,
)


@settings(max_examples=300)
@given(frame_type=st.sampled_from(list(FrameType)), rest=st.lists(msgpack_values, max_size=6))
def test_decode_request_is_total_on_structured_input(frame_type: int, rest: list[Any]) -> None:
    result = decode_request(pack([frame_type, *rest]))
    assert isinstance(result, BadRequest) or frame_type == result.TYPE


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_decode_request_is_total_on_bytes(body: bytes) -> None:
    decode_request(body)


@settings(max_examples=100)
@given(frame_type=st.sampled_from(list(FrameType)), rest=st.lists(msgpack_values, max_size=6))
def test_decode_relay_frame_raises_only_decode_errors(frame_type: int, rest: list[Any]) -> None:
    with contextlib.suppress(DecodeError, UnknownFrame):
        decode_relay_frame(pack([frame_type, *rest]))


def test_envelope_repr_hides_payload_and_round_trips() -> None:
    envelope = Envelope(b"\x01" * 16, 5, "alice", 2, 1, b"secret ciphertext")
    assert "secret" not in repr(envelope)
    assert Envelope.decode(envelope.encode()) == envelope


# ------------------------------------------------------------------ errors


def test_connection_failures_and_refusals_are_not_protocol_errors() -> None:
    """One tree: an app's ``except ProtocolError`` never swallows a dropped connection."""
    import hushchat.transport as transport

    for failure in (transport.ConnectionClosed, transport.RelayTimeout):
        assert issubclass(failure, transport.ConnectionFailure)
    for cls in (transport.ConnectionFailure, transport.RelayError, *RELAY_ERROR_CLASSES.values()):
        assert issubclass(cls, transport.TransportError)
        assert not issubclass(cls, ProtocolError)
    assert issubclass(transport.RelayProtocolViolation, RemoteProtocolError)
    assert issubclass(transport.TransportError, HushchatError)
    assert issubclass(ProtocolError, HushchatError)


def test_error_codes_are_unique_and_disjoint_from_protocol_codes() -> None:
    relay_codes = [cls.code for cls in RELAY_ERROR_CLASSES.values()]
    assert len(set(relay_codes)) == len(relay_codes)
    all_codes = [cls.code for cls in all_error_classes()]
    assert len(set(all_codes)) == len(all_codes)


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: e.wire_code)
def test_errors_round_trip_through_error_frames(error: RelayError) -> None:
    frame = decode_relay_frame(encode_body(ErrorFrame.from_error(9, error)))
    assert isinstance(frame, ErrorFrame)
    back = relay_error_from_wire(frame.code, frame.message, frame.detail)
    assert type(back) is type(error)
    assert back.message == error.message
    assert back.detail_to_wire() == error.detail_to_wire()


def test_unknown_codes_and_bad_details() -> None:
    future = relay_error_from_wire("SOMETHING_NEW", "msg", [1, 2])
    assert type(future) is RelayError and future.wire_code == "SOMETHING_NEW"
    for code, detail in [
        ("RATE_LIMITED", "soon"),
        ("BAD_FRAME", 1),
        ("DEVICE_LIST_MISMATCH", [["bob", b"x", [1]]]),
        ("MAILBOX_FULL", [["bob"]]),
        ("UNKNOWN_USER", ""),
        ("UNSUPPORTED_VERSION", ["1"]),
    ]:
        with pytest.raises(DecodeError):
            relay_error_from_wire(code, "", detail)


# ------------------------------------------------------------------ auth


def test_auth_message_exact_bytes() -> None:
    challenge = bytes(range(32))
    expected = b"hushchat_relay_auth" + b"\x94\xa5relay\xc4\x20" + challenge + b"\xa5alice\x07"
    assert auth_message("relay", challenge, "alice", 7) == expected


def test_auth_context_is_separated_from_other_signatures() -> None:
    assert not consts.DEVICE_LIST_SIGNATURE_CONTEXT.startswith(RELAY_AUTH_CONTEXT)
    assert not RELAY_AUTH_CONTEXT.startswith(consts.DEVICE_LIST_SIGNATURE_CONTEXT)
    # Prekey signatures sign Encode(PK), which starts with a key type byte.
    assert RELAY_AUTH_CONTEXT[0] not in (
        consts.KEY_TYPE_X25519,
        consts.KEY_TYPE_ED25519,
        consts.KEY_TYPE_MLKEM768,
    )


def test_auth_signature_binds_every_field() -> None:
    key = IdentityKeyPair(b"\x01" * 32)
    challenge = b"\x02" * 32
    signature = sign_auth(key, "relay", challenge, "alice", 1)
    verify_auth(key.public.ed25519, signature, "relay", challenge, "alice", 1)
    for args in [
        ("other relay", challenge, "alice", 1),
        ("relay", b"\x03" * 32, "alice", 1),
        ("relay", challenge, "alicf", 1),
        ("relay", challenge, "alice", 2),
    ]:
        with pytest.raises(RemoteProtocolError):
            verify_auth(key.public.ed25519, signature, *args)


# ------------------------------------------------------------------ states


def test_state_table() -> None:
    check_request(ConnectionState.AWAIT_HELLO, FrameType.HELLO)
    for state, frame_type in [
        (ConnectionState.AWAIT_HELLO, FrameType.AUTH),
        (ConnectionState.AWAIT_HELLO, FrameType.PING),
        (ConnectionState.UNAUTHENTICATED, FrameType.HELLO),
        (ConnectionState.UNAUTHENTICATED, FrameType.SEND_DIRECT),
        (ConnectionState.UNAUTHENTICATED, FrameType.FETCH_BUNDLE),
        (ConnectionState.AUTHENTICATED, FrameType.AUTH),
        (ConnectionState.AUTHENTICATED, FrameType.HELLO),
        (ConnectionState.CLOSED, FrameType.PING),
    ]:
        with pytest.raises(RelayError) as info:
            check_request(state, frame_type)
        assert info.value.code == "UNEXPECTED_FRAME"
    # Only requests appear in the table; pushes and replies never do.
    allowed = set().union(*ALLOWED_REQUESTS.values())
    assert FrameType.ENVELOPE not in allowed and FrameType.OK not in allowed


# ------------------------------------------------------------------ rate limits


def test_token_bucket() -> None:
    bucket = TokenBucket(RateLimit(capacity=2, per_second=0.5), now=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(2.0)
    assert bucket.take(1.0) == pytest.approx(1.0)
    assert bucket.take(2.0) == 0.0
    assert not bucket.is_full(2.0)
    assert bucket.is_full(6.0)
    with pytest.raises(InvalidArgument):
        RateLimit(capacity=0, per_second=1)


def test_a_token_given_back_undoes_its_take() -> None:
    # A refused request spends no token (rule 3): take, then give back.
    bucket = TokenBucket(RateLimit(capacity=2, per_second=0.5), now=0.0)
    assert bucket.take(0.0) == 0.0
    bucket.give_back()
    assert bucket.is_full(0.0)
    bucket.give_back()  # never above the capacity
    assert [bucket.take(0.0), bucket.take(0.0)] == [0.0, 0.0] and bucket.take(0.0) > 0
    limiter: KeyedRateLimiter[str] = KeyedRateLimiter(RateLimit(1, 1.0), max_keys=9)
    assert limiter.take("a", 0.0) == 0.0
    limiter.give_back("a")
    limiter.give_back("b")  # a key with no bucket: nothing to give back
    assert limiter.take("a", 0.0) == 0.0 and limiter.take("a", 0.0) > 0
    limiter.prune(0.0)
    assert len(limiter) == 1  # "a" is not full: its bucket stays


def test_a_log_throttle_lets_one_line_through_per_interval_and_counts_the_rest() -> None:
    throttle = LogThrottle(60.0)
    assert throttle.event(0.0) == 0
    assert [throttle.event(t) for t in (1.0, 30.0, 59.9)] == [None, None, None]
    assert throttle.event(60.0) == 3
    assert throttle.event(61.0) is None
    assert throttle.event(1000.0) == 1
    with pytest.raises(InvalidArgument):
        LogThrottle(0)


def test_keyed_rate_limiter_prunes_and_bounds_keys() -> None:
    limiter: KeyedRateLimiter[str] = KeyedRateLimiter(RateLimit(1, 1.0), max_keys=2)
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) > 0
    assert limiter.take("b", 0.0) == 0.0
    assert limiter.take("c", 0.0) == 0.0  # evicts the oldest ("a")
    assert len(limiter) == 2
    limiter.prune(10.0)
    assert len(limiter) == 0


# ------------------------------------------------------------------ durations and limits


@pytest.mark.parametrize(
    ("text", "seconds"), [("72h", 259_200), ("3d", 259_200), ("90m", 5400), ("3600s", 3600)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "72", "h", "1.5h", "-1h", "0s", "3w", "1h30m", "٣h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_duration(text)


def test_largest_legitimate_frames_fit() -> None:
    longest_user = "u" * consts.MAX_USER_ID_SIZE
    payload = b"\x00" * limits.MAX_PAYLOAD_SIZE
    direct = SendDirect(
        2**32 - 1,
        longest_user,
        tuple((2**32 - 1 - i, payload) for i in range(consts.MAX_DEVICES_PER_USER)),
    )
    group = SendGroup(
        2**32 - 1,
        payload,
        tuple(
            (f"{i:0{consts.MAX_USER_ID_SIZE}d}", 2**32 - 1 - d)
            for i in range(consts.MAX_GROUP_MEMBERS)
            for d in range(consts.MAX_DEVICES_PER_USER)
        ),
    )
    kem = KemPreKeyPublic(2**32 - 1, bytes(consts.MLKEM768_PUBLIC_KEY_SIZE), SIGNATURE)
    upload = UploadPreKeys(
        2**32 - 1,
        SignedPreKeyPublic(2**32 - 1, bytes(32), SIGNATURE),
        kem,
        tuple(
            OneTimePreKeyPublic(2**32 - 1 - i, bytes(32))
            for i in range(limits.MAX_PREKEYS_PER_UPLOAD)
        ),
        (kem,) * limits.MAX_PREKEYS_PER_UPLOAD,
    )
    envelope = EnvelopePush(Envelope(bytes(16), 2**64 - 1, longest_user, 2**32 - 1, 2, payload))
    for frame in (direct, group, upload, envelope):
        assert len(encode_body(frame)) <= limits.MAX_FRAME_SIZE
    assert len(group.recipients) == limits.MAX_RECIPIENTS_PER_SEND
    assert limits.CLIENT_INCOMING_QUEUE_SIZE > limits.MAX_IN_FLIGHT
    assert limits.CLIENT_KEEPALIVE < limits.IDLE_TIMEOUT
