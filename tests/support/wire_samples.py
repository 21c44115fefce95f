"""One example of every request, relay frame and relay error of the wire protocol.

The framing tests round-trip each; the fuzz tests start their mutations from them.
"""

from __future__ import annotations

from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic
from hushchat.transport.wire.errors import (
    BadFrame,
    DeviceListMismatch,
    DeviceListRejected,
    DeviceMismatch,
    MailboxFull,
    RateLimited,
    RelayError,
    UnknownUser,
    UnsupportedVersion,
)
from hushchat.transport.wire.frames import (
    Accepted,
    Ack,
    Auth,
    BundleFrame,
    DeviceListFrame,
    EnvelopePush,
    ErrorFrame,
    FetchBundle,
    FetchDeviceList,
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
    SendDirect,
    SendGroup,
    UploadPreKeys,
    Welcome,
)
from hushchat.transport.wire.limits import RELAY_PROTOCOL_VERSION
from hushchat.transport.wire.records import Envelope

# Frames carry keys and signatures as bytes; the wire layer checks only their sizes.
KEM_PUBLIC_KEY = bytes(range(256)) * 4 + bytes(160)
SIGNATURE = b"\x07" * 64

REQUESTS: list[Request] = [
    Hello(1, RELAY_PROTOCOL_VERSION, 10),
    Auth(2, "alice", 7, SIGNATURE),
    PublishDeviceList(3, b"signed list"),
    FetchDeviceList(4, "bob"),
    UploadPreKeys(
        5,
        SignedPreKeyPublic(1, b"\x01" * 32, SIGNATURE),
        KemPreKeyPublic(2, KEM_PUBLIC_KEY, SIGNATURE),
        (OneTimePreKeyPublic(3, b"\x02" * 32),),
        (KemPreKeyPublic(4, KEM_PUBLIC_KEY, SIGNATURE),),
    ),
    UploadPreKeys(6, None, None, (), ()),
    FetchBundle(7, "bob", 2**32 - 1),
    SendDirect(8, "bob", ((1, b"x"), (2, b""))),
    SendDirect(8, "bob", ((2, b"again"),), resend=True),
    SendGroup(9, b"group payload", (("bob", 1), ("carol", 1), ("carol", 2))),
    SendGroup(9, b"group payload", (("carol", 2),), resend=True),
    Ack(10, (b"\x09" * 16,)),
    Ack(11, tuple(bytes([i]) * 16 for i in range(100))),
    Ping(2**32 - 1),
]

RELAY_FRAMES: list[RelayFrame] = [
    ErrorFrame(None, "IDLE_TIMEOUT", "idle", None),
    ErrorFrame(3, "RATE_LIMITED", "slow down", 1500),
    Welcome(1, 1, "relay.example", b"\x05" * 32),
    Ok(2),
    DeviceListFrame(3, b"list"),
    PreKeyCountsFrame(4, 10, 20),
    BundleFrame(5, b"bundle"),
    Accepted(6, 2**64 - 1),
    Accepted(6, 5, (("bob", 1), ("carol", 2**32 - 1))),
    EnvelopePush(Envelope(b"\x01" * 16, 123, "alice", 1, 2, b"ciphertext")),
    QueueEmpty(),
    PreKeysLow(3, 0),
    MailExpired(2, 100, 2**64 - 1),
    MailExpired(None, 0, 5),
]

# Errors with every kind of detail a relay sends (and one with none).
ERRORS: list[RelayError] = [
    UnsupportedVersion("no", supported=[1, 2]),
    UnknownUser("who", user_id="zed"),
    DeviceListRejected("bad", cause="STALE_CHANGE"),
    DeviceListMismatch(
        "differ",
        mismatches=[
            DeviceMismatch("bob", b"signed", (2,), (3, 9)),
            DeviceMismatch("c", b"", (), (1,)),
        ],
    ),
    RateLimited("slow", retry_after_ms=600_000),
    MailboxFull("full", devices=[("bob", 1), ("carol", 4)]),
    BadFrame("plain"),
]
