"""relay.json: the relay protocol's frames (spec/07-relay-protocol.md), byte for byte.

So that a client in another language can test its framing without a relay:

* ``RequestFrame``: frames a client sends, each read by a relay in the
  connection state ``state``. Valid: the fields in ``decoded``, and encoding
  them gives ``frame`` back. Invalid: the relay's answer: the ``error`` code,
  the ``request_id`` its ERROR echoes (null when none could be read), the
  ``detail`` and whether the error ``closes`` the connection.
* ``RelayFrame``: frames a relay sends. Valid: ``decoded``; invalid: the
  relay-protocol code naming the defect (the client sends nothing back: it
  closes the connection, a protocol violation).
* ``LengthPrefix``: the 4 length bytes alone, against the receiver's maximum
  frame size: valid (it waits for the body) or FRAME_TOO_LARGE.
* ``Session``: one scripted connection (HELLO, WELCOME, registration, AUTH
  over a fixed challenge with a fixed device key, a send, a push, an ACK).

Frames are whole: the 4-byte length, then the body. Verification decodes
with hushchat.transport's own decoders and state table.
"""

from __future__ import annotations

from typing import Any

from hushchat.protocol.devices import DeviceEntry, DeviceList, SignedDeviceList
from hushchat.protocol.encoding import pack
from hushchat.protocol.errors import ProtocolError
from hushchat.protocol.keys import IdentityKeyPair, encode_mlkem768, encode_x25519
from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic
from hushchat.protocol.primitives import (
    mlkem768_generate,
    mlkem768_public_bytes,
    x25519_generate,
    x25519_public_bytes,
)
from hushchat.transport.wire.auth import auth_message, sign_auth, verify_auth
from hushchat.transport.wire.errors import (
    BadFrame,
    DeviceListMismatch,
    DeviceListRejected,
    DeviceMismatch,
    FrameTooLarge,
    IdleTimeout,
    InviteRefused,
    MailboxFull,
    PreKeysRejected,
    RateLimited,
    RegistrationClosed,
    RelayError,
    StorageFull,
    UnexpectedFrame,
    UnknownFrame,
    UnknownUser,
    UnsupportedVersion,
    relay_error_from_wire,
)
from hushchat.transport.wire.frames import (
    Accepted,
    Ack,
    Auth,
    BadRequest,
    BundleFrame,
    DeviceListFrame,
    EnvelopePush,
    ErrorFrame,
    FetchBundle,
    FetchDeviceList,
    Frame,
    FrameType,
    Hello,
    MailExpired,
    Ok,
    Ping,
    PreKeyCountsFrame,
    PreKeysLow,
    PublishDeviceList,
    QueueEmpty,
    RelayFrame,
    Request,
    SendChange,
    SendDirect,
    SendGroup,
    UploadPreKeys,
    Welcome,
    decode_relay_frame,
    decode_request,
    encode_body,
)
from hushchat.transport.wire.framing import FrameDecoder, encode_frame
from hushchat.transport.wire.limits import (
    MAX_FRAME_SIZE,
    MAX_IN_FLIGHT,
    MAX_PAYLOAD_SIZE,
    MAX_PREKEYS_PER_UPLOAD,
    MAX_RECIPIENTS_PER_SEND,
    MAX_UNAUTHENTICATED_FRAME_SIZE,
    RELAY_PROTOCOL_VERSION,
)
from hushchat.transport.wire.records import RECEIPT_SIZE, Envelope, EnvelopeKind
from hushchat.transport.wire.states import (
    ConnectionState,
    check_request,
    state_after_error,
    state_after_success,
)

from . import handshake
from ._common import Checker, Json, case, h, large, note, seeded, unhex_any, vector_file

NAME = "relay"

NOTES = {
    "Valid": note("BASIC", "A well-formed frame and its fields."),
    "AtLimit": note("EDGE_CASE", "A size or count exactly at its limit (valid; one more is not)."),
    "NonCanonical": note("CAN_OF_WORMS", "The body is not the canonical encoding of its value."),
    "NotAnArray": note("BASIC", "The body is not a msgpack array."),
    "WrongFields": note("BASIC", "A field of the wrong type or size, or one too many or too few."),
    "NulUserId": note(
        "AUTH_BYPASS",
        "A user id containing U+0000: C strings would read it as a shorter id (BAD_FRAME).",
    ),
    "UnknownFrame": note("BASIC", "A frame type the receiver does not accept from that side."),
    "UnexpectedFrame": note("BASIC", "A request the connection's state does not accept."),
    "UnsupportedVersion": note("BASIC", "HELLO names another relay protocol version."),
    "TooLarge": note("DOS", "A frame, payload or list one past its limit."),
    "Duplicate": note("BASIC", "An item named twice where each must be distinct."),
    "BadDetail": note("BASIC", "An ERROR whose detail does not have its code's layout."),
    "UnknownCode": note(
        "BASIC", "An ERROR code the client does not know: a refusal; its detail is not read."
    ),
    "EmptySend": note("EDGE_CASE", "A send that names no device (accepted; nothing is stored)."),
    "CheckOrder": note(
        "EDGE_CASE",
        "Two defects: the check that comes first (decoding, then the state, then the HELLO "
        "version; the fields in order) decides the error; the comment says which.",
    ),
    "Session": note("BASIC", "A scripted connection, frame by frame."),
}

AUTHENTICATED = ConnectionState.AUTHENTICATED
UNAUTHENTICATED = ConnectionState.UNAUTHENTICATED
AWAIT_HELLO = ConnectionState.AWAIT_HELLO

# The reply frame type of each request (ERROR can answer any).
REPLY_TO: dict[FrameType, FrameType] = {
    FrameType.HELLO: FrameType.WELCOME,
    FrameType.AUTH: FrameType.OK,
    FrameType.PUBLISH_DEVICE_LIST: FrameType.OK,
    FrameType.FETCH_DEVICE_LIST: FrameType.DEVICE_LIST,
    FrameType.UPLOAD_PREKEYS: FrameType.PREKEY_COUNTS,
    FrameType.FETCH_BUNDLE: FrameType.BUNDLE,
    FrameType.SEND_DIRECT: FrameType.ACCEPTED,
    FrameType.SEND_GROUP: FrameType.ACCEPTED,
    FrameType.SEND_CHANGE: FrameType.ACCEPTED,
    FrameType.ACK: FrameType.OK,
    FrameType.PING: FrameType.OK,
}
PUSHES = (
    FrameType.ENVELOPE,
    FrameType.QUEUE_EMPTY,
    FrameType.PREKEYS_LOW,
    FrameType.MAIL_EXPIRED,
)

RELAY_NAME = "relay.example"
CHALLENGE = bytes(range(32))
SERVER_TS = 1_700_000_000_000


# ------------------------------------------------------------------ bytes and frames


def _b(data: bytes) -> Json | str:
    """Hex, or for a byte string ending in a long run of zeros its prefix and length."""
    prefix = data.rstrip(b"\x00")
    if len(data) - len(prefix) <= 1024:
        return h(data)
    return large(prefix, len(data))


def frame_bytes(frame: Frame) -> bytes:
    return encode_frame(encode_body(frame))


