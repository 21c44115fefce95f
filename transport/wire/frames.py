"""The frames of the relay protocol: typed values and their canonical msgpack bodies.

Every frame body is a canonical msgpack array whose first element is the
frame type. Requests (client to relay) carry a request id next; the reply
(a result frame or ERROR) echoes it. Pushes (relay to client: envelopes and
notices) carry none. spec/07-relay-protocol.md is the normative list;
the one-line layout above each class below restates it.

Decoding is sans-I/O and total: :func:`decode_request` turns any body into
a request or a :class:`BadRequest` naming the error to answer (with the
request id when one could be read); :func:`decode_relay_frame` raises only
DecodeError and UnknownFrame. Static limits (payload size, recipients per
send, prekeys per upload) are checked while decoding, so a hostile frame
costs no more than its size before it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

from hushchat.protocol.consts import (
    ED25519_SIGNATURE_SIZE,
    MLKEM768_PUBLIC_KEY_SIZE,
    X25519_KEY_SIZE,
)
from hushchat.protocol.devices import read_user_id
from hushchat.protocol.encoding import UINT32_MAX, UINT64_MAX, Fields, pack, unpack
from hushchat.protocol.errors import DecodeError, ProtocolError
from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic

from .auth import AUTH_CHALLENGE_SIZE
from .errors import (
    MAX_ERROR_TEXT_SIZE,
    BadFrame,
    PayloadTooLarge,
    RelayError,
    TooManyRecipients,
    UnknownFrame,
)
from .limits import (
    MAX_FRAME_SIZE,
    MAX_IN_FLIGHT,
    MAX_INVITE_SIZE,
    MAX_PAYLOAD_SIZE,
    MAX_PREKEYS_PER_UPLOAD,
    MAX_RECIPIENTS_PER_SEND,
    RELAY_PROTOCOL_VERSION,
)
from .records import GUID_SIZE, RECEIPT_SIZE, Envelope

# Longest relay name (WELCOME), in UTF-8 bytes: a DNS name fits.
MAX_RELAY_NAME_SIZE = 255
# Longest error code, in UTF-8 bytes.
MAX_ERROR_CODE_SIZE = 64


class FrameType(IntEnum):
    """The first element of every frame body."""

    ERROR = 0
    HELLO = 1
    WELCOME = 2
    OK = 3
    AUTH = 10
    PUBLISH_DEVICE_LIST = 11
    FETCH_DEVICE_LIST = 12
    DEVICE_LIST = 13
    UPLOAD_PREKEYS = 14
    PREKEY_COUNTS = 15
    FETCH_BUNDLE = 16
    BUNDLE = 17
    SEND_DIRECT = 18
    SEND_GROUP = 19
    ACCEPTED = 20
    ACK = 21
    PING = 22
    SEND_CHANGE = 23
    ENVELOPE = 30
    QUEUE_EMPTY = 31
    PREKEYS_LOW = 32
    MAIL_EXPIRED = 33


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Limits a relay checks while decoding requests (defaults: hushchat.transport.wire.limits)."""

    max_frame_size: int = MAX_FRAME_SIZE
    max_payload_size: int = MAX_PAYLOAD_SIZE
    max_recipients: int = MAX_RECIPIENTS_PER_SEND
    max_prekeys_per_upload: int = MAX_PREKEYS_PER_UPLOAD
    max_ack_guids: int = MAX_IN_FLIGHT


def _user_id(fields: Fields) -> str:
    return read_user_id(fields)


def _payload(fields: Fields, limits: RequestLimits) -> bytes:
    payload = fields.bin()
    if len(payload) > limits.max_payload_size:
        raise PayloadTooLarge(f"payload of {len(payload)} bytes exceeds {limits.max_payload_size}")
    return payload


# Prekeys are read by size only; the relay checks the keys and signatures
# afterwards, so that a bad one is PREKEYS_REJECTED with its reason.


def _signed_prekey(fields: Fields) -> SignedPreKeyPublic:
    key_id, public = fields.uint(), fields.bin(X25519_KEY_SIZE)
    key = SignedPreKeyPublic(key_id, public, fields.bin(ED25519_SIGNATURE_SIZE))
    fields.end()
    return key


def _one_time_prekey(fields: Fields) -> OneTimePreKeyPublic:
    key = OneTimePreKeyPublic(fields.uint(), fields.bin(X25519_KEY_SIZE))
    fields.end()
    return key


