"""The transport's branch of the error tree: connection failures and relay refusals.

Under the root :class:`~hushchat.protocol.errors.HushchatError`, beside the
protocol's :class:`~hushchat.protocol.errors.ProtocolError`::

    TransportError
    ├── ConnectionFailure          the connection failed or is gone; reconnect
    │   ├── ConnectionClosed       closed by either side, or broken; ``reason``
    │   │                          holds the relay's final error, if it sent one
    │   ├── RelayTimeout           a network wait exceeded its timeout
    │   │   └── ConnectTimeout     opening the connection did
    │   └── ConnectFailed          the connection could not be opened:
    │       ├── UnknownHost        the host name does not resolve
    │       ├── ConnectionRefused  nothing listens at that address and port
    │       ├── HostUnreachable    no route to the host, or the network is down
    │       └── TlsFailed          the TLS handshake failed (say, an untrusted
    │                              certificate)
    ├── RelayError                 the relay refused a request (an ERROR frame)
    │   └── one class per wire code (BadFrame, RateLimited, MailboxFull, ...)
    └── the client library's and the relay's own (StoreLocked, SendDropped,
        StorageConflict, RelayStartError; each beside the code raising it)

The relay answers a refused request (or ends a connection) with an ERROR
frame ``[0, request_id | nil, code, message, detail]``. Each code has one
:class:`RelayError` subclass here, shared by both sides: the relay raises
it while handling a request and sends it; the client raises the same class
when the frame arrives. Codes are stable (spec/07-relay-protocol.md lists
them) and distinct from every hushchat.protocol.errors code.

A relay that sends bytes breaking this protocol is a genuinely remote fault:
:class:`RelayProtocolViolation` is a
:class:`~hushchat.protocol.errors.RemoteProtocolError` (the client closes
the connection, and the ConnectionClosed that follows has it as its cause).

Messages never contain payloads or key material.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from hushchat.protocol.consts import MAX_DEVICES_PER_USER
from hushchat.protocol.devices import check_user_id, read_user_id
from hushchat.protocol.encoding import UINT64_MAX, Fields
from hushchat.protocol.errors import DecodeError, HushchatError, RemoteProtocolError

# Longest error message or cause code on the wire, in UTF-8 bytes.
MAX_ERROR_TEXT_SIZE = 1024
# An array in an error detail never has more items than a send has recipients.
_MAX_DETAIL_ITEMS = 2**32


class TransportError(HushchatError):
    """Base of the transport's errors (none of them is a ProtocolError)."""

    code = "TRANSPORT_ERROR"


class ConnectionFailure(TransportError):
    """The connection to the relay failed or is gone; a new connection may succeed."""

    code = "CONNECTION_FAILURE"