def raw_frame(value: Any) -> bytes:
    """A frame whose body is ``pack(value)`` (any value, for malformed frames)."""
    return encode_frame(pack(value))


def _key_json(key: SignedPreKeyPublic | OneTimePreKeyPublic | KemPreKeyPublic) -> Json:
    out: Json = {"key_id": key.key_id, "public": _b(key.public)}
    if not isinstance(key, OneTimePreKeyPublic):
        out["signature"] = h(key.signature)
    return out


def _signed_key(d: Json) -> SignedPreKeyPublic:
    return SignedPreKeyPublic(d["key_id"], unhex_any(d["public"]), unhex_any(d["signature"]))


def _kem_key(d: Json) -> KemPreKeyPublic:
    return KemPreKeyPublic(d["key_id"], unhex_any(d["public"]), unhex_any(d["signature"]))


def _envelope_json(e: Envelope) -> Json:
    return {
        "guid": h(e.guid),
        "server_ts": e.server_ts,
        "sender_user": e.sender_user,
        "sender_device": e.sender_device,
        "kind": e.kind,
        "payload": _b(e.payload),
    }


def _detail_json(code: str, detail: Any) -> Any:
    """An ERROR's detail in JSON: as on the wire, byte strings in hex."""
    if code == DeviceListMismatch.code:
        return [
            {"user_id": u, "signed_device_list": _b(s), "missing": m, "unknown": x}
            for u, s, m, x in detail
        ]
    return detail


def _detail_wire(code: str, detail: Any) -> Any:
    if code == DeviceListMismatch.code:
        return [
            [d["user_id"], unhex_any(d["signed_device_list"]), d["missing"], d["unknown"]]
            for d in detail
        ]
    return detail


def frame_json(frame: Frame) -> Json:
    """A frame's fields, named as in spec/07-relay-protocol.md section 7.5."""
    out: Json = {"type": int(frame.TYPE), "name": frame.TYPE.name}
    match frame:
        case Hello():
            out.update(request_id=frame.request_id, version=frame.version, window=frame.window)
        case Auth():
            out.update(
                request_id=frame.request_id,
                user_id=frame.user_id,
                device_id=frame.device_id,
                signature=h(frame.signature),
            )
        case PublishDeviceList():
            out.update(
                request_id=frame.request_id,
                signed_device_list=_b(frame.signed_device_list),
                invite=frame.invite,
            )
        case DeviceListFrame():
            out.update(request_id=frame.request_id, signed_device_list=_b(frame.signed_device_list))
        case FetchDeviceList():
            out.update(request_id=frame.request_id, user_id=frame.user_id)
        case UploadPreKeys():
            out.update(
                request_id=frame.request_id,
                signed_prekey=None
                if frame.signed_prekey is None
                else _key_json(frame.signed_prekey),
                last_resort_kem=None
                if frame.last_resort_kem is None
                else _key_json(frame.last_resort_kem),
                one_time=[_key_json(k) for k in frame.one_time],
                one_time_kem=[_key_json(k) for k in frame.one_time_kem],
            )
        case FetchBundle():
            out.update(
                request_id=frame.request_id, user_id=frame.user_id, device_id=frame.device_id
            )
        case SendDirect():
            out.update(
                request_id=frame.request_id,
                user_id=frame.user_id,
                messages=[[d, _b(p)] for d, p in frame.messages],
                resend=frame.resend,
            )
        case SendGroup():
            out.update(
                request_id=frame.request_id,
                payload=_b(frame.payload),
                recipients=[[u, d] for u, d in frame.recipients],
                resend=frame.resend,
            )
        case SendChange():
            out.update(
                request_id=frame.request_id,
                receipt=h(frame.receipt),
                messages=[[u, [[d, _b(p)] for d, p in ps]] for u, ps in frame.messages],
            )
        case Ack():
            out.update(request_id=frame.request_id, guids=[h(g) for g in frame.guids])
        case Ping() | Ok():
            out.update(request_id=frame.request_id)
        case ErrorFrame():
            out.update(
                request_id=frame.request_id,
                code=frame.code,
                message=frame.message,
                detail=_detail_json(frame.code, frame.detail),
            )
        case Welcome():
            out.update(
                request_id=frame.request_id,
                version=frame.version,
                relay_name=frame.relay_name,
                challenge=h(frame.challenge),
            )
        case PreKeyCountsFrame():
            out.update(
                request_id=frame.request_id,
                one_time=frame.one_time,
                one_time_kem=frame.one_time_kem,
            )
        case BundleFrame():
            out.update(request_id=frame.request_id, bundle=_b(frame.bundle))
        case Accepted():
            out.update(
                request_id=frame.request_id,
                server_ts=frame.server_ts,
                mailbox_full=[[u, d] for u, d in frame.mailbox_full],
            )
        case EnvelopePush():
            out.update(envelope=_envelope_json(frame.envelope))
        case QueueEmpty():
            pass
        case PreKeysLow():
            out.update(one_time=frame.one_time, one_time_kem=frame.one_time_kem)
        case MailExpired():
            out.update(count=frame.count, first_ts=frame.first_ts, last_ts=frame.last_ts)
    return out


def frame_from_json(d: Json) -> Frame:
    """The frame whose fields ``d`` gives (the inverse of :func:`frame_json`)."""
    kind = FrameType(d["type"])
    rid: Any = d.get("request_id")
    if kind is FrameType.HELLO:
        return Hello(rid, d["version"], d["window"])
    if kind is FrameType.AUTH:
        return Auth(rid, d["user_id"], d["device_id"], unhex_any(d["signature"]))
    if kind is FrameType.PUBLISH_DEVICE_LIST:
        return PublishDeviceList(rid, unhex_any(d["signed_device_list"]), d["invite"])
    if kind is FrameType.DEVICE_LIST:
        return DeviceListFrame(rid, unhex_any(d["signed_device_list"]))
    if kind is FrameType.FETCH_DEVICE_LIST:
        return FetchDeviceList(rid, d["user_id"])
    if kind is FrameType.UPLOAD_PREKEYS:
        spk, last_resort = d["signed_prekey"], d["last_resort_kem"]
        return UploadPreKeys(
            rid,
            None if spk is None else _signed_key(spk),
            None if last_resort is None else _kem_key(last_resort),
            tuple(OneTimePreKeyPublic(k["key_id"], unhex_any(k["public"])) for k in d["one_time"]),
            tuple(_kem_key(k) for k in d["one_time_kem"]),
        )
    if kind is FrameType.FETCH_BUNDLE:
        return FetchBundle(rid, d["user_id"], d["device_id"])
    if kind is FrameType.SEND_DIRECT:
        messages = tuple((device, unhex_any(p)) for device, p in d["messages"])
        return SendDirect(rid, d["user_id"], messages, d["resend"])
    if kind is FrameType.SEND_GROUP:
        recipients = tuple((u, device) for u, device in d["recipients"])
        return SendGroup(rid, unhex_any(d["payload"]), recipients, d["resend"])
    if kind is FrameType.SEND_CHANGE:
        per_user = tuple(
            (u, tuple((device, unhex_any(p)) for device, p in ps)) for u, ps in d["messages"]
        )
        return SendChange(rid, unhex_any(d["receipt"]), per_user)
    if kind is FrameType.ACK:
        return Ack(rid, tuple(unhex_any(g) for g in d["guids"]))
    if kind is FrameType.PING:
        return Ping(rid)
    if kind is FrameType.OK:
        return Ok(rid)
    if kind is FrameType.ERROR:
        return ErrorFrame(rid, d["code"], d["message"], _detail_wire(d["code"], d["detail"]))
    if kind is FrameType.WELCOME:
        return Welcome(rid, d["version"], d["relay_name"], unhex_any(d["challenge"]))
    if kind is FrameType.PREKEY_COUNTS:
        return PreKeyCountsFrame(rid, d["one_time"], d["one_time_kem"])
    if kind is FrameType.BUNDLE:
        return BundleFrame(rid, unhex_any(d["bundle"]))
    if kind is FrameType.ACCEPTED:
        return Accepted(rid, d["server_ts"], tuple((u, device) for u, device in d["mailbox_full"]))
    if kind is FrameType.ENVELOPE:
        e = d["envelope"]
        return EnvelopePush(
            Envelope(
                unhex_any(e["guid"]),
                e["server_ts"],
                e["sender_user"],
                e["sender_device"],
                e["kind"],
                unhex_any(e["payload"]),
            )
        )
    if kind is FrameType.QUEUE_EMPTY:
        return QueueEmpty()
    if kind is FrameType.MAIL_EXPIRED:
        return MailExpired(d["count"], d["first_ts"], d["last_ts"])
    return PreKeysLow(d["one_time"], d["one_time_kem"])