def _kem_prekey(fields: Fields) -> KemPreKeyPublic:
    key_id, public = fields.uint(), fields.bin(MLKEM768_PUBLIC_KEY_SIZE)
    key = KemPreKeyPublic(key_id, public, fields.bin(ED25519_SIGNATURE_SIZE))
    fields.end()
    return key


def _items(fields: Fields, limit: int, error: type[RelayError], what: str) -> list[Any]:
    items = fields.array(max_len=UINT32_MAX)
    if len(items) > limit:
        raise error(f"{what}: {len(items)} items exceed the limit of {limit}")
    return items


# ------------------------------------------------------------------ requests


@dataclass(frozen=True, slots=True)
class Hello:
    """``[1, request_id, version, window u32]``: the first frame.

    ``version`` is the relay protocol version the client speaks; the first
    three fields keep this layout in every version, so a relay can refuse
    any other version (UNSUPPORTED_VERSION) whatever follows. ``window`` is
    how many pushed envelopes the client buffers unacknowledged (at least
    1); the relay pushes at most min(window, its own limit) at a time.
    """

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    request_id: int
    version: int
    window: int

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.version, self.window]

    @classmethod
    def read(cls, fields: Fields, limits: RequestLimits) -> Hello:
        request_id, version = fields.uint(), fields.uint()
        if version != RELAY_PROTOCOL_VERSION:
            while fields.remaining:  # another version's fields: not ours to read
                fields.raw()
            return cls(request_id, version, 0)
        window = fields.uint()
        if window < 1:
            raise BadFrame("the window is at least 1")
        return cls(request_id, version, window)


@dataclass(frozen=True, slots=True)
class Auth:
    """``[10, request_id, user_id, device_id, signature bin64]`` (see transport.auth)."""

    TYPE: ClassVar[FrameType] = FrameType.AUTH
    request_id: int
    user_id: str
    device_id: int
    signature: bytes = field(repr=False)

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.user_id, self.device_id, self.signature]

    @classmethod
    def read(cls, fields: Fields, limits: RequestLimits) -> Auth:
        request_id, user_id, device_id = fields.uint(), _user_id(fields), fields.uint()
        return cls(request_id, user_id, device_id, fields.bin(ED25519_SIGNATURE_SIZE))


@dataclass(frozen=True, slots=True)
class PublishDeviceList:
    """``[11, request_id, signed_device_list bin, invite str | nil]``: register a user
    (with an invitation token where the relay asks for one), or update one's own list."""

    TYPE: ClassVar[FrameType] = FrameType.PUBLISH_DEVICE_LIST
    request_id: int
    signed_device_list: bytes = field(repr=False)
    invite: str | None = field(default=None, repr=False)

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.signed_device_list, self.invite]

    @classmethod
    def read(cls, fields: Fields, limits: RequestLimits) -> PublishDeviceList:
        request_id, signed_device_list = fields.uint(), fields.bin()
        invite = None
        if fields.peek() is None:
            fields.raw()
        else:
            invite = fields.text(MAX_INVITE_SIZE)
            if not invite:
                raise DecodeError("an invitation token is 1 to 64 bytes")
        return cls(request_id, signed_device_list, invite)


@dataclass(frozen=True, slots=True)
class FetchDeviceList:
    """``[12, request_id, user_id]`` -> DEVICE_LIST."""

    TYPE: ClassVar[FrameType] = FrameType.FETCH_DEVICE_LIST
    request_id: int
    user_id: str

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.user_id]

    @classmethod
    def read(cls, fields: Fields, limits: RequestLimits) -> FetchDeviceList:
        return cls(fields.uint(), _user_id(fields))


