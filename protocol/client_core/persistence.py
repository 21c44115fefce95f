"""A ClientCore's records: serialized from, and loaded into, its :class:`CoreState`.

Every change marks the records it touched; :func:`take_changes` hands them
over serialized (``None`` means delete), so the caller can write them in one
transaction before it acknowledges the envelope that caused them.
:func:`read_meta` and :func:`load_records` rebuild the state from them.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..consts import (
    GROUP_ID_SIZE,
    MAX_HELD_GROUP_CONTROLS,
    MAX_LEFT_GROUPS,
    MAX_USER_ID_SIZE,
    STATE_VERSION,
)
from ..content import GroupControl
from ..devices import SignedDeviceList
from ..encoding import Fields, pack
from ..errors import DecodeError, StateError
from ..group import Group
from ..group_cipher import OutboundSenderKey, SenderKeyRecord
from ..pickles import load_pickle
from ..session import SessionRecord
from .events import Address
from .records import RecordKey
from .state import CoreState, Outbound


def take_changes(state: CoreState) -> dict[RecordKey, bytes | None]:
    """Serialized records changed since the last call (None: delete the record)."""
    out = {key: serialize(state, key) for key in state.changed}
    state.changed = set()
    return out


def read_meta(records: Mapping[RecordKey, bytes]) -> tuple[str, int, bytes, bytes | None, bytes]:
    """User id, device id, user identity (public, private seed or None) and account pickle."""
    meta = records.get(("meta",))
    account = records.get(("account",))
    if meta is None or account is None:
        raise StateError("client state: meta or account record missing")

    def read(f: Fields) -> tuple[str, int, bytes, bytes | None]:
        return f.text(MAX_USER_ID_SIZE), f.uint(), f.bin(32), f.optional_bin(32)

    user_id, device_id, user_public, seed = load_pickle(meta, "client meta", read)
    return user_id, device_id, user_public, seed, account


def _read_address(value: object, what: str) -> Address:
    f = Fields(value, what=what, count=2)
    return Address(f.text(MAX_USER_ID_SIZE), f.uint())


def _key_bytes(part: str | int | bytes) -> bytes:
    if not isinstance(part, bytes):
        raise StateError("record key: expected bytes")
    return part


def _key_str(part: str | int | bytes) -> str:
    if not isinstance(part, str):
        raise StateError("record key: expected a string")
    return part


def _key_int(part: str | int | bytes) -> int:
    if not isinstance(part, int):
        raise StateError("record key: expected an integer")
    return part


def serialize(state: CoreState, key: RecordKey) -> bytes | None:
    """The record ``key`` as the state holds it now; None if it holds none."""
    kind = key[0]
    if kind == "meta":
        seed = None if state.user_identity is None else state.user_identity.seed
        return pack(
            [STATE_VERSION, state.user_id, state.device_id, state.user_identity_public, seed]
        )
    if kind == "account":
        return state.account.to_bytes()
    if kind == "devices":
        held = state.device_lists.get(_key_str(key[1]))
        return None if held is None else held.encode()
    if kind == "pending_identity":
        pending = state.pending_identity.get(_key_str(key[1]))
        return None if pending is None else pending.encode()
    if kind == "session":
        record = state.sessions.get(Address(_key_str(key[1]), _key_int(key[2])))
        return None if record is None else record.to_bytes()
    if kind == "outbound":
        outbound = state.outbound.get(_key_bytes(key[1]))
        if outbound is None:
            return None
        shared = [[a.user_id, a.device_id] for a in sorted(outbound.shared_with)]
        return pack([STATE_VERSION, outbound.key.to_bytes(), shared])
    if kind == "inbound":
        inbound = state.inbound.get(
            (_key_bytes(key[1]), Address(_key_str(key[2]), _key_int(key[3])))
        )
        return None if inbound is None else inbound.to_bytes()
    if kind == "group":
        group = state.groups.get(_key_bytes(key[1]))
        return None if group is None else group.to_bytes()
    if kind == "left_groups":
        return pack([STATE_VERSION, state.left]) if state.left else None
    if kind == "held_controls":
        if not state.held:
            return None
        entries = [[a.user_id, a.device_id, c.control, c.snapshot] for a, c in state.held]
        return pack([STATE_VERSION, entries])
    raise AssertionError(f"unknown record kind {kind!r}")


def load_records(state: CoreState, records: Mapping[RecordKey, bytes]) -> None:
    """Load every record but meta and account (which built ``state``) into it."""
    for key, data in records.items():
        _load_record(state, key, data)
    state.changed = set()


def _load_record(state: CoreState, key: RecordKey, data: bytes) -> None:
    kind = key[0]
    if kind == "devices":
        signed = SignedDeviceList.decode(data)
        state.device_lists[signed.device_list.user_id] = signed
    elif kind == "pending_identity":
        signed = SignedDeviceList.decode(data)
        state.pending_identity[signed.device_list.user_id] = signed
    elif kind == "session":
        state.sessions[Address(_key_str(key[1]), _key_int(key[2]))] = SessionRecord.from_bytes(data)
    elif kind == "outbound":

        def read_outbound(f: Fields) -> Outbound:
            sender_key = OutboundSenderKey.from_bytes(f.bin())
            shared = {_read_address(a, "outbound shared") for a in f.array(max_len=100_000)}
            return Outbound(sender_key, shared)

        state.outbound[_key_bytes(key[1])] = load_pickle(data, "outbound", read_outbound)
    elif kind == "inbound":
        address = Address(_key_str(key[2]), _key_int(key[3]))
        state.inbound[(_key_bytes(key[1]), address)] = SenderKeyRecord.from_bytes(data)
    elif kind == "group":
        group = Group.from_bytes(data)
        state.groups[group.group_id] = group
    elif kind == "left_groups":

        def read_left(f: Fields) -> list[bytes]:
            left = f.array(max_len=MAX_LEFT_GROUPS)
            if not all(isinstance(g, bytes) and len(g) == GROUP_ID_SIZE for g in left):
                raise DecodeError("left groups: not a group id")
            return left

        state.left.extend(load_pickle(data, "left groups", read_left))
    elif kind == "held_controls":

        def read_held(f: Fields) -> list[tuple[Address, GroupControl]]:
            held = []
            for item in f.array(max_len=MAX_HELD_GROUP_CONTROLS):
                entry = Fields(item, what="held control", count=4)
                sender = Address(entry.text(MAX_USER_ID_SIZE), entry.uint())
                held.append((sender, GroupControl(entry.bin(), entry.optional_bin())))
            return held

        state.held.extend(load_pickle(data, "held controls", read_held))
