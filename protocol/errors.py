"""The one exception hierarchy of hushchat, and its protocol branch.

Every error derives from :class:`HushchatError` and carries a stable
``code`` string. The codes are part of the protocol: spec/08-errors.md lists
them and the test vectors name them in their ``error`` field, so other
implementations can agree on *why* an input was refused, not only *that* it
was.

The root has two branches. :class:`ProtocolError` (this module) is what the
pure core raises; ``TransportError`` (in ``hushchat.transport.wire.errors``)
is the transport's: a connection that failed, a relay's refusal, the client
library's own conditions. A connection failure is therefore never a
protocol error. The protocol branch splits three ways, as h11 separates
local from remote errors:

* :class:`RemoteProtocolError`: the bytes we were given (by a peer, or by a
  relay in between) are bad. Safe to drop the input and carry on.
* :class:`LocalProtocolError`: the caller misused the API. A bug in the app.
* :class:`StateError`: stored state (a pickle) is corrupt or from an
  unknown version.

Messages never contain key material or plaintext.
"""

from __future__ import annotations

from typing import ClassVar


class HushchatError(Exception):
    """Base of every error raised by hushchat; ``code`` says which, stably."""

    code: ClassVar[str] = "HUSHCHAT_ERROR"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code)
        self.message = message or self.code


class ProtocolError(HushchatError):
    """Base of the protocol's errors: bad remote input, local misuse, unreadable state."""

    code = "PROTOCOL_ERROR"


# ---------------------------------------------------------------- remote input


class RemoteProtocolError(ProtocolError):
    """Input from the network was refused; state is unchanged."""

    code = "REMOTE_ERROR"


class DecodeError(RemoteProtocolError):
    """Bytes do not decode to the expected structure (truncated, wrong types)."""

    code = "MALFORMED"


class NonCanonicalEncoding(DecodeError):
    """Bytes decode but are not the unique canonical encoding of their value."""

    code = "NON_CANONICAL"


class UnknownVersion(DecodeError):
    """A message or record names a protocol version we do not speak."""

    code = "UNKNOWN_VERSION"


class InvalidKey(RemoteProtocolError):
    """A public key does not decode, is of small order or outside the subgroup."""

    code = "INVALID_KEY"


class NonContributoryKey(InvalidKey):
    """A Diffie-Hellman output was all zero (the peer's key has small order)."""

    code = "NON_CONTRIBUTORY"


class BadMac(RemoteProtocolError):
    """A message authentication code did not verify."""

    code = "BAD_MAC"


class BadSignature(RemoteProtocolError):
    """An Ed25519 signature did not verify."""

    code = "BAD_SIGNATURE"


class BadDeviceProof(BadSignature):
    """A device list names a device key without that device's proof that it belongs to the user."""

    code = "BAD_DEVICE_PROOF"


class DecryptionFailed(RemoteProtocolError):
    """Authenticated bytes did not decrypt (bad padding under a valid signature)."""

    code = "DECRYPTION_FAILED"


class DuplicateMessage(RemoteProtocolError):
    """This message was already decrypted; its key is gone (forward secrecy)."""

    code = "DUPLICATE_MESSAGE"


class TooFarInFuture(RemoteProtocolError):
    """The message counter jumps further ahead than the skip limit allows."""

    code = "TOO_FAR_IN_FUTURE"


class UnknownPreKey(RemoteProtocolError):
    """An initial message names a prekey we do not hold (unknown or already used)."""

    code = "UNKNOWN_PREKEY"


class ReplayedHandshake(RemoteProtocolError):
    """An initial message without a one-time prekey was seen before."""

    code = "REPLAYED_HANDSHAKE"


class NoSession(RemoteProtocolError):
    """A ratchet message arrived for which no session can decrypt it."""

    code = "NO_SESSION"


class NoSenderKey(RemoteProtocolError):
    """A group message names a sender chain we do not hold."""

    code = "NO_SENDER_KEY"


class SenderMismatch(RemoteProtocolError):
    """A sender-key distribution names another device than the one whose session delivered it."""

    code = "SENDER_MISMATCH"


class UnknownGroup(RemoteProtocolError):
    """A group message or sender key names a group the receiver does not hold."""

    code = "UNKNOWN_GROUP"


class NotAMember(RemoteProtocolError):
    """A group message or sender key comes from a device that is not a current member's."""

    code = "NOT_A_MEMBER"


class TooManySenderKeys(RemoteProtocolError):
    """A sender key would need a new record beyond the receiver's limit of records."""

    code = "TOO_MANY_SENDER_KEYS"


class TooManyGroups(RemoteProtocolError):
    """A welcome would make the receiver hold more groups than its limit."""

    code = "TOO_MANY_GROUPS"


class UntrustedIdentity(RemoteProtocolError):
    """A peer's identity key differs from the one we trust; the app must confirm."""

    code = "UNTRUSTED_IDENTITY"


class FingerprintMismatch(RemoteProtocolError):
    """A scanned safety number does not match the identity keys we hold."""

    code = "FINGERPRINT_MISMATCH"


class UnauthorizedChange(RemoteProtocolError):
    """A group control message is not allowed by the state we hold."""

    code = "UNAUTHORIZED_CHANGE"


class DuplicateDeviceKey(UnauthorizedChange):
    """A device key is listed twice: in one device list, or under two users."""

    code = "DUPLICATE_DEVICE_KEY"


class StaleChange(RemoteProtocolError):
    """A group control message does not build on the epoch we hold."""

    code = "STALE_CHANGE"


# ---------------------------------------------------------------- local misuse


class LocalProtocolError(ProtocolError):
    """The caller asked for something the protocol does not allow."""

    code = "LOCAL_ERROR"


class InvalidArgument(LocalProtocolError):
    """An argument has the wrong type, size or value."""

    code = "INVALID_ARGUMENT"


class LimitExceeded(InvalidArgument):
    """An argument is larger than one of the protocol's limits.

    ``limit`` names the limit (a constant of spec/01-parameters.md) and
    ``maximum`` is its value; nothing changed.
    """

    code = "LIMIT_EXCEEDED"

    def __init__(self, what: str, size: int, limit: str, maximum: int) -> None:
        super().__init__(f"{what} is {size}, over {limit} ({maximum})")
        self.limit = limit
        self.maximum = maximum


class InvalidState(LocalProtocolError):
    """The object is not in a state where this operation is possible."""

    code = "INVALID_STATE"


# ---------------------------------------------------------------- stored state


class StateError(ProtocolError):
    """A serialized state ("pickle") cannot be loaded."""

    code = "CORRUPT_STATE"


class UnknownStateVersion(StateError):
    """A pickle was written by a version of hushchat we cannot read."""

    code = "UNKNOWN_STATE_VERSION"


def all_error_classes() -> list[type[HushchatError]]:
    """Every error class imported so far, for the spec's tables and the vector checks."""
    seen: list[type[HushchatError]] = []
    pending: list[type[HushchatError]] = [HushchatError]
    while pending:
        cls = pending.pop(0)
        seen.append(cls)
        pending.extend(cls.__subclasses__())
    return seen