@dataclass(frozen=True, slots=True)
class UploadPreKeys:
    """``[14, request_id, signed_prekey | nil, last_resort_kem | nil, one_time, one_time_kem]``.

    ``signed_prekey`` is ``[id, pub bin32, sig bin64]``, ``last_resort_kem``
    ``[id, pub bin1184, sig bin64]`` (nil keeps the stored one);
    ``one_time`` is ``[[id, pub bin32], ...]`` and ``one_time_kem``
    ``[[id, pub bin1184, sig bin64], ...]``, added to the stock. -> PREKEY_COUNTS.
    """

    TYPE: ClassVar[FrameType] = FrameType.UPLOAD_PREKEYS
    request_id: int
    signed_prekey: SignedPreKeyPublic | None
    last_resort_kem: KemPreKeyPublic | None
    one_time: tuple[OneTimePreKeyPublic, ...]
    one_time_kem: tuple[KemPreKeyPublic, ...]

    def to_wire(self) -> list[Any]:
        return [
            self.request_id,
            None if self.signed_prekey is None else self.signed_prekey.to_wire(),
            None if self.last_resort_kem is None else self.last_resort_kem.to_wire(),
            [k.to_wire() for k in self.one_time],
            [k.to_wire() for k in self.one_time_kem],
        ]

    @classmethod
    def read(cls, fields: Fields, limits: RequestLimits) -> UploadPreKeys:
        request_id = fields.uint()
        signed = None
        if fields.peek() is not None:
            signed = _signed_prekey(fields.nested(what="signed_prekey", count=3))
        else:
            fields.raw()
        last_resort = None
        if fields.peek() is not None:
            last_resort = _kem_prekey(fields.nested(what="last_resort_kem", count=3))
        else:
            fields.raw()
        limit = limits.max_prekeys_per_upload
        one_time = _items(fields, limit, BadFrame, "one_time")
        one_time_kem = _items(fields, limit, BadFrame, "one_time_kem")
        return cls(
            request_id,
            signed,
            last_resort,
            tuple(
                _one_time_prekey(Fields(k, what=f"one_time[{i}]", count=2))
                for i, k in enumerate(one_time)
            ),
            tuple(
                _kem_prekey(Fields(k, what=f"one_time_kem[{i}]", count=3))
                for i, k in enumerate(one_time_kem)
            ),
        )


@dataclass(frozen=True, slots=True)
class FetchBundle:
    """``[16, request_id, user_id, device_id]`` -> BUNDLE (takes a one-time prekey)."""

    TYPE: ClassVar[FrameType] = FrameType.FETCH_BUNDLE
    request_id: int
    user_id: str
    device_id: int

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.user_id, self.device_id]

    @classmethod
    def read(cls, fields: Fields, limits: RequestLimits) -> FetchBundle:
        return cls(fields.uint(), _user_id(fields), fields.uint())


@dataclass(frozen=True, slots=True)
class SendDirect:
    """``[18, request_id, user_id, [[device_id, payload bin], ...], resend bool]`` -> ACCEPTED.

    One payload per current device of ``user_id`` (for one's own user: per
    other device), each device once. ``resend``: the payloads again, for
    devices whose mailboxes were full; then the devices named need only be
    current ones, not all of them.
    """

    TYPE: ClassVar[FrameType] = FrameType.SEND_DIRECT
    request_id: int
    user_id: str
    messages: tuple[tuple[int, bytes], ...] = field(repr=False)
    resend: bool = False

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.user_id, [[d, p] for d, p in self.messages], self.resend]

    @classmethod
    def read(cls, fields: Fields, limits: RequestLimits) -> SendDirect:
        request_id = fields.uint()
        user_id = _user_id(fields)
        items = _items(fields, limits.max_recipients, TooManyRecipients, "messages")
        messages = []
        for index, item in enumerate(items):
            entry = Fields(item, what=f"messages[{index}]", count=2)
            messages.append((entry.uint(), _payload(entry, limits)))
        if len({d for d, _ in messages}) != len(messages):
            raise BadFrame("a device is named twice")
        return cls(request_id, user_id, tuple(messages), fields.boolean())


@dataclass(frozen=True, slots=True)
class SendGroup:
    """``[19, request_id, payload bin, [[user_id, device_id], ...], resend bool]`` -> ACCEPTED.

    The payload is stored once and delivered to every named device; each
    named user's current devices must all be named (the sender's own device
    never is), each pair once. ``resend``: as for :class:`SendDirect`.
    """

    TYPE: ClassVar[FrameType] = FrameType.SEND_GROUP
    request_id: int
    payload: bytes = field(repr=False)
    recipients: tuple[tuple[str, int], ...] = field(repr=False)
    resend: bool = False

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.payload, [[u, d] for u, d in self.recipients], self.resend]

    @classmethod
    def read(cls, fields: Fields, limits: RequestLimits) -> SendGroup:
        request_id = fields.uint()
        payload = _payload(fields, limits)
        items = _items(fields, limits.max_recipients, TooManyRecipients, "recipients")
        recipients = []
        for index, item in enumerate(items):
            entry = Fields(item, what=f"recipients[{index}]", count=2)
            recipients.append((_user_id(entry), entry.uint()))
        if len(set(recipients)) != len(recipients):
            raise BadFrame("a recipient is named twice")
        return cls(request_id, payload, tuple(recipients), fields.boolean())