class ConnectionClosed(ConnectionFailure):
    """The relay connection is closed; ``reason`` is the relay's final error, if any."""

    code = "CONNECTION_CLOSED"

    def __init__(self, message: str = "", *, reason: RelayError | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class RelayTimeout(ConnectionFailure):
    """A network wait (connect, handshake, reply, write) exceeded its timeout."""

    code = "RELAY_TIMEOUT"


class ConnectTimeout(RelayTimeout):
    """Opening the connection (TCP, TLS and HELLO) took longer than the connect timeout."""

    code = "CONNECT_TIMEOUT"


class ConnectFailed(ConnectionFailure):
    """The connection could not be opened; a subclass says why, when it is known."""

    code = "CONNECT_FAILED"


class UnknownHost(ConnectFailed):
    """The relay's host name does not resolve (a typo, or no DNS)."""

    code = "UNKNOWN_HOST"


class ConnectionRefused(ConnectFailed):
    """The host answered, but nothing listens at that port (no relay running there)."""

    code = "CONNECTION_REFUSED"


class HostUnreachable(ConnectFailed):
    """No route to the host, or this machine's network is down."""

    code = "HOST_UNREACHABLE"


class TlsFailed(ConnectFailed):
    """The TLS handshake failed: an untrusted or mismatched certificate, or no TLS there."""

    code = "TLS_FAILED"


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (``[::1]:7443``) as in URLs."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RelayProtocolViolation(RemoteProtocolError):
    """The relay sent something this protocol does not allow; the connection is closed."""

    code = "RELAY_PROTOCOL_VIOLATION"


class RelayNameMismatch(RelayProtocolViolation):
    """The relay announced another name than the relay we meant; we signed nothing.

    Another relay, or one passing on another relay's login challenge (spec
    7.4): retrying cannot help, so the client library does not reconnect.
    """

    code = "RELAY_NAME_MISMATCH"


class RelayError(TransportError):
    """A relay protocol error with a stable wire code.

    Raised by the relay for a bad request (and sent in an ERROR frame), and
    by the client when such a frame arrives. ``closes`` says whether the
    relay closes the connection after sending it (it also closes on every
    error before authentication). A code this version does not know
    arrives as a plain RelayError whose :attr:`wire_code` is that code.
    """

    code = "RELAY_ERROR"
    closes: ClassVar[bool] = False

    def __init__(self, message: str = "", *, wire_code: str | None = None) -> None:
        super().__init__(message)
        self._wire_code = wire_code or self.code

    @property
    def wire_code(self) -> str:
        return self._wire_code

    def detail_to_wire(self) -> Any:
        """The ``detail`` field of the ERROR frame (nil unless a subclass defines one)."""
        return None

    @classmethod
    def from_wire(cls, message: str, detail: Any) -> Self:
        """Rebuild the error from an ERROR frame; DecodeError if ``detail`` is malformed."""
        if detail is not None:
            raise DecodeError(f"{cls.code}: detail must be nil")
        return cls(message)


# ------------------------------------------------------------------ frame-level


class BadFrame(RelayError):
    """A frame body is not a canonical msgpack array of the type's fields."""

    code = "BAD_FRAME"


class FrameTooLarge(RelayError):
    """A frame's length prefix exceeds the maximum frame size."""

    code = "FRAME_TOO_LARGE"
    closes = True


class UnknownFrame(RelayError):
    """A frame type this relay does not know, or one that only the relay sends."""

    code = "UNKNOWN_FRAME"


class UnexpectedFrame(RelayError):
    """A frame that the connection's state does not allow (e.g. SEND before AUTH)."""

    code = "UNEXPECTED_FRAME"


class UnsupportedVersion(RelayError):
    """HELLO named a relay protocol version the relay does not speak."""

    code = "UNSUPPORTED_VERSION"
    closes = True

    def __init__(self, message: str = "", *, supported: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.supported = tuple(supported)

    def detail_to_wire(self) -> Any:
        return list(self.supported)

    @classmethod
    def from_wire(cls, message: str, detail: Any) -> Self:
        fields = Fields(detail, what=f"{cls.code} detail")
        versions = [fields.uint() for _ in range(fields.remaining)]
        return cls(message, supported=versions)


# ------------------------------------------------------------------ connection-level


class AuthenticationFailed(RelayError):
    """The AUTH signature, user or device did not check out."""

    code = "AUTH_FAILED"
    closes = True


class AuthTimeout(RelayError):
    """The connection did not authenticate in time."""

    code = "AUTH_TIMEOUT"
    closes = True


class IdleTimeout(RelayError):
    """No frame arrived from the client for the idle timeout."""

    code = "IDLE_TIMEOUT"
    closes = True


class FrameTimeout(RelayError):
    """A started frame was not completed in time."""

    code = "FRAME_TIMEOUT"
    closes = True


class Superseded(RelayError):
    """Another connection authenticated as the same device; this one is closed."""

    code = "SUPERSEDED"
    closes = True


class DeviceRemoved(RelayError):
    """This device was removed from its user's device list; its mail is gone."""

    code = "DEVICE_REMOVED"
    closes = True


class InternalError(RelayError):
    """The relay failed while handling the request (its fault, not the client's)."""

    code = "INTERNAL_ERROR"


class StorageFull(RelayError):
    """The relay's storage is full (no space left on its disk); nothing was stored.

    The relay's operator must free space; the relay then goes on by itself,
    so the request may be sent again later as it was.
    """

    code = "STORAGE_FULL"


# ------------------------------------------------------------------ users and devices


class RegistrationClosed(RelayError):
    """The relay registers no new users (its operator closed registration)."""

    code = "REGISTRATION_CLOSED"


class InviteRefused(RelayError):
    """The relay registers users by invitation, and the token is missing, unknown,
    expired or already used (which of these is not said)."""

    code = "INVITE_REFUSED"


class Forbidden(RelayError):
    """The request acts on another user's data (or re-registers an existing user)."""

    code = "FORBIDDEN"


class UnknownUser(RelayError):
    """The named user has no device list at the relay."""

    code = "UNKNOWN_USER"

    def __init__(self, message: str = "", *, user_id: str = "") -> None:
        super().__init__(message)
        self.user_id = user_id

    def detail_to_wire(self) -> Any:
        return self.user_id

    @classmethod
    def from_wire(cls, message: str, detail: Any) -> Self:
        return cls(message, user_id=check_user_id(detail, DecodeError))


class UnknownDevice(RelayError):
    """The named device is not in its user's current device list."""

    code = "UNKNOWN_DEVICE"


def _read_cause(code: str, detail: Any) -> str:
    return Fields([detail], what=f"{code} detail").text(MAX_ERROR_TEXT_SIZE)


class DeviceListRejected(RelayError):
    """An uploaded signed device list was refused; ``cause`` is the protocol error code.

    BAD_SIGNATURE / MALFORMED / INVALID_KEY / UNKNOWN_VERSION: it does not
    verify or decode; UNTRUSTED_IDENTITY: signed by another user identity
    than the one bound at registration; STALE_CHANGE: its counter is not
    above the stored list's.
    """

    code = "DEVICE_LIST_REJECTED"

    def __init__(self, message: str = "", *, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause

    def detail_to_wire(self) -> Any:
        return self.cause

    @classmethod
    def from_wire(cls, message: str, detail: Any) -> Self:
        return cls(message, cause=_read_cause(cls.code, detail))


@dataclass(frozen=True, slots=True)
class DeviceMismatch:
    """One recipient user whose devices a send did not match, with its current list."""

    user_id: str
    signed_device_list: bytes
    missing: tuple[int, ...]
    unknown: tuple[int, ...]

    def to_wire(self) -> list[Any]:
        return [self.user_id, self.signed_device_list, list(self.missing), list(self.unknown)]

    @classmethod
    def read(cls, value: Any, what: str) -> DeviceMismatch:
        fields = Fields(value, what=what, count=4)
        user_id = read_user_id(fields)
        signed = fields.bin()
        missing = _uint_list(fields.array(max_len=MAX_DEVICES_PER_USER), f"{what}.missing")
        unknown = _uint_list(fields.array(max_len=_MAX_DETAIL_ITEMS), f"{what}.unknown")
        fields.end()
        return cls(user_id, signed, missing, unknown)

    def __repr__(self) -> str:
        return f"DeviceMismatch({self.user_id!r}, missing={self.missing}, unknown={self.unknown})"


def _uint_list(items: list[Any], what: str) -> tuple[int, ...]:
    fields = Fields(items, what=what)
    return tuple(fields.uint() for _ in range(len(items)))


class DeviceListMismatch(RelayError):
    """A send did not name exactly the current devices of its recipient users.

    Like Signal-Server's 409/410: for each mismatched user, ``mismatches``
    carries its current signed device list, the device ids the send missed
    and the ids it named that are not (or no longer) in the list. The client
    verifies the list, fixes its sessions and retries.
    """

    code = "DEVICE_LIST_MISMATCH"

    def __init__(self, message: str = "", *, mismatches: Sequence[DeviceMismatch] = ()) -> None:
        super().__init__(message)
        self.mismatches = tuple(mismatches)

    def detail_to_wire(self) -> Any:
        return [m.to_wire() for m in self.mismatches]

    @classmethod
    def from_wire(cls, message: str, detail: Any) -> Self:
        fields = Fields(detail, what=f"{cls.code} detail")
        items = [
            DeviceMismatch.read(fields.raw(), f"{cls.code} detail[{i}]")
            for i in range(fields.remaining)
        ]
        return cls(message, mismatches=items)


# ------------------------------------------------------------------ prekeys


class PreKeysRejected(RelayError):
    """A prekey upload was refused; ``cause`` is the protocol error code.

    BAD_SIGNATURE: a signature does not verify under the device identity;
    INVALID_KEY: a public key is not a valid (canonical) key.
    """

    code = "PREKEYS_REJECTED"

    def __init__(self, message: str = "", *, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause

    def detail_to_wire(self) -> Any:
        return self.cause

    @classmethod
    def from_wire(cls, message: str, detail: Any) -> Self:
        return cls(message, cause=_read_cause(cls.code, detail))


class PreKeyIdInUse(RelayError):
    """A one-time prekey id in the upload is already stored (or repeated) for this device."""

    code = "PREKEY_ID_IN_USE"


class PreKeyStockFull(RelayError):
    """The upload would store more one-time prekeys than the relay keeps per device."""

    code = "PREKEY_STOCK_FULL"


class NoPreKeys(RelayError):
    """The target device has not uploaded a signed prekey and a KEM prekey."""

    code = "NO_PREKEYS"


# ------------------------------------------------------------------ limits


class RateLimited(RelayError):
    """Too many requests of this kind; retry after ``retry_after_ms`` milliseconds."""

    code = "RATE_LIMITED"

    def __init__(self, message: str = "", *, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def detail_to_wire(self) -> Any:
        return self.retry_after_ms

    @classmethod
    def from_wire(cls, message: str, detail: Any) -> Self:
        return cls(message, retry_after_ms=Fields([detail], what=cls.code).uint(UINT64_MAX))


class MailboxFull(RelayError):
    """Recipient mailboxes are full; nothing of the send was stored.

    ``devices`` names every full (user_id, device_id); the client may retry
    without them (they miss the message) or later.
    """

    code = "MAILBOX_FULL"

    def __init__(self, message: str = "", *, devices: Sequence[tuple[str, int]] = ()) -> None:
        super().__init__(message)
        self.devices = tuple(devices)

    def detail_to_wire(self) -> Any:
        return [[user_id, device_id] for user_id, device_id in self.devices]

    @classmethod
    def from_wire(cls, message: str, detail: Any) -> Self:
        fields = Fields(detail, what=f"{cls.code} detail")
        devices = []
        for index in range(fields.remaining):
            pair = fields.nested(what=str(index), count=2)
            devices.append((read_user_id(pair), pair.uint()))
        return cls(message, devices=devices)


class TooManyRecipients(RelayError):
    """A send names more recipient devices than the relay allows."""

    code = "TOO_MANY_RECIPIENTS"


class PayloadTooLarge(RelayError):
    """A payload exceeds the relay's maximum payload size."""

    code = "PAYLOAD_TOO_LARGE"


# ------------------------------------------------------------------ registry


def _relay_error_classes() -> dict[str, type[RelayError]]:
    found: dict[str, type[RelayError]] = {}
    pending: list[type[RelayError]] = list(RelayError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        found[cls.code] = cls
    return found


RELAY_ERROR_CLASSES: dict[str, type[RelayError]] = _relay_error_classes()


def relay_error_from_wire(code: str, message: str, detail: Any) -> RelayError:
    """The error an ERROR frame describes; DecodeError if its detail is malformed."""
    cls = RELAY_ERROR_CLASSES.get(code)
    if cls is None:
        # A newer relay's code: its detail has no layout we know, so it is dropped.
        return RelayError(message, wire_code=code)
    return cls.from_wire(message, detail)


def first_leaf(error: BaseException) -> BaseException:
    """The first exception inside ``error``'s (nested) groups; ``error`` if not a group."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
