"""The keys of the records a device persists: a kind and what names one record of it.

A key is stored as the canonical msgpack array of its kind's name followed by
its parts in a fixed order, for example ``["session", user_id, device_id]``
or ``["inbound", group_id, user_id, device_id]`` (spec/README.md, "Client
storage").
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from ..consts import GROUP_ID_SIZE
from ..devices import read_user_id
from ..encoding import Fields, pack
from ..errors import DecodeError, InvalidArgument, StateError
from .events import Address


class RecordKind(Enum):
    """What a record holds; the value is the name its stored key starts with."""

    META = "meta"  # user and device ids, the user identity
    ACCOUNT = "account"  # this device's identity and prekeys
    DEVICES = "devices"  # one user's signed device list
    PENDING_IDENTITY = "pending_identity"  # a user's list under a changed identity
    SESSION = "session"  # the sessions with one device
    OUTBOUND = "outbound"  # our sender key in one group
    INBOUND = "inbound"  # one device's sender keys in one group
    GROUP = "group"  # one group's recent states
    CLAIMS = "claims"  # the group states one group's member devices claimed, still to judge
    LEFT_GROUPS = "left_groups"
    HELD_CONTROLS = "held_controls"
    PENDING_CHANGE = "pending_change"  # our change in one group, awaiting its receipt
    # Kept beside the core's records by the client that embeds it; the core
    # never writes them and ignores them when it loads.
    PUBLISHED_PREKEYS = "published_prekeys"
    REGISTERED_DEVICE_LIST = "registered_device_list"
    SYNCED = "synced"


# What names one record of each kind, in stored order (kinds not listed: nothing,
# a single record).
_PARTS: dict[RecordKind, tuple[str, ...]] = {
    RecordKind.DEVICES: ("user_id",),
    RecordKind.PENDING_IDENTITY: ("user_id",),
    RecordKind.SESSION: ("address",),
    RecordKind.OUTBOUND: ("group_id",),
    RecordKind.INBOUND: ("group_id", "address"),
    RecordKind.GROUP: ("group_id",),
    RecordKind.PENDING_CHANGE: ("group_id",),
    RecordKind.CLAIMS: ("group_id",),
}


@dataclass(frozen=True, slots=True)
class RecordKey:
    """One record: its kind, and the user, group or device it is about if the kind has many."""

    kind: RecordKind
    user_id: str | None = None
    group_id: bytes | None = None
    address: Address | None = None

    META: ClassVar[RecordKey]
    ACCOUNT: ClassVar[RecordKey]
    LEFT_GROUPS: ClassVar[RecordKey]
    HELD_CONTROLS: ClassVar[RecordKey]
    PUBLISHED_PREKEYS: ClassVar[RecordKey]
    REGISTERED_DEVICE_LIST: ClassVar[RecordKey]
    SYNCED: ClassVar[RecordKey]

    def __post_init__(self) -> None:
        named = {
            part for part in ("user_id", "group_id", "address") if getattr(self, part) is not None
        }
        parts = _PARTS.get(self.kind, ())
        if named != set(parts):
            needs = " and ".join(parts) or "nothing else"
            raise InvalidArgument(f"a record key of kind {self.kind.value} names {needs}")

    @classmethod
    def devices(cls, user_id: str) -> RecordKey:
        return cls(RecordKind.DEVICES, user_id=user_id)

    @classmethod
    def pending_identity(cls, user_id: str) -> RecordKey:
        return cls(RecordKind.PENDING_IDENTITY, user_id=user_id)

    @classmethod
    def session(cls, address: Address) -> RecordKey:
        return cls(RecordKind.SESSION, address=address)

    @classmethod
    def outbound(cls, group_id: bytes) -> RecordKey:
        return cls(RecordKind.OUTBOUND, group_id=group_id)

    @classmethod
    def inbound(cls, group_id: bytes, address: Address) -> RecordKey:
        return cls(RecordKind.INBOUND, group_id=group_id, address=address)

    @classmethod
    def group(cls, group_id: bytes) -> RecordKey:
        return cls(RecordKind.GROUP, group_id=group_id)

    @classmethod
    def pending_change(cls, group_id: bytes) -> RecordKey:
        return cls(RecordKind.PENDING_CHANGE, group_id=group_id)

    @classmethod
    def claims(cls, group_id: bytes) -> RecordKey:
        return cls(RecordKind.CLAIMS, group_id=group_id)

    def __lt__(self, other: RecordKey) -> bool:
        """Keys sort as their stored forms do."""
        return self.encode() < other.encode()

    def encode(self) -> bytes:
        """The stored form: ``[kind name, parts...]``, canonical msgpack."""
        fields: list[str | int | bytes] = [self.kind.value]
        # Every kind's parts come in this order (_PARTS).
        if self.group_id is not None:
            fields.append(self.group_id)
        if self.user_id is not None:
            fields.append(self.user_id)
        if self.address is not None:
            fields += [self.address.user_id, self.address.device_id]
        return pack(fields)

    @classmethod
    def decode(cls, data: bytes) -> RecordKey:
        """Inverse of :meth:`encode`; StateError for anything else."""
        user_id = group_id = address = None
        try:
            f = Fields.decode(data, what="record key")
            name = f.text()
            try:
                kind = RecordKind(name)
            except ValueError:
                raise DecodeError(f"record key: unknown kind {name!r}") from None
            for part in _PARTS.get(kind, ()):
                if part == "user_id":
                    user_id = read_user_id(f, stored=True)
                elif part == "group_id":
                    group_id = f.bin(GROUP_ID_SIZE)
                else:
                    address = Address(read_user_id(f, stored=True), f.uint())
            f.end()
        except DecodeError as exc:
            raise StateError(f"corrupt record key ({exc.message})") from exc
        return cls(kind, user_id, group_id, address)


RecordKey.META = RecordKey(RecordKind.META)
RecordKey.ACCOUNT = RecordKey(RecordKind.ACCOUNT)
RecordKey.LEFT_GROUPS = RecordKey(RecordKind.LEFT_GROUPS)
RecordKey.HELD_CONTROLS = RecordKey(RecordKind.HELD_CONTROLS)
RecordKey.PUBLISHED_PREKEYS = RecordKey(RecordKind.PUBLISHED_PREKEYS)
RecordKey.REGISTERED_DEVICE_LIST = RecordKey(RecordKind.REGISTERED_DEVICE_LIST)
RecordKey.SYNCED = RecordKey(RecordKind.SYNCED)