@dataclass(frozen=True, slots=True)
class SendChange:
    """``[23, request_id, receipt bin16, [[user_id, [[device_id, payload bin], ...]], ...]]``
    -> ACCEPTED.

    A group change: per named user, one payload per current device (for
    one's own user: per other device), each user once and each of its
    devices once. The relay queues them all, and a RECEIPT envelope carrying
    ``receipt`` in the sending device's own mailbox, in one transaction: every
    device meets the change, and the author its receipt, at one place in the
    relay's order (spec/12-groups.md, section 12.4).
    """

    TYPE: ClassVar[FrameType] = FrameType.SEND_CHANGE
    request_id: int
    receipt: bytes
    messages: tuple[tuple[str, tuple[tuple[int, bytes], ...]], ...] = field(repr=False)

    def to_wire(self) -> list[Any]:
        return [
            self.request_id,
            self.receipt,
            [[user_id, [[d, p] for d, p in payloads]] for user_id, payloads in self.messages],
        ]

    @classmethod
    def read(cls, fields: Fields, limits: RequestLimits) -> SendChange:
        request_id = fields.uint()
        receipt = fields.bin(RECEIPT_SIZE)
        users = _items(fields, limits.max_recipients, TooManyRecipients, "users")
        messages = []
        count = 0
        for index, item in enumerate(users):
            entry = Fields(item, what=f"users[{index}]", count=2)
            user_id = _user_id(entry)
            devices = _items(entry, limits.max_recipients - count, TooManyRecipients, "devices")
            count += len(devices)
            payloads = []
            for number, device in enumerate(devices):
                pair = Fields(device, what=f"users[{index}][{number}]", count=2)
                payloads.append((pair.uint(), _payload(pair, limits)))
            if len({d for d, _ in payloads}) != len(payloads):
                raise BadFrame("a device is named twice")
            messages.append((user_id, tuple(payloads)))
        if len({u for u, _ in messages}) != len(messages):
            raise BadFrame("a user is named twice")
        return cls(request_id, receipt, tuple(messages))


@dataclass(frozen=True, slots=True)
class Ack:
    """``[21, request_id, [guid bin16, ...]]`` -> OK: these envelopes are processed; delete them.

    1 to ``max_ack_guids`` distinct guids: a client acknowledges what it
    processed since its last ACK in one frame, and one OK answers it.
    """

    TYPE: ClassVar[FrameType] = FrameType.ACK
    request_id: int
    guids: tuple[bytes, ...]

    def to_wire(self) -> list[Any]:
        return [self.request_id, list(self.guids)]

    @classmethod
    def read(cls, fields: Fields, limits: RequestLimits) -> Ack:
        request_id = fields.uint()
        guids = tuple(_items(fields, limits.max_ack_guids, BadFrame, "guids"))
        if not guids:
            raise BadFrame("an ACK names at least one guid")
        if not all(type(guid) is bytes and len(guid) == GUID_SIZE for guid in guids):
            raise BadFrame(f"a guid is {GUID_SIZE} bytes")
        if len(set(guids)) != len(guids):
            raise BadFrame("a guid is named twice")
        return cls(request_id, guids)


@dataclass(frozen=True, slots=True)
class Ping:
    """``[22, request_id]`` -> OK (keeps an idle connection open)."""

    TYPE: ClassVar[FrameType] = FrameType.PING
    request_id: int

    def to_wire(self) -> list[Any]:
        return [self.request_id]

    @classmethod
    def read(cls, fields: Fields, limits: RequestLimits) -> Ping:
        return cls(fields.uint())


Request = (
    Hello
    | Auth
    | PublishDeviceList
    | FetchDeviceList
    | UploadPreKeys
    | FetchBundle
    | SendDirect
    | SendGroup
    | SendChange
    | Ack
    | Ping
)

_REQUEST_TYPES: dict[int, type[Request]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Auth,
        PublishDeviceList,
        FetchDeviceList,
        UploadPreKeys,
        FetchBundle,
        SendDirect,
        SendGroup,
        SendChange,
        Ack,
        Ping,
    )
}


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request body that could not be decoded: answer ``error`` (to ``request_id`` if known)."""

    request_id: int | None
    error: RelayError


def decode_request(body: bytes, limits: RequestLimits = RequestLimits()) -> Request | BadRequest:
    """Decode a client's frame body (relay side). Never raises on any input."""
    try:
        value = unpack(body, what="frame", max_size=limits.max_frame_size)
    except DecodeError as exc:
        return BadRequest(None, BadFrame(exc.message))
    request_id = _peek_request_id(value)
    try:
        fields = Fields(value, what="frame")
        frame_type = fields.uint()
        cls = _REQUEST_TYPES.get(frame_type)
        if cls is None:
            raise UnknownFrame(f"frame type {frame_type} is not a request")
        request = cls.read(fields, limits)
        fields.end()
    except RelayError as exc:
        return BadRequest(request_id, exc)
    except ProtocolError as exc:
        return BadRequest(request_id, BadFrame(exc.message))
    return request