# ------------------------------------------------------------------ verdicts


def _one_body(frame: bytes, max_frame_size: int) -> bytes:
    """The body of ``frame``, which must be exactly one whole frame; FrameTooLarge."""
    decoder = FrameDecoder(max_frame_size=max_frame_size)
    decoder.receive_data(frame)
    body = decoder.next_frame()
    if body is None or decoder.in_frame:
        raise AssertionError("not exactly one whole frame")
    return body


def max_frame_size_in(state: ConnectionState) -> int:
    """The largest frame a relay reads in ``state`` (spec 7.2)."""
    return MAX_FRAME_SIZE if state is AUTHENTICATED else MAX_UNAUTHENTICATED_FRAME_SIZE


def relay_verdict(
    frame: bytes, state: ConnectionState
) -> tuple[Request | None, RelayError | None, int | None]:
    """How a relay in ``state`` takes ``frame``: (request, error, request id its ERROR echoes).

    The relay decodes, then checks the state table, then (HELLO) the version,
    as transport.relay.session does.
    """
    try:
        body = _one_body(frame, max_frame_size_in(state))
    except FrameTooLarge as too_large:
        return None, too_large, None
    request = decode_request(body)
    if isinstance(request, BadRequest):
        return None, request.error, request.request_id
    try:
        check_request(state, request.TYPE)
    except UnexpectedFrame as unexpected:
        return request, unexpected, request.request_id
    if isinstance(request, Hello) and request.version != RELAY_PROTOCOL_VERSION:
        unsupported = UnsupportedVersion("", supported=[RELAY_PROTOCOL_VERSION])
        return request, unsupported, request.request_id
    return request, None, request.request_id


def client_verdict(frame: bytes) -> RelayFrame | str:
    """How a client takes a relay's ``frame``: the frame, or the code naming its defect."""
    try:
        body = _one_body(frame, MAX_FRAME_SIZE)
    except FrameTooLarge:
        return FrameTooLarge.code
    try:
        decoded = decode_relay_frame(body)
        if isinstance(decoded, ErrorFrame):
            relay_error_from_wire(decoded.code, decoded.message, decoded.detail)
    except UnknownFrame:
        return UnknownFrame.code
    except ProtocolError:
        return BadFrame.code
    return decoded


# ------------------------------------------------------------------ sample values


def _keys() -> tuple[IdentityKeyPair, IdentityKeyPair]:
    """Alice's user identity and the identity of her device 1."""
    rng = seeded("relay/alice")
    return IdentityKeyPair(rng.random_bytes(32)), IdentityKeyPair(rng.random_bytes(32))


def _signed_list(user: IdentityKeyPair, device: IdentityKeyPair) -> bytes:
    entries = (DeviceEntry.prove(device, "alice", 1, user.public.ed25519),)
    return DeviceList("alice", user.public.ed25519, 0, entries).sign(user).encode()


def _prekeys(device: IdentityKeyPair) -> UploadPreKeys:
    rng = seeded("relay/prekeys")
    spk = x25519_public_bytes(x25519_generate(rng))
    opk = x25519_public_bytes(x25519_generate(rng))
    kems = [mlkem768_public_bytes(mlkem768_generate(rng)) for _ in range(2)]
    return UploadPreKeys(
        7,
        SignedPreKeyPublic(1, spk, device.sign(encode_x25519(spk))),
        KemPreKeyPublic(2, kems[0], device.sign(encode_mlkem768(kems[0]))),
        (OneTimePreKeyPublic(3, opk),),
        (KemPreKeyPublic(4, kems[1], device.sign(encode_mlkem768(kems[1]))),),
    )


def _guid(label: str) -> bytes:
    return seeded("relay/guid/" + label).random_bytes(16)


def _payload(label: str, size: int = 48) -> bytes:
    """Opaque ciphertext, as far as the relay knows."""
    return seeded("relay/payload/" + label).random_bytes(size)


def _receipt(label: str) -> bytes:
    return seeded("relay/receipt/" + label).random_bytes(RECEIPT_SIZE)


def _filled(head: bytes, size: int, tail: bytes = b"") -> bytes:
    """``head`` (ending before a byte string), a bin 32 of ``size`` zero bytes, ``tail``."""
    return head + b"\xc6" + size.to_bytes(4, "big") + bytes(size) + tail


def _big_send(request_id: int, entries: list[list[object]], size: int) -> bytes:
    """SEND_DIRECT to bob of ``entries`` whose last payload (empty in them) has ``size`` bytes."""
    head = pack([18, request_id, "bob", entries, False])
    return encode_frame(_filled(head[:-3], size, tail=b"\xc2"))  # c4 00 (b""), c2 (false)


# ------------------------------------------------------------------ requests


