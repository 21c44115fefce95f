"""Several devices per user: the device list a user identity signs.

A user has one long-term *user identity* (an Ed25519 key pair, kept on the
primary device or offline) and up to ``MAX_DEVICES_PER_USER`` devices, each
with its own Ed25519 *device identity* and a u32 device id. The user identity
signs the list of devices; peers and the relay trust a device only if a
signed list of its user names it. The relay stores and serves the lists but
cannot add a device: it holds no user identity key.

A list names a device only with that device's *proof*: its device identity's
signature saying which user (user id, device id, user identity) it belongs
to, as Matrix devices self-sign their keys with their user and device ids.
Without it, a user could list another user's device key as its own and have
that device's sessions presented as its own (an unknown-key share); the
proof also travels unchanged from list to list, so the user identity can
sign new lists without its devices being online.

Wire format (canonical msgpack, spec/00-conventions.md)::

    SignedDeviceList = [body: bin, signature: bin(64)]
    body = pack([version: uint (= PROTOCOL_VERSION),
                 user_id: str (1..MAX_USER_ID_SIZE bytes of UTF-8, no U+0000),
                 user_identity: bin(32),          # Ed25519 public key
                 counter: uint64,                 # +1 on every change
                 devices: [[device_id: uint32, device_identity: bin(32),
                            proof: bin(64)], ...]])
    signature = Ed25519(user identity, DEVICE_LIST_SIGNATURE_CONTEXT || body)
    proof     = Ed25519(device identity, DEVICE_PROOF_SIGNATURE_CONTEXT
                        || pack([user_id, device_id, user_identity]))

``devices`` has 1..MAX_DEVICES_PER_USER entries in strictly increasing
device id order (so each list has exactly one encoding), every identity is
a valid Ed25519 public key (it decodes, is not of small order and lies in
the prime-order subgroup) and no identity appears twice.

A receiver decodes with :meth:`SignedDeviceList.decode`, which verifies the
signature with the user identity named in the body and every device's
proof, then accepts the list only through :func:`check_update` against the
list it held: same user id, same user identity (else UNTRUSTED_IDENTITY, the
app must confirm a new identity), and a strictly larger counter (else
STALE_CHANGE, so a relay cannot replay an old list to resurrect a removed
device); and through :func:`check_device_keys` against the lists it holds of
other users (a device key belongs to one user: DUPLICATE_DEVICE_KEY).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Protocol

from .consts import (
    DEVICE_LIST_SIGNATURE_CONTEXT,
    DEVICE_PROOF_SIGNATURE_CONTEXT,
    ED25519_KEY_SIZE,
    ED25519_SIGNATURE_SIZE,
    MAX_DEVICES_PER_USER,
    MAX_USER_ID_SIZE,
    PROTOCOL_VERSION,
)
from .encoding import UINT32_MAX, UINT64_MAX, Fields, pack
from .errors import (
    BadDeviceProof,
    BadSignature,
    DecodeError,
    DuplicateDeviceKey,
    InvalidArgument,
    InvalidKey,
    InvalidState,
    ProtocolError,
    StaleChange,
    UnauthorizedChange,
    UnknownVersion,
    UntrustedIdentity,
)
from .keys import IdentityKeyPair, PublicIdentity, identity_to_x25519


def check_user_id(
    user_id: object, error: type[ProtocolError] = InvalidArgument, *, stored: bool = False
) -> str:
    """``user_id`` if it is a user id, else raise ``error``: the one rule for every user id.

    A user id is a str of 1..MAX_USER_ID_SIZE bytes of UTF-8 without U+0000
    (spec/11-devices.md section 11.1). With ``stored``, a user id this device
    read back from its own stored state (or a value such a state rebuilds) is
    held to the size rule only: a state stored before U+0000 was refused
    still loads.
    """
    if not isinstance(user_id, str):
        raise error("a user id is a string")
    try:
        size = len(user_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise error("a user id is valid UTF-8") from None
    if not 1 <= size <= MAX_USER_ID_SIZE:
        raise error(f"a user id is 1 to {MAX_USER_ID_SIZE} bytes of UTF-8")
    if not stored and "\x00" in user_id:
        raise error("a user id contains no U+0000")
    return user_id


def read_user_id(fields: Fields, *, stored: bool = False) -> str:
    """The next field as a user id (:func:`check_user_id`); DecodeError if it is not one."""
    return check_user_id(fields.text(MAX_USER_ID_SIZE), DecodeError, stored=stored)


def check_identity_key(public: object, error: type[ProtocolError] = InvalidArgument) -> bytes:
    """Return ``public`` if it is a valid Ed25519 identity public key, else raise ``error``."""
    if not isinstance(public, bytes) or len(public) != ED25519_KEY_SIZE:
        raise error("an identity key is 32 bytes")
    try:
        identity_to_x25519(public)
    except InvalidKey:
        raise error("an identity key must be a valid Ed25519 public key") from None
    return public


def device_proof_message(user_id: str, device_id: int, user_identity: bytes) -> bytes:
    """What a device identity signs to belong to a user (its proof of possession)."""
    return DEVICE_PROOF_SIGNATURE_CONTEXT + pack([user_id, device_id, user_identity])


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """One device of a user: its id, its Ed25519 device identity public key and its proof.

    ``proof`` is the device identity's signature over
    :func:`device_proof_message` for the user it belongs to; make it with
    :meth:`prove` on the device itself, check it with :meth:`verify_proof`.
    """

    device_id: int
    identity: bytes
    proof: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if (
            isinstance(self.device_id, bool)
            or not isinstance(self.device_id, int)
            or not 0 <= self.device_id <= UINT32_MAX
        ):
            raise InvalidArgument("a device id is an integer from 0 to 2**32-1")
        check_identity_key(self.identity)
        if not isinstance(self.proof, bytes) or len(self.proof) != ED25519_SIGNATURE_SIZE:
            raise InvalidArgument("a device proof is a 64-byte signature")

    @classmethod
    def prove(
        cls, device_identity: IdentityKeyPair, user_id: str, device_id: int, user_identity: bytes
    ) -> DeviceEntry:
        """(On the device.) The entry saying that this device is ``user_id``'s ``device_id``."""
        check_user_id(user_id)
        check_identity_key(user_identity)
        message = device_proof_message(user_id, device_id, user_identity)
        return cls(device_id, device_identity.public.ed25519, device_identity.sign(message))

    def verify_proof(self, user_id: str, user_identity: bytes) -> None:
        """Check that this device agreed to be ``user_id``'s, under ``user_identity``."""
        message = device_proof_message(user_id, self.device_id, user_identity)
        try:
            PublicIdentity.from_bytes(self.identity).verify(self.proof, message)
        except BadSignature:
            raise BadDeviceProof(f"device {self.device_id} has no valid proof") from None

    def to_wire(self) -> list[object]:
        return [self.device_id, self.identity, self.proof]

    def __repr__(self) -> str:
        return f"DeviceEntry({self.device_id}, {self.identity.hex()})"