def _peek_request_id(value: Any) -> int | None:
    if (
        isinstance(value, list)
        and len(value) >= 2
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
        and 0 <= value[1] <= UINT32_MAX
    ):
        return value[1]
    return None


# ------------------------------------------------------------------ replies


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """``[0, request_id | nil, code str, message str, detail]``.

    A reply to a refused request, or (request_id nil) a connection-level
    error pushed just before the relay closes. ``detail`` is nil or a value
    whose layout the code defines (hushchat.transport.wire.errors).
    """

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    request_id: int | None
    code: str
    message: str
    detail: Any = None

    @classmethod
    def from_error(cls, request_id: int | None, error: RelayError) -> ErrorFrame:
        return cls(request_id, error.wire_code, error.message, error.detail_to_wire())

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.code, self.message, self.detail]

    @classmethod
    def read(cls, fields: Fields) -> ErrorFrame:
        return cls(
            fields.optional_uint(),
            fields.text(MAX_ERROR_CODE_SIZE),
            fields.text(MAX_ERROR_TEXT_SIZE),
            fields.raw(),
        )


@dataclass(frozen=True, slots=True)
class Welcome:
    """``[2, request_id, version, relay_name str, challenge bin32]``: reply to HELLO."""

    TYPE: ClassVar[FrameType] = FrameType.WELCOME
    request_id: int
    version: int
    relay_name: str
    challenge: bytes

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.version, self.relay_name, self.challenge]

    @classmethod
    def read(cls, fields: Fields) -> Welcome:
        return cls(
            fields.uint(),
            fields.uint(),
            fields.text(MAX_RELAY_NAME_SIZE),
            fields.bin(AUTH_CHALLENGE_SIZE),
        )


@dataclass(frozen=True, slots=True)
class Ok:
    """``[3, request_id]``: the request succeeded and has no result."""

    TYPE: ClassVar[FrameType] = FrameType.OK
    request_id: int

    def to_wire(self) -> list[Any]:
        return [self.request_id]

    @classmethod
    def read(cls, fields: Fields) -> Ok:
        return cls(fields.uint())


@dataclass(frozen=True, slots=True)
class DeviceListFrame:
    """``[13, request_id, signed_device_list bin]``: a user's current signed list."""

    TYPE: ClassVar[FrameType] = FrameType.DEVICE_LIST
    request_id: int
    signed_device_list: bytes = field(repr=False)

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.signed_device_list]

    @classmethod
    def read(cls, fields: Fields) -> DeviceListFrame:
        return cls(fields.uint(), fields.bin())


@dataclass(frozen=True, slots=True)
class PreKeyCountsFrame:
    """``[15, request_id, one_time u32, one_time_kem u32]``: stock after an upload."""

    TYPE: ClassVar[FrameType] = FrameType.PREKEY_COUNTS
    request_id: int
    one_time: int
    one_time_kem: int

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.one_time, self.one_time_kem]

    @classmethod
    def read(cls, fields: Fields) -> PreKeyCountsFrame:
        return cls(fields.uint(), fields.uint(), fields.uint())


@dataclass(frozen=True, slots=True)
class BundleFrame:
    """``[17, request_id, bundle bin]``: the canonical PreKeyBundle bytes (spec section 6)."""

    TYPE: ClassVar[FrameType] = FrameType.BUNDLE
    request_id: int
    bundle: bytes = field(repr=False)

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.bundle]

    @classmethod
    def read(cls, fields: Fields) -> BundleFrame:
        return cls(fields.uint(), fields.bin())