def _request_cases() -> list[tuple[str, str, ConnectionState, bytes]]:
    """(comment, flag, state, frame) of frames a client sends."""
    user, device = _keys()
    signed = _signed_list(user, device)
    auth = Auth(2, "alice", 1, sign_auth(device, RELAY_NAME, CHALLENGE, "alice", 1))
    guids = [_guid("a"), _guid("b")]
    direct = SendDirect(9, "bob", ((1, _payload("direct 1")), (2, _payload("direct 2"))))
    group = SendGroup(10, _payload("group"), (("bob", 1), ("carol", 3)))
    change = SendChange(
        16,
        _receipt("change"),
        (
            ("bob", ((1, _payload("change bob 1")), (2, _payload("change bob 2")))),
            ("carol", ((3, _payload("change carol 3")),)),
        ),
    )
    a = AUTHENTICATED
    valid: list[tuple[str, str, ConnectionState, bytes]] = [
        ("HELLO", "Valid", AWAIT_HELLO, frame_bytes(Hello(0, RELAY_PROTOCOL_VERSION, 114))),
        ("AUTH", "Valid", UNAUTHENTICATED, frame_bytes(auth)),
        (
            "PUBLISH_DEVICE_LIST before AUTH: registration",
            "Valid",
            UNAUTHENTICATED,
            frame_bytes(PublishDeviceList(1, signed)),
        ),
        (
            "PUBLISH_DEVICE_LIST before AUTH with an invitation token: registration by invitation",
            "Valid",
            UNAUTHENTICATED,
            frame_bytes(PublishDeviceList(1, signed, "Ks1x8c4VbQGq3T0dYqLr2A")),
        ),
        ("PUBLISH_DEVICE_LIST", "Valid", a, frame_bytes(PublishDeviceList(3, signed))),
        ("FETCH_DEVICE_LIST", "Valid", a, frame_bytes(FetchDeviceList(4, "bob"))),
        (
            "UPLOAD_PREKEYS, empty: reads the stock",
            "Valid",
            a,
            frame_bytes(UploadPreKeys(5, None, None, (), ())),
        ),
        ("UPLOAD_PREKEYS with a key of each kind", "Valid", a, frame_bytes(_prekeys(device))),
        ("FETCH_BUNDLE", "Valid", a, frame_bytes(FetchBundle(8, "bob", 2))),
        ("SEND_DIRECT to two devices", "Valid", a, frame_bytes(direct)),
        ("SEND_GROUP to two devices", "Valid", a, frame_bytes(group)),
        (
            "SEND_DIRECT resending to one of bob's devices, whose mailbox was full",
            "Valid",
            a,
            frame_bytes(SendDirect(32, "bob", ((2, _payload("direct 2")),), resend=True)),
        ),
        (
            "SEND_GROUP resending to one device, whose mailbox was full",
            "Valid",
            a,
            frame_bytes(SendGroup(33, _payload("group"), (("carol", 3),), resend=True)),
        ),
        (
            "SEND_GROUP to no device (a group whose only member is the sender's only device)",
            "EmptySend",
            a,
            frame_bytes(SendGroup(11, _payload("alone"), ())),
        ),
        ("SEND_CHANGE to two users' devices", "Valid", a, frame_bytes(change)),
        (
            "SEND_CHANGE to no device (a group whose only member is the sender's only device): "
            "the relay queues the receipt alone",
            "EmptySend",
            a,
            frame_bytes(SendChange(17, _receipt("alone"), ())),
        ),
        ("ACK of two envelopes", "Valid", a, frame_bytes(Ack(12, tuple(guids)))),
        ("PING before AUTH", "Valid", UNAUTHENTICATED, frame_bytes(Ping(13))),
        ("PING", "Valid", a, frame_bytes(Ping(2**32 - 1))),
        (
            f"SEND_DIRECT of a payload of MAX_PAYLOAD_SIZE ({MAX_PAYLOAD_SIZE}) bytes",
            "AtLimit",
            a,
            _big_send(14, [[1, b""]], MAX_PAYLOAD_SIZE),
        ),
        (
            f"ACK of MAX_IN_FLIGHT ({MAX_IN_FLIGHT}) envelopes",
            "AtLimit",
            a,
            frame_bytes(Ack(15, tuple(_guid(f"many {i}") for i in range(MAX_IN_FLIGHT)))),
        ),
    ]
    return valid