@dataclass(frozen=True, slots=True)
class DeviceChanges:
    """What differs between two device lists of one user.

    A device whose id stays but whose identity changed counts as removed
    (the old entry) and added (the new one): it is a different device.
    """

    added: tuple[DeviceEntry, ...]
    removed: tuple[DeviceEntry, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True, slots=True)
class DeviceList:
    """A user's devices at one ``counter`` value. Immutable; changes make a new list.

    Construction validates everything (InvalidArgument on local misuse);
    :meth:`SignedDeviceList.decode` validates network input before it gets here.
    """

    user_id: str
    user_identity: bytes
    counter: int
    devices: tuple[DeviceEntry, ...]

    def __post_init__(self) -> None:
        # A stored list names a user as it was when stored (check_user_id):
        # the full rule is checked where a user id comes in, from the app
        # (DeviceEntry.prove, the client API) or from a peer (the decoders).
        check_user_id(self.user_id, stored=True)
        check_identity_key(self.user_identity)
        if (
            isinstance(self.counter, bool)
            or not isinstance(self.counter, int)
            or not 0 <= self.counter <= UINT64_MAX
        ):
            raise InvalidArgument("a device list counter is an integer from 0 to 2**64-1")
        if not isinstance(self.devices, tuple) or not all(
            isinstance(d, DeviceEntry) for d in self.devices
        ):
            raise InvalidArgument("devices is a tuple of DeviceEntry")
        _check_device_order([d.device_id for d in self.devices], InvalidArgument)
        _check_distinct_keys(self.devices, InvalidArgument)

    @classmethod
    def initial(
        cls, user_id: str, user_identity: bytes, devices: Iterable[DeviceEntry]
    ) -> DeviceList:
        """A user's first list (counter 0); ``devices`` in any order."""
        return cls(user_id, user_identity, 0, _sorted(devices))

    # ---------------------------------------------------------------- queries

    @property
    def device_ids(self) -> tuple[int, ...]:
        return tuple(d.device_id for d in self.devices)

    def device(self, device_id: int) -> DeviceEntry | None:
        """The entry with this id, or None."""
        for entry in self.devices:
            if entry.device_id == device_id:
                return entry
        return None

    # ---------------------------------------------------------------- changes

    def _next(self, devices: Iterable[DeviceEntry]) -> DeviceList:
        if self.counter >= UINT64_MAX:
            raise InvalidState("device list counter exhausted")
        return DeviceList(self.user_id, self.user_identity, self.counter + 1, _sorted(devices))

    def with_device(self, entry: DeviceEntry) -> DeviceList:
        """The next list (counter + 1) with ``entry`` added; its id must be new."""
        if self.device(entry.device_id) is not None:
            raise InvalidArgument(f"device {entry.device_id} is already listed")
        return self._next((*self.devices, entry))

    def without_device(self, device_id: int) -> DeviceList:
        """The next list (counter + 1) without ``device_id``; the last device cannot go."""
        if self.device(device_id) is None:
            raise InvalidArgument(f"device {device_id} is not listed")
        return self._next(d for d in self.devices if d.device_id != device_id)

    # ---------------------------------------------------------------- encoding

    def encode_body(self) -> bytes:
        """The canonical body bytes the user identity signs."""
        return pack(
            [
                PROTOCOL_VERSION,
                self.user_id,
                self.user_identity,
                self.counter,
                [d.to_wire() for d in self.devices],
            ]
        )

    def sign(self, user_identity: IdentityKeyPair) -> SignedDeviceList:
        """Sign this list with the user identity key pair it names.

        Every device must have proved it belongs to this user (InvalidArgument
        otherwise): peers and the relay refuse a list naming a device without.
        """
        if user_identity.public.ed25519 != self.user_identity:
            raise InvalidArgument("signing key is not this list's user identity")
        for entry in self.devices:
            try:
                entry.verify_proof(self.user_id, self.user_identity)
            except BadDeviceProof:
                raise InvalidArgument(
                    f"device {entry.device_id} did not prove it belongs to {self.user_id!r}"
                ) from None
        body = self.encode_body()
        signature = user_identity.sign(DEVICE_LIST_SIGNATURE_CONTEXT + body)
        return SignedDeviceList(body, signature, self)


