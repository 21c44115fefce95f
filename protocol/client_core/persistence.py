"""A ClientCore's records: serialized from, and loaded into, its :class:`CoreState`.

Every change marks the records it touched; :func:`take_changes` hands them
over serialized (``None`` means delete), so the caller can write them in one
transaction before it acknowledges the envelope that caused them.
:func:`read_meta` and :func:`load_records` rebuild the state from them.

Each record kind has a writer (what the state holds under a key, or None)
and, but for the two records that build the state itself (meta and
account), a reader; every record is a versioned pickle (:mod:`..pickles`)
or a structure with its own encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..consts import (
    CHANGE_RECEIPT_SIZE,
    GROUP_ID_SIZE,
    MAX_HELD_GROUP_CONTROLS,
    MAX_LEFT_GROUPS,
    STATE_VERSION,
)
from ..content import GroupControl
from ..devices import SignedDeviceList, read_user_id
from ..encoding import Fields, pack
from ..errors import DecodeError, ProtocolError, StateError
from ..group import ControlMessage, Group
from ..group_cipher import OutboundSenderKey, SenderKeyRecord
from ..pickles import load_pickle
from ..session import SessionRecord
from ..split_detection import PeerClaims
from .events import Address
from .records import RecordKey, RecordKind
from .state import CoreState, Outbound, PendingChange

# Most devices an outbound record may list as holding our key: far above a
# group's devices (members times devices per user), so only a corrupt record
# reaches it.
_MAX_SHARED_WITH = 100_000


def take_changes(state: CoreState) -> dict[RecordKey, bytes | None]:
    """Serialized records changed since the last call (None: delete the record)."""
    out = {key: serialize(state, key) for key in state.changed}
    state.changed = set()
    return out


def serialize(state: CoreState, key: RecordKey) -> bytes | None:
    """The record ``key`` as the state holds it now; None if it holds none."""
    write = _WRITERS.get(key.kind)
    if write is None:
        raise AssertionError(f"a ClientCore keeps no {key.kind.value} record")
    return write(state, key)


def read_meta(records: Mapping[RecordKey, bytes]) -> tuple[str, int, bytes, bytes | None, bytes]:
    """User id, device id, user identity (public, private seed or None) and account pickle."""
    meta = records.get(RecordKey.META)
    account = records.get(RecordKey.ACCOUNT)
    if meta is None or account is None:
        raise StateError("client state: meta or account record missing")

    def read(f: Fields) -> tuple[str, int, bytes, bytes | None]:
        return read_user_id(f, stored=True), f.uint(), f.bin(32), f.optional_bin(32)

    user_id, device_id, user_public, seed = load_pickle(meta, "client meta", read)
    return user_id, device_id, user_public, seed, account


def load_records(
    state: CoreState, records: Mapping[RecordKey, bytes], *, skip_corrupt: bool = False
) -> dict[RecordKey, str]:
    """Load every record into a state built from meta and account; ignore the client's own.

    With ``skip_corrupt``, a record that does not load is left out (each
    reader changes the state only once its record decoded) and returned with
    its error code; otherwise its ProtocolError is raised.
    """
    skipped: dict[RecordKey, str] = {}
    for key, data in records.items():
        read = _READERS.get(key.kind)
        if read is None:
            continue
        try:
            read(state, key, data)
        except ProtocolError as exc:
            if not skip_corrupt:
                raise
            skipped[key] = exc.code if isinstance(exc, StateError) else StateError.code
    state.changed = set()
    return skipped


# ------------------------------------------------------------------ one function per kind
# A key's parts are present as its kind requires (RecordKey checks it): the
# asserts below only tell the type checker.


def _write_meta(state: CoreState, key: RecordKey) -> bytes:
    seed = None if state.user_identity is None else state.user_identity.seed
    return pack([STATE_VERSION, state.user_id, state.device_id, state.user_identity_public, seed])


def _write_account(state: CoreState, key: RecordKey) -> bytes:
    return state.account.to_bytes()


def _write_devices(state: CoreState, key: RecordKey) -> bytes | None:
    assert key.user_id is not None
    held = state.device_lists.get(key.user_id)
    return None if held is None else held.encode()


def _read_devices(state: CoreState, key: RecordKey, data: bytes) -> None:
    signed = SignedDeviceList.decode(data, stored=True)
    state.device_lists[signed.device_list.user_id] = signed


def _write_pending_identity(state: CoreState, key: RecordKey) -> bytes | None:
    assert key.user_id is not None
    pending = state.pending_identity.get(key.user_id)
    return None if pending is None else pending.encode()


def _read_pending_identity(state: CoreState, key: RecordKey, data: bytes) -> None:
    signed = SignedDeviceList.decode(data, stored=True)
    state.pending_identity[signed.device_list.user_id] = signed


def _write_session(state: CoreState, key: RecordKey) -> bytes | None:
    assert key.address is not None
    record = state.sessions.get(key.address)
    return None if record is None else record.to_bytes()


def _read_session(state: CoreState, key: RecordKey, data: bytes) -> None:
    assert key.address is not None
    state.sessions[key.address] = SessionRecord.from_bytes(data)


def _write_outbound(state: CoreState, key: RecordKey) -> bytes | None:
    assert key.group_id is not None
    outbound = state.outbound.get(key.group_id)
    if outbound is None:
        return None
    shared = [[a.user_id, a.device_id] for a in sorted(outbound.shared_with)]
    return pack([STATE_VERSION, outbound.key.to_bytes(), shared])


def _read_outbound(state: CoreState, key: RecordKey, data: bytes) -> None:
    assert key.group_id is not None

    def read(f: Fields) -> Outbound:
        sender_key = OutboundSenderKey.from_bytes(f.bin())
        shared = set()
        for item in f.array(max_len=_MAX_SHARED_WITH):
            address = Fields(item, what="outbound shared", count=2)
            shared.add(Address(read_user_id(address, stored=True), address.uint()))
        return Outbound(sender_key, shared)

    state.outbound[key.group_id] = load_pickle(data, "outbound", read)


def _write_inbound(state: CoreState, key: RecordKey) -> bytes | None:
    assert key.group_id is not None and key.address is not None
    inbound = state.inbound.get((key.group_id, key.address))
    return None if inbound is None else inbound.to_bytes()


def _read_inbound(state: CoreState, key: RecordKey, data: bytes) -> None:
    assert key.group_id is not None and key.address is not None
    state.inbound.restore(key.group_id, key.address, SenderKeyRecord.from_bytes(data))


def _write_group(state: CoreState, key: RecordKey) -> bytes | None:
    assert key.group_id is not None
    group = state.groups.get(key.group_id)
    return None if group is None else group.to_bytes()


def _read_group(state: CoreState, key: RecordKey, data: bytes) -> None:
    group = Group.from_bytes(data)
    state.groups[group.group_id] = group


def _write_claims(state: CoreState, key: RecordKey) -> bytes | None:
    assert key.group_id is not None
    claims = state.claims.get(key.group_id)
    return None if claims is None else claims.to_bytes()


def _read_claims(state: CoreState, key: RecordKey, data: bytes) -> None:
    assert key.group_id is not None
    state.claims[key.group_id] = PeerClaims.from_bytes(data)


def _write_left_groups(state: CoreState, key: RecordKey) -> bytes | None:
    return pack([STATE_VERSION, state.left]) if state.left else None


def _read_left_groups(state: CoreState, key: RecordKey, data: bytes) -> None:
    def read(f: Fields) -> list[bytes]:
        left = f.array(max_len=MAX_LEFT_GROUPS)
        if not all(isinstance(g, bytes) and len(g) == GROUP_ID_SIZE for g in left):
            raise DecodeError("left groups: not a group id")
        return left

    state.left.extend(load_pickle(data, "left groups", read))


def _write_held_controls(state: CoreState, key: RecordKey) -> bytes | None:
    if not state.held:
        return None
    entries = [[a.user_id, a.device_id, c.control, c.snapshot] for a, c in state.held]
    return pack([STATE_VERSION, entries])


def _read_held_controls(state: CoreState, key: RecordKey, data: bytes) -> None:
    def read(f: Fields) -> list[tuple[Address, GroupControl]]:
        held = []
        for item in f.array(max_len=MAX_HELD_GROUP_CONTROLS):
            entry = Fields(item, what="held control", count=4)
            sender = Address(read_user_id(entry, stored=True), entry.uint())
            held.append((sender, GroupControl(entry.bin(), entry.optional_bin())))
        return held

    state.held.extend(load_pickle(data, "held controls", read))


def _write_pending_change(state: CoreState, key: RecordKey) -> bytes | None:
    assert key.group_id is not None
    pending = state.pending.get(key.group_id)
    if pending is None:
        return None
    return pack([STATE_VERSION, pending.receipt, pending.message.encode()])


def _read_pending_change(state: CoreState, key: RecordKey, data: bytes) -> None:
    assert key.group_id is not None

    def read(f: Fields) -> PendingChange:
        return PendingChange(
            f.optional_bin(CHANGE_RECEIPT_SIZE), ControlMessage.decode(f.bin(), stored=True)
        )

    pending = load_pickle(data, "pending change", read)
    if pending.message.group_id != key.group_id:
        raise StateError("pending change: for another group than its key names")
    state.pending[key.group_id] = pending


_WRITERS: dict[RecordKind, Callable[[CoreState, RecordKey], bytes | None]] = {
    RecordKind.META: _write_meta,
    RecordKind.ACCOUNT: _write_account,
    RecordKind.DEVICES: _write_devices,
    RecordKind.PENDING_IDENTITY: _write_pending_identity,
    RecordKind.SESSION: _write_session,
    RecordKind.OUTBOUND: _write_outbound,
    RecordKind.INBOUND: _write_inbound,
    RecordKind.GROUP: _write_group,
    RecordKind.CLAIMS: _write_claims,
    RecordKind.LEFT_GROUPS: _write_left_groups,
    RecordKind.HELD_CONTROLS: _write_held_controls,
    RecordKind.PENDING_CHANGE: _write_pending_change,
}
_READERS: dict[RecordKind, Callable[[CoreState, RecordKey, bytes], None]] = {
    RecordKind.DEVICES: _read_devices,
    RecordKind.PENDING_IDENTITY: _read_pending_identity,
    RecordKind.SESSION: _read_session,
    RecordKind.OUTBOUND: _read_outbound,
    RecordKind.INBOUND: _read_inbound,
    RecordKind.GROUP: _read_group,
    RecordKind.CLAIMS: _read_claims,
    RecordKind.LEFT_GROUPS: _read_left_groups,
    RecordKind.HELD_CONTROLS: _read_held_controls,
    RecordKind.PENDING_CHANGE: _read_pending_change,
}