@dataclass(frozen=True, slots=True)
class Accepted:
    """``[20, request_id, server_ts u64, mailbox_full [[user_id, device_id], ...]]``.

    The send is durably stored (committed) for every device it named but
    those in ``mailbox_full``, whose mailboxes had no room (in the order the
    send named them; empty when every device took it).
    """

    TYPE: ClassVar[FrameType] = FrameType.ACCEPTED
    request_id: int
    server_ts: int
    mailbox_full: tuple[tuple[str, int], ...] = ()

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.server_ts, [[u, d] for u, d in self.mailbox_full]]

    @classmethod
    def read(cls, fields: Fields) -> Accepted:
        request_id, server_ts = fields.uint(), fields.uint(UINT64_MAX)
        items = fields.array(max_len=UINT32_MAX)
        full = []
        for index, item in enumerate(items):
            entry = Fields(item, what=f"mailbox_full[{index}]", count=2)
            full.append((_user_id(entry), entry.uint()))
            entry.end()
        return cls(request_id, server_ts, tuple(full))


# ------------------------------------------------------------------ pushes


@dataclass(frozen=True, slots=True)
class EnvelopePush:
    """``[30, [guid, server_ts, sender_user, sender_device, kind, payload]]``."""

    TYPE: ClassVar[FrameType] = FrameType.ENVELOPE
    envelope: Envelope

    def to_wire(self) -> list[Any]:
        return [self.envelope.to_wire()]

    @classmethod
    def read(cls, fields: Fields) -> EnvelopePush:
        return cls(Envelope.read(fields.nested(what="envelope", count=6)))


@dataclass(frozen=True, slots=True)
class QueueEmpty:
    """``[31]``: every envelope queued when the connection authenticated has been pushed."""

    TYPE: ClassVar[FrameType] = FrameType.QUEUE_EMPTY

    def to_wire(self) -> list[Any]:
        return []

    @classmethod
    def read(cls, fields: Fields) -> QueueEmpty:
        return cls()


@dataclass(frozen=True, slots=True)
class PreKeysLow:
    """``[32, one_time u32, one_time_kem u32]``: this device's one-time prekeys run low."""

    TYPE: ClassVar[FrameType] = FrameType.PREKEYS_LOW
    one_time: int
    one_time_kem: int

    def to_wire(self) -> list[Any]:
        return [self.one_time, self.one_time_kem]

    @classmethod
    def read(cls, fields: Fields) -> PreKeysLow:
        return cls(fields.uint(), fields.uint())


@dataclass(frozen=True, slots=True)
class MailExpired:
    """``[33, count u32 | nil, first_ts u64, last_ts u64]``: this device's mail expired unread.

    ``count`` envelopes accepted from ``first_ts`` to ``last_ts`` (ms since
    the Unix epoch) expired before this device took them. ``count`` nil: the
    relay lost the keys of its queue at ``last_ts``; whatever was queued for
    this device since ``first_ts`` is gone, how much is unknown.
    """

    TYPE: ClassVar[FrameType] = FrameType.MAIL_EXPIRED
    count: int | None
    first_ts: int
    last_ts: int

    def to_wire(self) -> list[Any]:
        return [self.count, self.first_ts, self.last_ts]

    @classmethod
    def read(cls, fields: Fields) -> MailExpired:
        return cls(fields.optional_uint(), fields.uint(UINT64_MAX), fields.uint(UINT64_MAX))


Reply = ErrorFrame | Welcome | Ok | DeviceListFrame | PreKeyCountsFrame | BundleFrame | Accepted
Push = EnvelopePush | QueueEmpty | PreKeysLow | MailExpired
RelayFrame = Reply | Push
Frame = Request | RelayFrame

_RELAY_FRAME_TYPES: dict[int, type[RelayFrame]] = {
    cls.TYPE: cls
    for cls in (
        ErrorFrame,
        Welcome,
        Ok,
        DeviceListFrame,
        PreKeyCountsFrame,
        BundleFrame,
        Accepted,
        EnvelopePush,
        QueueEmpty,
        PreKeysLow,
        MailExpired,
    )
}


def decode_relay_frame(body: bytes, *, max_frame_size: int = MAX_FRAME_SIZE) -> RelayFrame:
    """Decode a relay's frame body (client side); DecodeError or UnknownFrame if bad."""
    fields = Fields.decode(body, what="frame", max_size=max_frame_size)
    frame_type = fields.uint()
    cls = _RELAY_FRAME_TYPES.get(frame_type)
    if cls is None:
        raise UnknownFrame(f"frame type {frame_type} is not sent by a relay")
    frame = cls.read(fields)
    fields.end()
    return frame


def encode_body(frame: Frame) -> bytes:
    """The canonical msgpack body of ``frame``."""
    return pack([frame.TYPE, *frame.to_wire()])