def _invalid_request_cases() -> list[tuple[str, str, ConnectionState, bytes, str]]:
    """(comment, flag, state, frame, the error it must get) of frames a relay refuses."""
    user, device = _keys()
    a, u = AUTHENTICATED, UNAUTHENTICATED
    signature = sign_auth(device, RELAY_NAME, CHALLENGE, "alice", 1)
    signed = _signed_list(user, device)
    guid = _guid("a")
    kem = _prekeys(device).one_time_kem[0]
    too_many_keys = [[i, bytes(32)] for i in range(MAX_PREKEYS_PER_UPLOAD + 1)]
    recipients_head = pack([19, 20, b"x", [0] * (MAX_RECIPIENTS_PER_SEND + 1), False])
    receipt = _receipt("invalid")
    half = MAX_RECIPIENTS_PER_SEND // 2
    bob = [[device_id, b""] for device_id in range(half)]
    overflow = [["bob", bob], ["carol", [0] * (MAX_RECIPIENTS_PER_SEND - half + 1)]]
    change_head = pack([23, 44, receipt, overflow])
    return [
        (
            "HELLO with its array as array 16",
            "NonCanonical",
            AWAIT_HELLO,
            encode_frame(b"\xdc\x00\x04\x01\x00\x03\x72"),
            BadFrame.code,
        ),
        ("an empty body", "NotAnArray", AWAIT_HELLO, encode_frame(b""), BadFrame.code),
        ("a body that is an integer", "NotAnArray", a, raw_frame(22), BadFrame.code),
        ("a body that is a map", "NotAnArray", a, raw_frame({"type": 22}), BadFrame.code),
        ("frame type 99", "UnknownFrame", a, raw_frame([99, 5]), UnknownFrame.code),
        (
            "frame type 3 (OK), which only a relay sends",
            "UnknownFrame",
            a,
            raw_frame([3, 6]),
            UnknownFrame.code,
        ),
        (
            "frame type 99 with request id 2^32: no request id can be read",
            "UnknownFrame",
            a,
            raw_frame([99, 2**32]),
            UnknownFrame.code,
        ),
        (
            "HELLO with window 0",
            "WrongFields",
            AWAIT_HELLO,
            raw_frame([1, 0, RELAY_PROTOCOL_VERSION, 0]),
            BadFrame.code,
        ),
        (
            "HELLO of relay protocol version 3 (without SEND_CHANGE)",
            "UnsupportedVersion",
            AWAIT_HELLO,
            raw_frame([1, 0, 3, 114]),
            UnsupportedVersion.code,
        ),
        (
            "HELLO of relay protocol version 4 (PUBLISH_DEVICE_LIST without an invitation "
            "field, device lists without proofs)",
            "UnsupportedVersion",
            AWAIT_HELLO,
            raw_frame([1, 0, 4, 114]),
            UnsupportedVersion.code,
        ),
        (
            "HELLO of relay protocol version 5, which refused a whole send for one full mailbox",
            "UnsupportedVersion",
            AWAIT_HELLO,
            raw_frame([1, 0, 5, 114]),
            UnsupportedVersion.code,
        ),
        (
            f"HELLO of version {RELAY_PROTOCOL_VERSION + 1} with fields this version does not know",
            "UnsupportedVersion",
            AWAIT_HELLO,
            raw_frame([1, 0, RELAY_PROTOCOL_VERSION + 1, "new", [1, 2]]),
            UnsupportedVersion.code,
        ),
        (
            "HELLO once authenticated",
            "UnexpectedFrame",
            a,
            frame_bytes(Hello(16, RELAY_PROTOCOL_VERSION, 114)),
            UnexpectedFrame.code,
        ),
        (
            "SEND_GROUP before AUTH",
            "UnexpectedFrame",
            u,
            frame_bytes(SendGroup(17, b"x", (("bob", 1),))),
            UnexpectedFrame.code,
        ),
        (
            "AUTH with a signature of 63 bytes",
            "WrongFields",
            u,
            raw_frame([10, 2, "alice", 1, signature[:63]]),
            BadFrame.code,
        ),
        (
            "AUTH with an empty user id",
            "WrongFields",
            u,
            raw_frame([10, 2, "", 1, signature]),
            BadFrame.code,
        ),
        (
            "AUTH with a user id of 65 bytes",
            "WrongFields",
            u,
            raw_frame([10, 2, "a" * 65, 1, signature]),
            BadFrame.code,
        ),
        (
            "AUTH with a user id containing U+0000",
            "NulUserId",
            u,
            raw_frame([10, 2, "alice\x00evil", 1, signature]),
            BadFrame.code,
        ),
        (
            "AUTH with one extra field",
            "WrongFields",
            u,
            raw_frame([10, 2, "alice", 1, signature, None]),
            BadFrame.code,
        ),
        (
            f"PUBLISH_DEVICE_LIST of relay protocol {RELAY_PROTOCOL_VERSION - 1}: no invitation "
            "field",
            "WrongFields",
            u,
            raw_frame([11, 1, signed]),
            BadFrame.code,
        ),
        (
            "PUBLISH_DEVICE_LIST with an empty invitation token",
            "WrongFields",
            u,
            raw_frame([11, 1, signed, ""]),
            BadFrame.code,
        ),
        (
            "PUBLISH_DEVICE_LIST with an invitation token of 65 bytes",
            "WrongFields",
            u,
            raw_frame([11, 1, signed, "t" * 65]),
            BadFrame.code,
        ),
        (
            "PING with request id 2^32",
            "WrongFields",
            a,
            raw_frame([22, 2**32]),
            BadFrame.code,
        ),
        (
            "SEND_DIRECT naming a device twice",
            "Duplicate",
            a,
            raw_frame([18, 18, "bob", [[1, b"x"], [1, b"y"]], False]),
            BadFrame.code,
        ),
        (
            "SEND_DIRECT of a payload of MAX_PAYLOAD_SIZE + 1 bytes",
            "TooLarge",
            a,
            _big_send(19, [[1, b""]], MAX_PAYLOAD_SIZE + 1),
            "PAYLOAD_TOO_LARGE",
        ),
        (
            f"SEND_GROUP naming MAX_RECIPIENTS_PER_SEND + 1 ({MAX_RECIPIENTS_PER_SEND + 1}) "
            "recipients, each malformed: the count is checked first (TOO_MANY_RECIPIENTS)",
            "CheckOrder",
            a,
            encode_frame(recipients_head),
            "TOO_MANY_RECIPIENTS",
        ),
        (
            "SEND_GROUP naming a device twice",
            "Duplicate",
            a,
            raw_frame([19, 21, b"x", [["bob", 1], ["bob", 1]], False]),
            BadFrame.code,
        ),
        (
            "SEND_GROUP with a sender field (the relay stamps the sender)",
            "WrongFields",
            a,
            raw_frame([19, 22, b"x", [["bob", 1]], False, ["alice", 1]]),
            BadFrame.code,
        ),
        (
            "SEND_DIRECT of relay protocol 5: no resend flag",
            "WrongFields",
            a,
            raw_frame([18, 34, "bob", [[1, b"x"]]]),
            BadFrame.code,
        ),
        (
            "SEND_GROUP whose resend flag is 1, not a boolean",
            "WrongFields",
            a,
            raw_frame([19, 35, b"x", [["bob", 1]], 1]),
            BadFrame.code,
        ),
        (
            "SEND_CHANGE with a receipt of 15 bytes",
            "WrongFields",
            a,
            raw_frame([23, 40, receipt[:15], [["bob", [[1, b"x"]]]]]),
            BadFrame.code,
        ),
        (
            "SEND_CHANGE naming a user twice",
            "Duplicate",
            a,
            raw_frame([23, 41, receipt, [["bob", [[1, b"x"]]], ["bob", [[2, b"y"]]]]]),
            BadFrame.code,
        ),
        (
            "SEND_CHANGE naming a device of a user twice",
            "Duplicate",
            a,
            raw_frame([23, 42, receipt, [["bob", [[1, b"x"], [1, b"y"]]]]]),
            BadFrame.code,
        ),
        (
            f"SEND_CHANGE naming MAX_RECIPIENTS_PER_SEND + 1 ({MAX_RECIPIENTS_PER_SEND + 1}) "
            "devices over two users, the second user's entries malformed: a user's count is "
            "checked against what the users before it left, before its entries are read "
            "(TOO_MANY_RECIPIENTS)",
            "CheckOrder",
            a,
            encode_frame(change_head),
            "TOO_MANY_RECIPIENTS",
        ),
        (
            "SEND_CHANGE before AUTH",
            "UnexpectedFrame",
            u,
            frame_bytes(SendChange(43, receipt, (("bob", ((1, b"x"),)),))),
            UnexpectedFrame.code,
        ),
        ("ACK of no envelope", "WrongFields", a, raw_frame([21, 23, []]), BadFrame.code),
        (
            f"ACK of MAX_IN_FLIGHT + 1 ({MAX_IN_FLIGHT + 1}) envelopes",
            "TooLarge",
            a,
            frame_bytes(Ack(24, tuple(_guid(f"many {i}") for i in range(MAX_IN_FLIGHT + 1)))),
            BadFrame.code,
        ),
        (
            "ACK of a 15-byte guid",
            "WrongFields",
            a,
            raw_frame([21, 25, [guid[:15]]]),
            BadFrame.code,
        ),
        (
            "ACK naming a guid twice",
            "Duplicate",
            a,
            raw_frame([21, 26, [guid, guid]]),
            BadFrame.code,
        ),
        (
            f"UPLOAD_PREKEYS of MAX_PREKEYS_PER_UPLOAD + 1 ({MAX_PREKEYS_PER_UPLOAD + 1}) "
            "one-time prekeys",
            "TooLarge",
            a,
            raw_frame([14, 27, None, None, too_many_keys, []]),
            BadFrame.code,
        ),
        (
            "UPLOAD_PREKEYS with a one-time KEM prekey of 1183 bytes",
            "WrongFields",
            a,
            raw_frame([14, 28, None, None, [], [[kem.key_id, kem.public[:-1], kem.signature]]]),
            BadFrame.code,
        ),
        (
            "SEND_DIRECT naming a device twice, before AUTH: a frame is decoded before the "
            "state is checked (BAD_FRAME)",
            "CheckOrder",
            u,
            raw_frame([18, 29, "bob", [[1, b"x"], [1, b"y"]], False]),
            BadFrame.code,
        ),
        (
            "HELLO of version 1 once HELLO was answered: the state is checked before the "
            "version (UNEXPECTED_FRAME)",
            "CheckOrder",
            u,
            raw_frame([1, 30, 1, 114]),
            UnexpectedFrame.code,
        ),
        (
            "SEND_DIRECT whose second entry names the first device again and has a payload of "
            "MAX_PAYLOAD_SIZE + 1 bytes: entries are read in order, the repeat is found after "
            "them (PAYLOAD_TOO_LARGE)",
            "CheckOrder",
            a,
            _big_send(31, [[1, b"x"], [1, b""]], MAX_PAYLOAD_SIZE + 1),
            "PAYLOAD_TOO_LARGE",
        ),
    ]