@dataclass(frozen=True, slots=True)
class SignedDeviceList:
    """A device list with its user identity's signature, as sent on the wire.

    Obtain one from :meth:`DeviceList.sign` or :meth:`decode` (which verifies).
    """

    body: bytes
    signature: bytes
    device_list: DeviceList

    def __post_init__(self) -> None:
        if not isinstance(self.device_list, DeviceList):
            raise InvalidArgument("device_list is a DeviceList")
        if self.body != self.device_list.encode_body():
            raise InvalidArgument("body is not the encoding of device_list")
        if not isinstance(self.signature, bytes) or len(self.signature) != ED25519_SIGNATURE_SIZE:
            raise InvalidArgument("a signature is 64 bytes")

    def encode(self) -> bytes:
        return pack([self.body, self.signature])

    @classmethod
    def decode(cls, data: bytes, *, stored: bool = False) -> SignedDeviceList:
        """Decode and verify a signed list (``stored``: one this device stored itself,
        whose user id is held to the size rule only: :func:`check_user_id`).

        Raises DecodeError (malformed, non-canonical, devices out of order),
        UnknownVersion, InvalidKey (an identity that is not a valid key),
        DuplicateDeviceKey (one device key under two ids), BadSignature (not
        signed by the user identity in the body) or BadDeviceProof (a device
        that did not prove it belongs to this user).
        """
        outer = Fields.decode(data, what="signed device list", count=2)
        body = outer.bin()
        signature = outer.bin(ED25519_SIGNATURE_SIZE)
        outer.end()
        device_list = _decode_body(body, stored=stored)
        PublicIdentity.from_bytes(device_list.user_identity).verify(
            signature, DEVICE_LIST_SIGNATURE_CONTEXT + body
        )
        for entry in device_list.devices:
            entry.verify_proof(device_list.user_id, device_list.user_identity)
        return cls(body, signature, device_list)

    def __repr__(self) -> str:
        dl = self.device_list
        return f"SignedDeviceList({dl.user_id!r}, counter={dl.counter}, devices={dl.device_ids})"