# ------------------------------------------------------------------ relay frames


def _relay_frames() -> list[tuple[str, str, bytes]]:
    """(comment, flag, frame) of valid frames a relay sends."""
    user, device = _keys()
    signed = _signed_list(user, device)
    bundle = handshake.sample_bundles()[0][1]
    envelope = Envelope(_guid("a"), SERVER_TS, "bob", 2, 1, _payload("envelope"))
    mismatch = DeviceListMismatch(
        "recipient devices differ", mismatches=[DeviceMismatch("alice", signed, (1,), (7,))]
    )

    def error(request_id: int | None, err: RelayError) -> bytes:
        return frame_bytes(ErrorFrame.from_error(request_id, err))

    return [
        (
            "WELCOME",
            "Valid",
            frame_bytes(Welcome(0, RELAY_PROTOCOL_VERSION, RELAY_NAME, CHALLENGE)),
        ),
        ("OK", "Valid", frame_bytes(Ok(1))),
        ("DEVICE_LIST", "Valid", frame_bytes(DeviceListFrame(4, signed))),
        ("PREKEY_COUNTS", "Valid", frame_bytes(PreKeyCountsFrame(5, 100, 100))),
        ("BUNDLE", "Valid", frame_bytes(BundleFrame(8, bundle))),
        ("ACCEPTED", "Valid", frame_bytes(Accepted(9, SERVER_TS))),
        (
            "ACCEPTED naming a device whose mailbox was full (the others took the send)",
            "Valid",
            frame_bytes(Accepted(9, SERVER_TS, (("bob", 1),))),
        ),
        ("ENVELOPE", "Valid", frame_bytes(EnvelopePush(envelope))),
        (
            "ENVELOPE of kind 3: a SEND_CHANGE's receipt, from the device itself",
            "Valid",
            frame_bytes(
                EnvelopePush(
                    Envelope(
                        _guid("receipt"),
                        SERVER_TS,
                        "alice",
                        1,
                        EnvelopeKind.RECEIPT,
                        _receipt("change"),
                    )
                )
            ),
        ),
        ("QUEUE_EMPTY", "Valid", frame_bytes(QueueEmpty())),
        ("PREKEYS_LOW", "Valid", frame_bytes(PreKeysLow(0, 0))),
        (
            "MAIL_EXPIRED: 2 envelopes accepted from first_ts to last_ts expired unread",
            "Valid",
            frame_bytes(MailExpired(2, SERVER_TS - 3_600_000, SERVER_TS)),
        ),
        (
            "MAIL_EXPIRED with a nil count: the relay lost the keys of its queue at last_ts",
            "Valid",
            frame_bytes(MailExpired(None, SERVER_TS - 259_200_000, SERVER_TS)),
        ),
        ("ERROR BAD_FRAME (detail nil)", "Valid", error(3, BadFrame("bad frame"))),
        (
            "ERROR STORAGE_FULL: the relay's disk is full, nothing was stored (detail nil)",
            "Valid",
            error(9, StorageFull("the relay's storage is full; retry later")),
        ),
        (
            "ERROR IDLE_TIMEOUT closing the connection (request id nil)",
            "Valid",
            error(None, IdleTimeout("idle")),
        ),
        (
            "ERROR UNSUPPORTED_VERSION (detail: the versions spoken)",
            "Valid",
            error(
                0,
                UnsupportedVersion("version 5 is not spoken", supported=[RELAY_PROTOCOL_VERSION]),
            ),
        ),
        (
            "ERROR UNKNOWN_USER (detail: the user id)",
            "Valid",
            error(4, UnknownUser("no such user", user_id="bob")),
        ),
        (
            "ERROR DEVICE_LIST_REJECTED (detail: the protocol error code)",
            "Valid",
            error(3, DeviceListRejected("bad list", cause="BAD_SIGNATURE")),
        ),
        (
            "ERROR DEVICE_LIST_REJECTED for a device key listed under another user",
            "Valid",
            error(3, DeviceListRejected("key taken", cause="DUPLICATE_DEVICE_KEY")),
        ),
        (
            "ERROR REGISTRATION_CLOSED (detail nil)",
            "Valid",
            error(1, RegistrationClosed("no new users")),
        ),
        (
            "ERROR INVITE_REFUSED (detail nil)",
            "Valid",
            error(1, InviteRefused("no such invitation")),
        ),
        (
            "ERROR DEVICE_LIST_MISMATCH (detail: current list, missing and unknown ids)",
            "Valid",
            error(9, mismatch),
        ),
        (
            "ERROR PREKEYS_REJECTED (detail: the protocol error code)",
            "Valid",
            error(7, PreKeysRejected("bad key", cause="INVALID_KEY")),
        ),
        (
            "ERROR RATE_LIMITED (detail: milliseconds until a retry)",
            "Valid",
            error(8, RateLimited("too many bundle fetches", retry_after_ms=600_000)),
        ),
        (
            "ERROR MAILBOX_FULL (detail: every device the send named, all full)",
            "Valid",
            error(10, MailboxFull("full", devices=[("bob", 1)])),
        ),
        (
            "ERROR with a code this version does not know: a refusal, its detail unread",
            "UnknownCode",
            raw_frame([0, 11, "SOME_FUTURE_CODE", "from a newer relay", [1, "x"]]),
        ),
    ]


def _invalid_relay_frames() -> list[tuple[str, str, bytes, str]]:
    """(comment, flag, frame, code) of frames a client must refuse (and close)."""
    envelope = Envelope(_guid("a"), SERVER_TS, "bob", 2, 1, b"x").to_wire()
    return [
        (
            "WELCOME with a challenge of 31 bytes",
            "WrongFields",
            raw_frame([2, 0, RELAY_PROTOCOL_VERSION, RELAY_NAME, CHALLENGE[:31]]),
            BadFrame.code,
        ),
        (
            "WELCOME with a relay name of 256 bytes",
            "WrongFields",
            raw_frame([2, 0, RELAY_PROTOCOL_VERSION, "r" * 256, CHALLENGE]),
            BadFrame.code,
        ),
        (
            "ENVELOPE with an empty sender user id",
            "WrongFields",
            raw_frame([30, [*envelope[:2], "", *envelope[3:]]]),
            BadFrame.code,
        ),
        (
            "ENVELOPE with a sender user id containing U+0000",
            "NulUserId",
            raw_frame([30, [*envelope[:2], "alice\x00evil", *envelope[3:]]]),
            BadFrame.code,
        ),
        (
            "ENVELOPE with a guid of 15 bytes",
            "WrongFields",
            raw_frame([30, [envelope[0][:15], *envelope[1:]]]),
            BadFrame.code,
        ),
        (
            "ENVELOPE missing its payload",
            "WrongFields",
            raw_frame([30, envelope[:5]]),
            BadFrame.code,
        ),
        ("QUEUE_EMPTY with one extra field", "WrongFields", raw_frame([31, None]), BadFrame.code),
        (
            "MAIL_EXPIRED with a negative count",
            "WrongFields",
            raw_frame([33, -1, SERVER_TS, SERVER_TS]),
            BadFrame.code,
        ),
        (
            "MAIL_EXPIRED missing last_ts",
            "WrongFields",
            raw_frame([33, 1, SERVER_TS]),
            BadFrame.code,
        ),
        ("ACCEPTED with server_ts -1", "WrongFields", raw_frame([20, 9, -1, []]), BadFrame.code),
        (
            "ACCEPTED of relay protocol 5: no mailbox_full",
            "WrongFields",
            raw_frame([20, 9, SERVER_TS]),
            BadFrame.code,
        ),
        (
            "ACCEPTED whose full device has no device id",
            "WrongFields",
            raw_frame([20, 9, SERVER_TS, [["bob"]]]),
            BadFrame.code,
        ),
        (
            "ERROR with a code of 65 bytes",
            "WrongFields",
            raw_frame([0, 3, "E" * 65, "m", None]),
            BadFrame.code,
        ),
        (
            "ERROR RATE_LIMITED whose detail is a string",
            "BadDetail",
            raw_frame([0, 8, "RATE_LIMITED", "slow down", "600000"]),
            BadFrame.code,
        ),
        (
            "ERROR BAD_FRAME with a detail (its detail is nil)",
            "BadDetail",
            raw_frame([0, 3, "BAD_FRAME", "bad frame", 1]),
            BadFrame.code,
        ),
        (
            "OK with its array as array 16",
            "NonCanonical",
            encode_frame(b"\xdc\x00\x02\x03\x01"),
            BadFrame.code,
        ),
        (
            "frame type 10 (AUTH), which only a client sends",
            "UnknownFrame",
            raw_frame([10, 1]),
            UnknownFrame.code,
        ),
        ("frame type 99", "UnknownFrame", raw_frame([99]), UnknownFrame.code),
    ]


# ------------------------------------------------------------------ length prefixes


def _prefix_tests() -> list[Json]:
    tests = []
    for state, limit in (
        (UNAUTHENTICATED, MAX_UNAUTHENTICATED_FRAME_SIZE),
        (AUTHENTICATED, MAX_FRAME_SIZE),
    ):
        for length in (limit, limit + 1):
            prefix = length.to_bytes(4, "big")
            decoder = FrameDecoder(max_frame_size=max_frame_size_in(state))
            decoder.receive_data(prefix)
            try:
                decoder.next_frame()
            except FrameTooLarge:
                tests.append(
                    case(
                        f"length {length} in {state.value}: one past the limit, refused at once",
                        result="invalid",
                        error=FrameTooLarge.code,
                        flags=("TooLarge",),
                        prefix=h(prefix),
                        state=state.value,
                        closes=True,
                    )
                )
            else:
                tests.append(
                    case(
                        f"length {length} in {state.value}: the limit, the body is awaited",
                        flags=("AtLimit",),
                        prefix=h(prefix),
                        state=state.value,
                    )
                )
    return tests


# ------------------------------------------------------------------ session


def _session() -> Json:
    """One connection of alice's device 1, frame by frame."""
    user, device = _keys()
    signed = _signed_list(user, device)
    signature = sign_auth(device, RELAY_NAME, CHALLENGE, "alice", 1)
    guid = _guid("session")
    frames: list[tuple[str, Frame]] = [
        ("client", Hello(0, RELAY_PROTOCOL_VERSION, 114)),
        ("relay", Welcome(0, RELAY_PROTOCOL_VERSION, RELAY_NAME, CHALLENGE)),
        ("client", PublishDeviceList(1, signed)),
        ("relay", Ok(1)),
        ("client", Auth(2, "alice", 1, signature)),
        ("relay", Ok(2)),
        ("relay", PreKeysLow(0, 0)),
        ("relay", QueueEmpty()),
        ("client", SendDirect(3, "bob", ((1, _payload("session to bob")),))),
        ("relay", Accepted(3, SERVER_TS)),
        (
            "relay",
            EnvelopePush(
                Envelope(guid, SERVER_TS + 500, "bob", 1, 1, _payload("session from bob"))
            ),
        ),
        ("client", Ack(4, (guid,))),
        ("relay", Ok(4)),
        ("client", Ping(5)),
        ("relay", Ok(5)),
    ]
    steps = [
        {"from": side, "frame": _b(frame_bytes(frame)), "decoded": frame_json(frame)}
        for side, frame in frames
    ]
    test = case(
        "register, authenticate, send, receive and acknowledge: a new device's stock is empty, "
        "so PREKEYS_LOW (0, 0) comes right after the OK to AUTH, before QUEUE_EMPTY",
        flags=("Session",),
        relay_name=RELAY_NAME,
        challenge=h(CHALLENGE),
        user_id="alice",
        device_id=1,
        user_identity_seed=h(user.seed),
        device_identity_seed=h(device.seed),
        auth_signed_bytes=h(auth_message(RELAY_NAME, CHALLENGE, "alice", 1)),
        steps=steps,
    )
    failures = _verify_session(test)
    if failures:
        raise AssertionError(f"relay session: {failures}")
    return test


# ------------------------------------------------------------------ assembly


def generate() -> Json:
    requests = [
        case(
            comment,
            flags=(flag,),
            state=state.value,
            frame=_b(data),
            decoded=_request_json(data, state),
        )
        for comment, flag, state, data in _request_cases()
    ]
    for comment, flag, state, data, expected in _invalid_request_cases():
        _, error, request_id = relay_verdict(data, state)
        if error is None or error.wire_code != expected:
            raise AssertionError(f"relay.json: {comment}: {error}, not {expected}")
        requests.append(
            case(
                comment,
                result="invalid",
                error=error.wire_code,
                flags=(flag,),
                state=state.value,
                frame=_b(data),
                request_id=request_id,
                detail=error.detail_to_wire(),
                closes=state_after_error(state, error) is ConnectionState.CLOSED,
            )
        )
    relay_frames = []
    for comment, flag, data in _relay_frames():
        decoded = client_verdict(data)
        if isinstance(decoded, str):
            raise AssertionError(f"relay.json: {comment}: {decoded}")
        relay_frames.append(
            case(comment, flags=(flag,), frame=_b(data), decoded=frame_json(decoded))
        )
    for comment, flag, data, expected in _invalid_relay_frames():
        verdict = client_verdict(data)
        if verdict != expected:
            raise AssertionError(f"relay.json: {comment}: {verdict}, not {expected}")
        relay_frames.append(
            case(comment, result="invalid", error=expected, flags=(flag,), frame=_b(data))
        )
    return vector_file(
        NAME,
        description=(
            "The relay protocol: the encoding of every frame type, valid and invalid with the "
            "error each gets, length prefixes at the frame size limits, and a scripted session."
        ),
        spec=["07-relay-protocol.md"],
        notes=NOTES,
        groups=[
            {
                "type": "RequestFrame",
                "relay_protocol_version": RELAY_PROTOCOL_VERSION,
                "max_frame_size": MAX_FRAME_SIZE,
                "max_unauthenticated_frame_size": MAX_UNAUTHENTICATED_FRAME_SIZE,
                "max_payload_size": MAX_PAYLOAD_SIZE,
                "max_recipients_per_send": MAX_RECIPIENTS_PER_SEND,
                "max_prekeys_per_upload": MAX_PREKEYS_PER_UPLOAD,
                "max_ack_guids": MAX_IN_FLIGHT,
                "tests": requests,
            },
            {"type": "RelayFrame", "max_frame_size": MAX_FRAME_SIZE, "tests": relay_frames},
            {"type": "LengthPrefix", "tests": _prefix_tests()},
            {"type": "Session", "tests": [_session()]},
        ],
    )