def _decode_body(body: bytes, *, stored: bool) -> DeviceList:
    fields = Fields.decode(body, what="device list body", count=5)
    version = fields.uint()
    if version != PROTOCOL_VERSION:
        raise UnknownVersion(f"device list version {version}")
    user_id = read_user_id(fields, stored=stored)
    user_identity = fields.bin(ED25519_KEY_SIZE)
    check_identity_key(user_identity, InvalidKey)
    counter = fields.uint(UINT64_MAX)
    raw_devices = fields.array(max_len=MAX_DEVICES_PER_USER)
    fields.end()
    devices = []
    for index, raw in enumerate(raw_devices):
        entry = Fields(raw, what=f"device list body.devices[{index}]", count=3)
        device_id = entry.uint()
        identity = entry.bin(ED25519_KEY_SIZE)
        proof = entry.bin(ED25519_SIGNATURE_SIZE)
        entry.end()
        check_identity_key(identity, InvalidKey)
        devices.append(DeviceEntry(device_id, identity, proof))
    _check_device_order([d.device_id for d in devices], DecodeError)
    _check_distinct_keys(devices, DuplicateDeviceKey)
    return DeviceList(user_id, user_identity, counter, tuple(devices))


def _sorted(devices: Iterable[DeviceEntry]) -> tuple[DeviceEntry, ...]:
    return tuple(sorted(devices, key=lambda d: d.device_id))


def _check_device_order(ids: list[int], error: type[ProtocolError]) -> None:
    if not 1 <= len(ids) <= MAX_DEVICES_PER_USER:
        raise error(f"a device list has 1 to {MAX_DEVICES_PER_USER} devices")
    if any(a >= b for a, b in pairwise(ids)):
        raise error("device ids must be unique and in increasing order")


def _check_distinct_keys(devices: Iterable[DeviceEntry], error: type[ProtocolError]) -> None:
    identities = [d.identity for d in devices]
    if len(set(identities)) != len(identities):
        raise error("a device key is listed under two device ids")


class ListHead(Protocol):
    """What the update rule compares: any held list (a DeviceList, or a relay's stored copy)."""

    @property
    def user_id(self) -> str: ...

    @property
    def user_identity(self) -> bytes: ...

    @property
    def counter(self) -> int: ...


def check_update(old: ListHead | None, new: ListHead) -> None:
    """Check that ``new`` may replace ``old`` (None: the first list seen for the user).

    Raises UnauthorizedChange if the user id differs (a list for someone
    else), UntrustedIdentity if the user identity differs (the app must have
    the user confirm the new identity, then pass ``old=None``), and
    StaleChange unless ``new.counter > old.counter`` (a replayed or rolled
    back list; a duplicate of the held list is StaleChange too).
    """
    if old is None:
        return
    if new.user_id != old.user_id:
        raise UnauthorizedChange("device list is for another user")
    if new.user_identity != old.user_identity:
        raise UntrustedIdentity("device list is signed by a different user identity")
    if new.counter <= old.counter:
        raise StaleChange(f"device list counter {new.counter} is not above {old.counter}")


def device_changes(old: DeviceList | None, new: DeviceList) -> DeviceChanges:
    """The devices added and removed from ``old`` (None: no devices) to ``new``."""
    before = set(old.devices) if old is not None else set()
    after = set(new.devices)
    return DeviceChanges(
        added=_sorted(after - before),
        removed=_sorted(before - after),
    )


def check_device_keys(new: DeviceList, held: Iterable[DeviceList]) -> None:
    """Refuse ``new`` if it names a device key that ``held`` lists of other users name.

    A device key belongs to one user: its proof names that user, and a
    session with it binds that user (spec/02-pqxdh.md). The same key under
    two users means one of the lists (or the device) lies, and the receiver
    cannot tell which: DuplicateDeviceKey, keeping what it holds.
    """
    keys = {d.identity for d in new.devices}
    for other in held:
        if other.user_id != new.user_id and any(d.identity in keys for d in other.devices):
            raise DuplicateDeviceKey(f"a device of {new.user_id!r} is listed under another user")