def _request_json(data: bytes, state: ConnectionState) -> Json:
    request, error, _ = relay_verdict(data, state)
    if request is None or error is not None:
        raise AssertionError(f"relay.json: a valid request is refused: {error}")
    return frame_json(request)


# ------------------------------------------------------------------ verification


def verify_test(group: Json, test: Json) -> list[str]:
    kind = group["type"]
    if kind == "RequestFrame":
        return _verify_request(test)
    if kind == "RelayFrame":
        return _verify_relay_frame(test)
    if kind == "LengthPrefix":
        return _verify_prefix(test)
    if kind == "Session":
        return _verify_session(test)
    return [f"unknown group type {kind}"]


def _verify_request(test: Json) -> list[str]:
    c = Checker()
    data = unhex_any(test["frame"])
    state = ConnectionState(test["state"])
    request, error, request_id = relay_verdict(data, state)
    if test["result"] == "valid":
        if error is not None or request is None:
            c.fail(f"refused with {error.wire_code if error else None}")
            return c.failures
        c.equal("decoded", test["decoded"], frame_json(request))
        c.equal("re-encoded", h(data), h(frame_bytes(frame_from_json(test["decoded"]))))
        return c.failures
    if error is None:
        c.fail(f"expected error {test['error']}, but it was accepted")
        return c.failures
    c.equal("error", test["error"], error.wire_code)
    c.equal("request_id", test["request_id"], request_id)
    c.equal("detail", test["detail"], error.detail_to_wire())
    c.equal("closes", test["closes"], state_after_error(state, error) is ConnectionState.CLOSED)
    return c.failures


def _verify_relay_frame(test: Json) -> list[str]:
    c = Checker()
    data = unhex_any(test["frame"])
    verdict = client_verdict(data)
    if test["result"] == "invalid":
        c.equal("error", test["error"], verdict if isinstance(verdict, str) else None)
        return c.failures
    if isinstance(verdict, str):
        c.fail(f"refused with {verdict}")
        return c.failures
    c.equal("decoded", test["decoded"], frame_json(verdict))
    c.equal("re-encoded", h(data), h(frame_bytes(frame_from_json(test["decoded"]))))
    return c.failures


def _verify_prefix(test: Json) -> list[str]:
    c = Checker()
    state = ConnectionState(test["state"])
    decoder = FrameDecoder(max_frame_size=max_frame_size_in(state))
    decoder.receive_data(unhex_any(test["prefix"]))
    try:
        body = decoder.next_frame()
    except FrameTooLarge as too_large:
        c.equal("error", test.get("error"), too_large.wire_code)
        c.equal("closes", test.get("closes"), too_large.closes)
        return c.failures
    if test["result"] != "valid":
        c.fail(f"expected {test['error']}, but the body is awaited")
    elif body is not None or not decoder.in_frame:
        c.fail("the length alone must leave the receiver waiting for the body")
    return c.failures


def _verify_session(test: Json) -> list[str]:
    """Every frame decodes as its side sends it, in an order the state table allows."""
    c = Checker()
    user = IdentityKeyPair(unhex_any(test["user_identity_seed"]))
    device = IdentityKeyPair(unhex_any(test["device_identity_seed"]))
    relay_name, challenge = test["relay_name"], unhex_any(test["challenge"])
    user_id, device_id = test["user_id"], test["device_id"]
    c.equal(
        "auth_signed_bytes",
        test["auth_signed_bytes"],
        h(auth_message(relay_name, challenge, user_id, device_id)),
    )
    state = AWAIT_HELLO
    outstanding: dict[int, Request] = {}
    pushed: set[bytes] = set()
    for index, step in enumerate(test["steps"]):
        where = f"step {index}"
        data = unhex_any(step["frame"])
        frame: Frame
        if step["from"] == "client":
            request, error, _ = relay_verdict(data, state)
            if request is None or error is not None:
                c.fail(f"{where}: the relay refuses it ({error.wire_code if error else None})")
                return c.failures
            frame = request
            outstanding[request.request_id] = request
            if isinstance(request, Auth):
                expected = sign_auth(device, relay_name, challenge, user_id, device_id)
                c.equal(f"{where} signature", h(expected), h(request.signature))
                verify_auth(
                    device.public.ed25519,
                    request.signature,
                    relay_name,
                    challenge,
                    request.user_id,
                    request.device_id,
                )
            if isinstance(request, PublishDeviceList):
                listed = SignedDeviceList.decode(request.signed_device_list).device_list
                c.equal(f"{where} user identity", h(user.public.ed25519), h(listed.user_identity))
                entry = listed.device(device_id)
                c.equal(
                    f"{where} device identity",
                    h(device.public.ed25519),
                    None if entry is None else h(entry.identity),
                )
            if isinstance(request, Ack):
                c.equal(
                    f"{where} acknowledged guids were pushed", True, set(request.guids) <= pushed
                )
        else:
            verdict = client_verdict(data)
            if isinstance(verdict, str):
                c.fail(f"{where}: the client refuses it ({verdict})")
                return c.failures
            frame = verdict
            if frame.TYPE in PUSHES:
                c.equal(f"{where} pushed once authenticated", AUTHENTICATED.value, state.value)
                if isinstance(frame, EnvelopePush):
                    pushed.add(frame.envelope.guid)
            else:
                request_id = getattr(frame, "request_id", None)
                answered = outstanding.pop(request_id, None) if request_id is not None else None
                if answered is None:
                    c.fail(f"{where}: a reply to no outstanding request")
                    return c.failures
                c.equal(f"{where} reply type", REPLY_TO[answered.TYPE].name, frame.TYPE.name)
                state = state_after_success(state, answered.TYPE)
                if isinstance(frame, Welcome):
                    c.equal(f"{where} relay_name", relay_name, frame.relay_name)
                    c.equal(f"{where} challenge", h(challenge), h(frame.challenge))
        c.equal(f"{where} decoded", step["decoded"], frame_json(frame))
        c.equal(f"{where} re-encoded", h(data), h(frame_bytes(frame_from_json(step["decoded"]))))
    c.equal("every request answered", [], sorted(outstanding))
    return c.failures
