"""Group membership that only members can change.

A group's state (its id, members with their user identities, admins, title,
epoch and a hash chain over its history) changes only through *control
messages*. An admin's device signs each one (a member may sign its own
leave); every member applies it only if it verifies against the state that
member holds, and only on that state. Control messages travel inside the
encryption (1:1 sessions), but their authority comes from the signature
alone, so a relay that drops, delays, duplicates or reorders them cannot add
a member ("ghost member"), remove one, or bring back a removed one: it can
only withhold changes, or split members into branches that they detect
(see Sequencing).

Devices are not part of the group state. A member's devices are those of the
member's :class:`~hushchat.protocol.devices.SignedDeviceList` (signed by the user
identity the group state records), which the caller holds and passes in as a
*device directory* (a mapping, or a callable, from user id to signed list).
So neither an admin nor the relay can slip a device into a group.

State (``GroupState``; one snapshot)
------------------------------------
Canonical msgpack array (spec/00-conventions.md)::

    snapshot = [version: uint (= PROTOCOL_VERSION),
                group_id: bin(16),
                epoch: uint64,                 # 0 at creation, +1 per change
                prev_hash: bin(32),            # state_hash of the parent; 32 zero bytes at epoch 0
                change_id: bin(32),            # id of the control message that made this state
                title: str (0..MAX_GROUP_TITLE_SIZE bytes),
                members: [[user_id: str, user_identity: bin(32), admin: bool], ...]]
    state_hash = SHA-256(GROUP_STATE_HASH_CONTEXT || snapshot)

``members`` has 1..MAX_GROUP_MEMBERS entries in strictly increasing order of
the user id's UTF-8 bytes, and at least one is an admin. ``epoch == 0`` if
and only if ``prev_hash`` is all zero. As ``state_hash`` covers ``prev_hash``
and ``change_id``, it commits to the whole history of changes.

Control message
---------------
::

    ControlMessage = [body: bin, signature: bin(64)]
    body = pack([version: uint (= GROUP_VERSION), group_id: bin(16),
                 parent_epoch: uint64, parent_hash: bin(32),
                 author_user_id: str, author_device_id: uint32,
                 action: uint, args: array])
    signature = Ed25519(author device identity, GROUP_CONTROL_SIGNATURE_CONTEXT || body)
    change_id = SHA-256(GROUP_CHANGE_ID_CONTEXT || body)

==  ==============  ======================================================  ======
#   action          args                                                    author
==  ==============  ======================================================  ======
0   create          [title: str, [[user_id, user_identity: bin(32)], ...],  anyone
                    replaces: [group_id, epoch, state_hash] | nil]
1   add_member      [user_id, user_identity: bin(32)]                       admin
2   remove_member   [user_id]                                               admin
3   leave           []                                                      member
4   set_admin       [user_id, admin: bool]                                  admin
5   set_title       [title: str]                                            admin
==  ==============  ======================================================  ======

``create`` names the *other* initial members (strictly increasing user ids,
not the author, at most MAX_GROUP_MEMBERS - 1); its parent is epoch 0 and
32 zero bytes, and it makes the genesis state (epoch 0) in which the author
is the only admin. A create whose ``replaces`` names another group is a
*reinit*: the new group continues that one (see Sequencing). Every other
action makes the child of its parent at ``parent_epoch + 1``.

Apply rules
-----------
A member holds the current state of a group and up to MAX_GROUP_HISTORY of
its ancestors (``Group``). It applies a change only as a child of its
*current* state, never on an ancestor: members never switch to another
branch, so no author can discard a change by choosing its own fields (a
smaller change id, in protocol version 1). Checks, in this order; the first
failing one decides the error, and nothing changes on failure (``Group`` is
immutable; :meth:`Group.apply` returns a new one):

1. ``group_id`` is this group's, else UNAUTHORIZED_CHANGE.
2. The author's signed device list is in the directory, is for
   ``author_user_id``, and lists ``author_device_id``, else
   UNAUTHORIZED_CHANGE; the signature verifies under that device's identity,
   else BAD_SIGNATURE. (Signature first: no state is consulted for an
   unauthenticated message.)
3. ``change_id`` is not one of the held states' change ids, else
   DUPLICATE_MESSAGE. A ``create`` for an existing group is UNAUTHORIZED_CHANGE.
4. ``(parent_epoch, parent_hash)`` is the current state's ``(epoch,
   state_hash)``, else STALE_CHANGE: a change that builds ahead (its parent
   epoch is above the current one) may apply once the changes before it
   arrive, and the caller holds it; any other lost a race for its epoch, or
   is on another branch, and never applies.
5. The author is a member of the current state whose recorded user
   identity equals the device list's (else UNAUTHORIZED_CHANGE, or
   UNTRUSTED_IDENTITY when the identities differ), and an admin unless the
   action is ``leave`` (else UNAUTHORIZED_CHANGE). So a user removed from
   the group authors nothing that takes effect.
6. The action is valid on the current state, else UNAUTHORIZED_CHANGE:
   add_member: not yet a member, and the group is not full; remove_member: a
   member other than the author (who uses leave); leave: at least one member
   and one admin remain; set_admin: a member whose flag differs, and at least
   one admin remains; set_title: a different title.

On success the new state is appended (the oldest beyond MAX_GROUP_HISTORY
ancestors is forgotten) and the events describe the change. Any admin may
remove or demote any other admin, by a change every member sees; a removal
is undone only by an admin adding the user again.

Sequencing
----------
Two changes made on the same state (two admins at once) cannot both apply:
each member applies the first valid one it receives and refuses the other
as stale (RFC 9420, section 14: "Applications MUST have an established way
to resolve conflicting Commit messages for the same epoch"). Members agree
because the relay delivers every change of a group to all its member devices
in one order (a change goes out in one relay send; spec/07-relay-protocol.md,
SEND_CHANGE), and a member judges a change against its parent alone. An
author does not apply its own change when it signs it (:meth:`Group.propose`
leaves the group as it is; RFC 9420: "The generation of Commit messages MUST
NOT modify a client's state"): it applies it when the relay's receipt shows
where the change stands in that order, unless a rival came first; then it
proposes again on the new state.

A relay can still withhold changes from some members or deliver them in
different orders to different members, splitting the group into branches.
It cannot make a member apply a change it did not see, nor anyone rewind a
state. :meth:`Group.relation` tells where another member's ``(epoch,
state_hash)`` (carried by every group message) stands against ours, so a
split is detected at the next message instead of going unnoticed. The way
back to one state is a *reinit* (as in MLS): an admin creates a new group
whose create names the old one (``CreateGroup.replaces``) with the members
it holds; each member that holds the old group and holds the author as an
admin of it moves to the new one and leaves the old.

Joining
-------
A new member receives a *welcome* (inside its 1:1 sessions)::

    Welcome = [version: uint (= GROUP_VERSION), message: bin (ControlMessage),
               history: [snapshot: bin, ...]]

For a ``create`` message ``history`` is empty. For an ``add_member`` adding
the joiner, ``history`` holds the state the add was made on (last) and as
many of its ancestors (oldest first, at most MAX_GROUP_HISTORY + 1
snapshots in all) as fit in MAX_MESSAGE_SIZE. The joiner checks that each
snapshot's ``prev_hash`` is the ``state_hash`` of the one before, that the
last one's group id, epoch and state hash are the add's ``group_id``,
``parent_epoch`` and ``parent_hash`` (which the admin's device signed), and
then applies the add to it with the usual rules. So a relay cannot alter a
welcome, only deliver or drop it. The author sends a welcome only once its
add is applied (RFC 9420: the Welcome "MUST NOT be delivered to a new joiner
until it's clear that the Commit has been accepted").

The joiner trusts the admin who added it for the history before the add (as
every messenger does); changes by other members that build on that state
confirm it. A device that already holds the group applies only a welcome's
``message``, as an ordinary control message, and never replaces its state
from a welcome: a welcome cannot override a group one holds. Changes made
after the add reach the joiner as ordinary control messages.

Stored state (``Group.to_bytes``)
----------------------------------
``pack([STATE_VERSION, [snapshot: bin, ...]])``, oldest state first, each
the parent of the next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from itertools import pairwise
from typing import Any, ClassVar, Protocol, TypeAlias

from .consts import (
    ED25519_KEY_SIZE,
    ED25519_SIGNATURE_SIZE,
    GROUP_CHANGE_ID_CONTEXT,
    GROUP_CONTROL_SIGNATURE_CONTEXT,
    GROUP_ID_SIZE,
    GROUP_STATE_HASH_CONTEXT,
    GROUP_VERSION,
    MAX_GROUP_HISTORY,
    MAX_GROUP_MEMBERS,
    MAX_GROUP_TITLE_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_STATE_SIZE,
    MAX_USER_ID_SIZE,
    PROTOCOL_VERSION,
    STATE_VERSION,
)
from .devices import DeviceEntry, SignedDeviceList, check_identity_key, check_user_id
from .encoding import UINT32_MAX, UINT64_MAX, Fields, pack, split_array, unpack
from .errors import (
    DecodeError,
    DuplicateMessage,
    InvalidArgument,
    InvalidKey,
    InvalidState,
    ProtocolError,
    RemoteProtocolError,
    StaleChange,
    UnauthorizedChange,
    UnknownVersion,
    UntrustedIdentity,
)
from .keys import IdentityKeyPair, PublicIdentity
from .pickles import load_pickle
from .primitives import SYSTEM_RANDOM, RandomSource

HASH_SIZE = 32
# Parent hash of a create message and prev_hash of a genesis state.
GENESIS_PARENT_HASH = bytes(HASH_SIZE)

DeviceDirectory: TypeAlias = (
    Mapping[str, SignedDeviceList] | Callable[[str], SignedDeviceList | None]
)
"""Where the caller's verified device lists come from, keyed by user id."""


class ActionCode(IntEnum):
    """The ``action`` field of a control message body."""

    CREATE = 0
    ADD_MEMBER = 1
    REMOVE_MEMBER = 2
    LEAVE = 3
    SET_ADMIN = 4
    SET_TITLE = 5


class StateRelation(Enum):
    """Where another member's group state stands against ours (:meth:`Group.relation`)."""

    CURRENT = "current"
    ANCESTOR = "ancestor"
    AHEAD = "ahead"
    FORKED = "forked"
    UNKNOWN = "unknown"


class HeldState(Protocol):
    """A group state as far as :func:`state_relation` needs it: its epoch and hash."""

    @property
    def epoch(self) -> int: ...

    @property
    def state_hash(self) -> bytes: ...


def state_relation(states: Sequence[HeldState], epoch: int, state_hash: bytes) -> StateRelation:
    """:meth:`Group.relation` over held ``states`` (oldest first, consecutive epochs).

    Also for what is not a :class:`Group`: the split-detection vectors give a
    receiver's states as bare epochs and hashes.
    """
    _check_uint(epoch, UINT64_MAX, "an epoch")
    _check_bytes(state_hash, HASH_SIZE, "a state hash")
    if not states:
        raise InvalidArgument("a relation needs at least the current state")
    current = states[-1]
    if epoch > current.epoch:
        return StateRelation.AHEAD
    oldest = states[0].epoch
    if epoch < oldest:
        return StateRelation.UNKNOWN
    held = states[epoch - oldest]
    if held.state_hash != state_hash:
        return StateRelation.FORKED
    return StateRelation.CURRENT if held is current else StateRelation.ANCESTOR


# ------------------------------------------------------------------ validation helpers


def _check_title(title: object, error: type[ProtocolError] = InvalidArgument) -> str:
    if not isinstance(title, str):
        raise error("a group title is a string")
    try:
        size = len(title.encode("utf-8"))
    except UnicodeEncodeError:
        raise error("a group title is valid UTF-8") from None
    if size > MAX_GROUP_TITLE_SIZE:
        raise error(f"a group title is at most {MAX_GROUP_TITLE_SIZE} bytes of UTF-8")
    return title


def _check_bytes(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise InvalidArgument(f"{what} is {size} bytes")
    return value


def _check_uint(value: object, maximum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise InvalidArgument(f"{what} is an integer from 0 to {maximum}")
    return value


def _check_sorted_ids(ids: list[str], what: str) -> None:
    if any(a >= b for a, b in pairwise(ids)):
        raise InvalidArgument(f"{what}: user ids must be unique and in increasing order")


@contextmanager
def _remote(what: str) -> Iterator[None]:
    """Turn a constructor's InvalidArgument on decoded input into a DecodeError."""
    try:
        yield
    except InvalidArgument as exc:
        raise DecodeError(f"{what}: {exc.message}") from None


def _sha256(context: bytes, data: bytes) -> bytes:
    return hashlib.sha256(context + data).digest()


# ------------------------------------------------------------------ members and actions


@dataclass(frozen=True, slots=True)
class Member:
    """A group member: user id, user identity public key, admin flag."""

    user_id: str
    user_identity: bytes
    admin: bool = False

    def __post_init__(self) -> None:
        # stored: a member named as when its group was stored (check_user_id);
        # the full rule is checked where a user id comes in (the client API,
        # the decoders), as for every value type below.
        check_user_id(self.user_id, stored=True)
        check_identity_key(self.user_identity)
        if not isinstance(self.admin, bool):
            raise InvalidArgument("admin is a bool")

    def __repr__(self) -> str:
        role = ", admin" if self.admin else ""
        return f"Member({self.user_id!r}, {self.user_identity.hex()}{role})"


@dataclass(frozen=True, slots=True)
class AddMember:
    """Add ``user_id`` with this user identity (admins only)."""

    user_id: str
    user_identity: bytes
    code: ClassVar[ActionCode] = ActionCode.ADD_MEMBER

    def __post_init__(self) -> None:
        check_user_id(self.user_id, stored=True)
        check_identity_key(self.user_identity)

    def args(self) -> list[Any]:
        return [self.user_id, self.user_identity]

    def __repr__(self) -> str:
        return f"AddMember({self.user_id!r}, {self.user_identity.hex()})"


@dataclass(frozen=True, slots=True)
class Replaces:
    """The group a *reinit* continues: its id and the state its author held.

    A create naming one (spec/12-groups.md, section 12.9) asks the members
    of that group to move to the new one, when its author is an admin of the
    group as they hold it: the way back to one state after a split.
    """

    group_id: bytes
    epoch: int
    state_hash: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.group_id, GROUP_ID_SIZE, "a group id")
        _check_uint(self.epoch, UINT64_MAX, "an epoch")
        _check_bytes(self.state_hash, HASH_SIZE, "a state hash")

    def args(self) -> list[Any]:
        return [self.group_id, self.epoch, self.state_hash]

    def __repr__(self) -> str:
        return f"Replaces({self.group_id.hex()}, epoch={self.epoch})"


@dataclass(frozen=True, slots=True)
class CreateGroup:
    """Create a group; the author becomes its only admin.

    ``members`` are the other initial members, in increasing user id order
    (:func:`create_group` sorts them). ``replaces``: the group this one
    continues (a reinit), or None.
    """

    title: str
    members: tuple[AddMember, ...]
    replaces: Replaces | None = None
    code: ClassVar[ActionCode] = ActionCode.CREATE

    def __post_init__(self) -> None:
        _check_title(self.title)
        if not isinstance(self.members, tuple) or not all(
            isinstance(m, AddMember) for m in self.members
        ):
            raise InvalidArgument("members is a tuple of AddMember")
        if len(self.members) > MAX_GROUP_MEMBERS - 1:
            raise InvalidArgument(f"a group has at most {MAX_GROUP_MEMBERS} members")
        _check_sorted_ids([m.user_id for m in self.members], "create")
        if self.replaces is not None and not isinstance(self.replaces, Replaces):
            raise InvalidArgument("replaces is a Replaces or None")

    def args(self) -> list[Any]:
        replaces = None if self.replaces is None else self.replaces.args()
        return [self.title, [m.args() for m in self.members], replaces]


@dataclass(frozen=True, slots=True)
class RemoveMember:
    """Remove another member (admins only)."""

    user_id: str
    code: ClassVar[ActionCode] = ActionCode.REMOVE_MEMBER

    def __post_init__(self) -> None:
        check_user_id(self.user_id, stored=True)

    def args(self) -> list[Any]:
        return [self.user_id]


@dataclass(frozen=True, slots=True)
class Leave:
    """The author leaves the group (any member)."""

    code: ClassVar[ActionCode] = ActionCode.LEAVE

    def args(self) -> list[Any]:
        return []


@dataclass(frozen=True, slots=True)
class SetAdmin:
    """Promote (``admin=True``) or demote a member (admins only)."""

    user_id: str
    admin: bool
    code: ClassVar[ActionCode] = ActionCode.SET_ADMIN

    def __post_init__(self) -> None:
        check_user_id(self.user_id, stored=True)
        if not isinstance(self.admin, bool):
            raise InvalidArgument("admin is a bool")

    def args(self) -> list[Any]:
        return [self.user_id, self.admin]


@dataclass(frozen=True, slots=True)
class SetTitle:
    """Change the group's title (admins only)."""

    title: str
    code: ClassVar[ActionCode] = ActionCode.SET_TITLE

    def __post_init__(self) -> None:
        _check_title(self.title)

    def args(self) -> list[Any]:
        return [self.title]


Action: TypeAlias = CreateGroup | AddMember | RemoveMember | Leave | SetAdmin | SetTitle
_ACTION_TYPES = (CreateGroup, AddMember, RemoveMember, Leave, SetAdmin, SetTitle)


def _decode_add(fields: Fields, stored: bool) -> AddMember:
    user_id = fields.text(MAX_USER_ID_SIZE)
    identity = fields.bin(ED25519_KEY_SIZE)
    fields.end()
    check_identity_key(identity, InvalidKey)
    # The user id is checked after the identity (spec/06, "Control message").
    check_user_id(user_id, DecodeError, stored=stored)
    with _remote("add_member"):
        return AddMember(user_id, identity)


def _decode_action(code: int, args: Fields, *, stored: bool) -> Action:
    action: Action
    if code == ActionCode.CREATE:
        title = args.text(MAX_GROUP_TITLE_SIZE)
        raw = args.array(max_len=MAX_GROUP_MEMBERS - 1)
        raw_replaces = args.raw()
        args.end()
        members = tuple(
            _decode_add(Fields(item, what=f"create.members[{i}]", count=2), stored)
            for i, item in enumerate(raw)
        )
        replaces = None
        if raw_replaces is not None:
            old = Fields(raw_replaces, what="create.replaces", count=3)
            replaces = Replaces(old.bin(GROUP_ID_SIZE), old.uint(UINT64_MAX), old.bin(HASH_SIZE))
            old.end()
        with _remote("create"):
            action = CreateGroup(title, members, replaces)
    elif code == ActionCode.ADD_MEMBER:
        action = _decode_add(args, stored)
    elif code == ActionCode.REMOVE_MEMBER:
        user_id = args.text(MAX_USER_ID_SIZE)
        args.end()
        check_user_id(user_id, DecodeError, stored=stored)
        with _remote("remove_member"):
            action = RemoveMember(user_id)
    elif code == ActionCode.LEAVE:
        args.end()
        action = Leave()
    elif code == ActionCode.SET_ADMIN:
        user_id = args.text(MAX_USER_ID_SIZE)
        admin = args.boolean()
        args.end()
        check_user_id(user_id, DecodeError, stored=stored)
        with _remote("set_admin"):
            action = SetAdmin(user_id, admin)
    elif code == ActionCode.SET_TITLE:
        title = args.text(MAX_GROUP_TITLE_SIZE)
        args.end()
        with _remote("set_title"):
            action = SetTitle(title)
    else:
        raise DecodeError(f"control message: unknown action {code}")
    return action


def encode_action(action: Action) -> bytes:
    """An action alone, as a control message body carries it: ``pack([action, args])``."""
    return pack([int(action.code), action.args()])


def decode_action(data: bytes, *, stored: bool = False) -> Action:
    """Inverse of :func:`encode_action`; DecodeError (or InvalidKey) if it is not one
    (``stored``: one this device stored itself, see :func:`check_user_id`)."""
    fields = Fields.decode(data, what="action", count=2)
    code = fields.uint()
    args = fields.nested(what="args")
    fields.end()
    return _decode_action(code, args, stored=stored)


# ------------------------------------------------------------------ state


def _known_member(raw: object, known: dict[tuple[str, bytes, bool], Member]) -> Member | None:
    """The Member already decoded from an entry equal to ``raw`` (exactly: same types), if any."""
    if type(raw) is not list or len(raw) != 3:
        return None
    user_id, identity, admin = raw
    if type(user_id) is not str or type(identity) is not bytes or type(admin) is not bool:
        return None
    return known.get((user_id, identity, admin))


class StateDecodeCache:
    """What earlier :meth:`GroupState.decode` calls of one pickle or welcome checked.

    A pickle holds a chain of states whose member lists are mostly equal: a
    member list whose encoding was decoded, checked and validated before is
    reused as it is, and a member entry seen before is not checked again.
    """

    __slots__ = ("entries", "lists")

    def __init__(self) -> None:
        self.entries: dict[tuple[str, bytes, bool], Member] = {}
        # Encoded member list (the state's last field) -> its members, by user id.
        self.lists: dict[bytes, tuple[tuple[Member, ...], dict[str, Member]]] = {}


_STATE_FIELDS = 7


def _check_members(members: tuple[Member, ...]) -> None:
    if not 1 <= len(members) <= MAX_GROUP_MEMBERS:
        raise InvalidArgument(f"a group has 1 to {MAX_GROUP_MEMBERS} members")
    _check_sorted_ids([m.user_id for m in members], "group state")
    if not any(m.admin for m in members):
        raise InvalidArgument("a group has at least one admin")


def _decode_members(
    data: bytes, max_size: int, known: dict[tuple[str, bytes, bool], Member], stored: bool
) -> tuple[tuple[Member, ...], dict[str, Member]]:
    """A state's member list from its encoding: checked, validated, and by user id."""
    raw_members = unpack(data, what="group state", max_size=max_size)
    if not isinstance(raw_members, list) or len(raw_members) > MAX_GROUP_MEMBERS:
        raise DecodeError(
            f"group state: field 6 must be an array of at most {MAX_GROUP_MEMBERS} items"
        )
    members = []
    for index, raw in enumerate(raw_members):
        member = _known_member(raw, known)
        if member is None:
            entry = f"group state.members[{index}]"
            if type(raw) is not list or len(raw) != 3:
                raise DecodeError(f"{entry}: expected an array of 3 fields")
            user_id, identity, admin = raw
            check_user_id(user_id, DecodeError, stored=stored)
            if type(admin) is not bool:
                raise DecodeError(f"{entry}: field 2 must be a boolean")
            if type(identity) is not bytes or len(identity) != ED25519_KEY_SIZE:
                raise DecodeError(f"{entry}: field 1 must be {ED25519_KEY_SIZE} bytes long")
            check_identity_key(identity, InvalidKey)
            member = Member(user_id, identity, admin)  # checked above: cannot raise
            known[(user_id, identity, admin)] = member
        members.append(member)
    result = tuple(members)
    with _remote("group state"):
        _check_members(result)
    return result, {m.user_id: m for m in result}


@dataclass(frozen=True, slots=True)
class GroupState:
    """One immutable snapshot of a group; ``state_hash`` is computed from the rest."""

    group_id: bytes
    epoch: int
    prev_hash: bytes
    change_id: bytes
    title: str
    members: tuple[Member, ...]
    state_hash: bytes = field(init=False, repr=False, compare=False)
    # Made once, as the state is immutable: the hash, pickles and welcomes
    # need the encoding, and members are looked up on every group message.
    _encoding: bytes = field(init=False, repr=False, compare=False)
    _by_user_id: dict[str, Member] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_fields()
        if not isinstance(self.members, tuple) or not all(
            isinstance(m, Member) for m in self.members
        ):
            raise InvalidArgument("members is a tuple of Member")
        _check_members(self.members)
        encoding = pack(
            [
                PROTOCOL_VERSION,
                self.group_id,
                self.epoch,
                self.prev_hash,
                self.change_id,
                self.title,
                [[m.user_id, m.user_identity, m.admin] for m in self.members],
            ]
        )
        self._finish(encoding, {m.user_id: m for m in self.members})

    def _check_fields(self) -> None:
        _check_bytes(self.group_id, GROUP_ID_SIZE, "a group id")
        _check_uint(self.epoch, UINT64_MAX, "an epoch")
        _check_bytes(self.prev_hash, HASH_SIZE, "a state hash")
        _check_bytes(self.change_id, HASH_SIZE, "a change id")
        if (self.epoch == 0) != (self.prev_hash == GENESIS_PARENT_HASH):
            raise InvalidArgument("only the genesis state (epoch 0) has no parent hash")
        _check_title(self.title)

    def _finish(self, encoding: bytes, by_user_id: dict[str, Member]) -> None:
        object.__setattr__(self, "_encoding", encoding)
        object.__setattr__(self, "state_hash", _sha256(GROUP_STATE_HASH_CONTEXT, encoding))
        object.__setattr__(self, "_by_user_id", by_user_id)

    # ---------------------------------------------------------------- queries

    def member(self, user_id: str) -> Member | None:
        """The member with this user id, or None."""
        return self._by_user_id.get(user_id)

    @property
    def user_ids(self) -> tuple[str, ...]:
        return tuple(m.user_id for m in self.members)

    @property
    def admins(self) -> tuple[str, ...]:
        return tuple(m.user_id for m in self.members if m.admin)

    # ---------------------------------------------------------------- encoding

    def encode(self) -> bytes:
        """The canonical snapshot (hashed into ``state_hash``, sent in welcomes)."""
        return self._encoding

    @classmethod
    def decode(
        cls,
        data: bytes,
        *,
        max_size: int = MAX_STATE_SIZE,
        cache: StateDecodeCache | None = None,
        stored: bool = False,
    ) -> GroupState:
        """Decode a snapshot; DecodeError, UnknownVersion or InvalidKey if bad.

        ``cache`` carries what earlier calls given the same cache (the other
        states of one pickle or welcome) checked, so it is not checked again;
        ``stored``: a state this device stored itself (see :func:`check_user_id`).
        """
        head, member_bytes = split_array(
            data, what="group state", count=_STATE_FIELDS, head=_STATE_FIELDS - 1, max_size=max_size
        )
        fields = Fields(head, what="group state")
        version = fields.uint()
        if version != PROTOCOL_VERSION:
            raise UnknownVersion(f"group state version {version}")
        group_id = fields.bin(GROUP_ID_SIZE)
        epoch = fields.uint(UINT64_MAX)
        prev_hash = fields.bin(HASH_SIZE)
        change_id = fields.bin(HASH_SIZE)
        title = fields.text(MAX_GROUP_TITLE_SIZE)
        cache = StateDecodeCache() if cache is None else cache
        members = cache.lists.get(member_bytes)
        if members is None:
            members = _decode_members(member_bytes, max_size, cache.entries, stored)
            cache.lists[member_bytes] = members
        # Built without __init__: the members were validated when first decoded,
        # and the canonical encoding is ``data`` itself.
        state = object.__new__(cls)
        for name, value in (
            ("group_id", group_id),
            ("epoch", epoch),
            ("prev_hash", prev_hash),
            ("change_id", change_id),
            ("title", title),
            ("members", members[0]),
        ):
            object.__setattr__(state, name, value)
        with _remote("group state"):
            state._check_fields()
        state._finish(data, members[1])
        return state

    def __repr__(self) -> str:
        return (
            f"GroupState({self.group_id.hex()}, epoch={self.epoch}, "
            f"hash={self.state_hash.hex()[:16]}, members={self.user_ids}, admins={self.admins})"
        )


def decode_states(
    encodings: Iterable[object], what: str, *, stored: bool = False
) -> list[GroupState]:
    """Decode a chain's state encodings (a pickle's, a welcome's, a sync's), sharing
    one cache among them; DecodeError if an item is not a byte string (``stored``:
    a pickle's, see :meth:`GroupState.decode`)."""
    cache = StateDecodeCache()
    states = []
    for index, item in enumerate(encodings):
        if not isinstance(item, bytes):
            raise DecodeError(f"{what}: state {index} is not a byte string")
        states.append(GroupState.decode(item, cache=cache, stored=stored))
    return states


# ------------------------------------------------------------------ control messages


def _encode_body(
    group_id: bytes,
    parent_epoch: int,
    parent_hash: bytes,
    author_user_id: str,
    author_device_id: int,
    action: Action,
) -> bytes:
    return pack(
        [
            GROUP_VERSION,
            group_id,
            parent_epoch,
            parent_hash,
            author_user_id,
            author_device_id,
            int(action.code),
            action.args(),
        ]
    )


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """A signed group change. ``body`` and ``change_id`` are computed from the fields.

    :meth:`decode` checks structure only; the signature is checked by
    :meth:`Group.apply` against the author device the directory lists.
    """

    group_id: bytes
    parent_epoch: int
    parent_hash: bytes
    author_user_id: str
    author_device_id: int
    action: Action
    signature: bytes
    body: bytes = field(init=False, repr=False, compare=False)
    change_id: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_bytes(self.group_id, GROUP_ID_SIZE, "a group id")
        _check_bytes(self.parent_hash, HASH_SIZE, "a parent hash")
        check_user_id(self.author_user_id, stored=True)
        _check_uint(self.author_device_id, UINT32_MAX, "a device id")
        if not isinstance(self.action, _ACTION_TYPES):
            raise InvalidArgument("action is one of the group actions")
        if isinstance(self.action, CreateGroup):
            if self.parent_epoch != 0 or self.parent_hash != GENESIS_PARENT_HASH:
                raise InvalidArgument("create has parent epoch 0 and a zero parent hash")
        else:
            # The child's epoch (parent + 1) must fit in a u64.
            _check_uint(self.parent_epoch, UINT64_MAX - 1, "a parent epoch")
        _check_bytes(self.signature, ED25519_SIGNATURE_SIZE, "a signature")
        body = _encode_body(
            self.group_id,
            self.parent_epoch,
            self.parent_hash,
            self.author_user_id,
            self.author_device_id,
            self.action,
        )
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "change_id", _sha256(GROUP_CHANGE_ID_CONTEXT, body))

    @classmethod
    def sign(
        cls,
        device_key: IdentityKeyPair,
        *,
        group_id: bytes,
        parent_epoch: int,
        parent_hash: bytes,
        author_user_id: str,
        author_device_id: int,
        action: Action,
    ) -> ControlMessage:
        """Build and sign a message with the author device's identity key."""
        unsigned = cls(
            group_id,
            parent_epoch,
            parent_hash,
            author_user_id,
            author_device_id,
            action,
            bytes(ED25519_SIGNATURE_SIZE),
        )
        signature = device_key.sign(GROUP_CONTROL_SIGNATURE_CONTEXT + unsigned.body)
        return cls(
            group_id,
            parent_epoch,
            parent_hash,
            author_user_id,
            author_device_id,
            action,
            signature,
        )

    def encode(self) -> bytes:
        return pack([self.body, self.signature])

    @classmethod
    def decode(cls, data: bytes, *, stored: bool = False) -> ControlMessage:
        """Decode (not verify) a control message (``stored``: one this device stored
        itself, whose user ids are held to the size rule only: :func:`check_user_id`).

        Raises DecodeError, NonCanonicalEncoding, UnknownVersion or InvalidKey.
        """
        outer = Fields.decode(data, what="control message", count=2)
        body = outer.bin()
        signature = outer.bin(ED25519_SIGNATURE_SIZE)
        outer.end()
        fields = Fields.decode(body, what="control message body", count=8)
        version = fields.uint()
        if version != GROUP_VERSION:
            raise UnknownVersion(f"control message version {version}")
        group_id = fields.bin(GROUP_ID_SIZE)
        parent_epoch = fields.uint(UINT64_MAX)
        parent_hash = fields.bin(HASH_SIZE)
        author_user_id = fields.text(MAX_USER_ID_SIZE)
        author_device_id = fields.uint()
        code = fields.uint()
        args = fields.nested(what="args")
        fields.end()
        action = _decode_action(code, args, stored=stored)
        # The author is checked once the action is (spec/06, "Control message").
        check_user_id(author_user_id, DecodeError, stored=stored)
        # The body re-encodes to the same bytes: unpack() accepted only the
        # canonical encoding, and these fields determine it.
        with _remote("control message"):
            return cls(
                group_id,
                parent_epoch,
                parent_hash,
                author_user_id,
                author_device_id,
                action,
                signature,
            )

    def __repr__(self) -> str:
        return (
            f"ControlMessage({self.group_id.hex()}, parent_epoch={self.parent_epoch}, "
            f"author={self.author_user_id!r}/{self.author_device_id}, {self.action!r}, "
            f"id={self.change_id.hex()[:16]})"
        )


# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class MemberAdded:
    user_id: str
    user_identity: bytes
    admin: bool


@dataclass(frozen=True, slots=True)
class MemberRemoved:
    user_id: str


@dataclass(frozen=True, slots=True)
class AdminChanged:
    user_id: str
    admin: bool


@dataclass(frozen=True, slots=True)
class TitleChanged:
    title: str


GroupEvent: TypeAlias = MemberAdded | MemberRemoved | AdminChanged | TitleChanged


def describe_change(old: GroupState | None, new: GroupState) -> tuple[GroupEvent, ...]:
    """Events turning ``old`` (None: an empty group) into ``new``.

    Order: removals, then additions, admin changes (by user id), then the
    title. A user id whose identity changed is removed and added again.
    """
    before = {m.user_id: m for m in old.members} if old is not None else {}
    after = {m.user_id: m for m in new.members}
    events: list[GroupEvent] = []
    for user_id, member in sorted(before.items()):
        replaced = after.get(user_id)
        if replaced is None or replaced.user_identity != member.user_identity:
            events.append(MemberRemoved(user_id))
    for user_id, member in sorted(after.items()):
        previous = before.get(user_id)
        if previous is None or previous.user_identity != member.user_identity:
            events.append(MemberAdded(user_id, member.user_identity, member.admin))
        elif previous.admin != member.admin:
            events.append(AdminChanged(user_id, member.admin))
    old_title = old.title if old is not None else ""
    if new.title != old_title:
        events.append(TitleChanged(new.title))
    return tuple(events)


# ------------------------------------------------------------------ transitions


def _lookup(devices: DeviceDirectory, user_id: str) -> SignedDeviceList | None:
    if isinstance(devices, Mapping):
        return devices.get(user_id)
    return devices(user_id)


def _verify_author(message: ControlMessage, devices: DeviceDirectory) -> bytes:
    """Rule 2; returns the author's user identity from its device list."""
    signed = _lookup(devices, message.author_user_id)
    if signed is None:
        raise UnauthorizedChange("no device list for the author")
    device_list = signed.device_list
    if device_list.user_id != message.author_user_id:
        raise UnauthorizedChange("the author's device list is for another user")
    entry = device_list.device(message.author_device_id)
    if entry is None:
        raise UnauthorizedChange("the author device is not in the author's device list")
    PublicIdentity.from_bytes(entry.identity).verify(
        message.signature, GROUP_CONTROL_SIGNATURE_CONTEXT + message.body
    )
    return device_list.user_identity


def _genesis(message: ControlMessage, author_identity: bytes) -> GroupState:
    action = message.action
    if not isinstance(action, CreateGroup):
        raise UnauthorizedChange("a group starts with a create message")
    if any(m.user_id == message.author_user_id for m in action.members):
        raise UnauthorizedChange("create lists its author among the other members")
    if action.replaces is not None and action.replaces.group_id == message.group_id:
        raise UnauthorizedChange("a reinit continues another group")
    members = [Member(m.user_id, m.user_identity) for m in action.members]
    members.append(Member(message.author_user_id, author_identity, admin=True))
    members.sort(key=lambda m: m.user_id)
    return GroupState(
        message.group_id, 0, GENESIS_PARENT_HASH, message.change_id, action.title, tuple(members)
    )


def _child(parent: GroupState, message: ControlMessage, author_identity: bytes) -> GroupState:
    """Rules 6 and 7: the state ``message`` makes from ``parent``."""
    action = message.action
    author = parent.member(message.author_user_id)
    if author is None:
        raise UnauthorizedChange("the author is not a member")
    if author.user_identity != author_identity:
        raise UntrustedIdentity("the author's device list has another user identity")
    if not isinstance(action, Leave) and not author.admin:
        raise UnauthorizedChange("the author is not an admin")
    members = {m.user_id: m for m in parent.members}
    title = parent.title
    if isinstance(action, CreateGroup):
        raise UnauthorizedChange("the group already exists")
    if isinstance(action, AddMember):
        if action.user_id in members:
            raise UnauthorizedChange("already a member")
        if len(members) >= MAX_GROUP_MEMBERS:
            raise UnauthorizedChange("the group is full")
        members[action.user_id] = Member(action.user_id, action.user_identity)
    elif isinstance(action, RemoveMember):
        if action.user_id not in members:
            raise UnauthorizedChange("not a member")
        if action.user_id == author.user_id:
            raise UnauthorizedChange("a member removes itself with leave")
        del members[action.user_id]
    elif isinstance(action, Leave):
        del members[author.user_id]
        if not members:
            raise UnauthorizedChange("the last member cannot leave")
        if not any(m.admin for m in members.values()):
            raise UnauthorizedChange("the last admin cannot leave; promote another first")
    elif isinstance(action, SetAdmin):
        target = members.get(action.user_id)
        if target is None:
            raise UnauthorizedChange("not a member")
        if target.admin == action.admin:
            raise UnauthorizedChange("the admin flag already has this value")
        members[action.user_id] = Member(target.user_id, target.user_identity, action.admin)
        if not any(m.admin for m in members.values()):
            raise UnauthorizedChange("the last admin cannot be demoted")
    else:
        if action.title == title:
            raise UnauthorizedChange("the title already has this value")
        title = action.title
    return GroupState(
        parent.group_id,
        parent.epoch + 1,
        parent.state_hash,
        message.change_id,
        title,
        tuple(sorted(members.values(), key=lambda m: m.user_id)),
    )


# ------------------------------------------------------------------ the group record


@dataclass(frozen=True, slots=True)
class GroupUpdate:
    """The result of applying a control message: ``events`` turn the previous
    current state into the new one."""

    group: Group
    message: ControlMessage
    events: tuple[GroupEvent, ...]


@dataclass(frozen=True, slots=True)
class Welcome:
    """What a new member needs to start: the change that added it, and the states before it.

    ``history`` is empty for a ``create``; for an add its last state is the
    add's parent, preceded by ancestors, oldest first.
    """

    message: ControlMessage
    history: tuple[GroupState, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.message, ControlMessage):
            raise InvalidArgument("message is a ControlMessage")
        if not isinstance(self.history, tuple) or not all(
            isinstance(s, GroupState) for s in self.history
        ):
            raise InvalidArgument("history is a tuple of GroupState")

    def encode(self) -> bytes:
        return pack([GROUP_VERSION, self.message.encode(), [s.encode() for s in self.history]])

    @classmethod
    def decode(cls, data: bytes, *, max_history: int = MAX_GROUP_HISTORY + 1) -> Welcome:
        """Decode (not verify: see :meth:`Group.join`); at most ``max_history`` states."""
        fields = Fields.decode(data, what="welcome", count=3)
        version = fields.uint()
        if version != GROUP_VERSION:
            raise UnknownVersion(f"welcome version {version}")
        message = ControlMessage.decode(fields.bin())
        raw = fields.array(max_len=max_history)
        fields.end()
        return cls(message, tuple(decode_states(raw, "welcome history")))


@dataclass(frozen=True, slots=True)
class Group:
    """A member's view of a group: the current state and its recent ancestors.

    Immutable: :meth:`apply` returns a new ``Group`` in a :class:`GroupUpdate`
    and leaves this one as it was, so a refused message changes nothing.
    """

    states: tuple[GroupState, ...]

    def __post_init__(self) -> None:
        if (
            not isinstance(self.states, tuple)
            or not self.states
            or not all(isinstance(s, GroupState) for s in self.states)
        ):
            raise InvalidArgument("states is a non-empty tuple of GroupState")
        for parent, child in pairwise(self.states):
            if (
                child.group_id != parent.group_id
                or child.epoch != parent.epoch + 1
                or child.prev_hash != parent.state_hash
            ):
                raise InvalidArgument("each held state must be the child of the one before")

    @property
    def current(self) -> GroupState:
        return self.states[-1]

    @property
    def group_id(self) -> bytes:
        return self.current.group_id

    @property
    def epoch(self) -> int:
        """The current state's epoch."""
        return self.current.epoch

    @property
    def state_hash(self) -> bytes:
        """The current state's hash: with :attr:`epoch`, what a group message names."""
        return self.current.state_hash

    def relation(self, epoch: int, state_hash: bytes) -> StateRelation:
        """Where another member's state (``epoch``, ``state_hash``) stands against ours.

        For a group message's sender state (spec/12-groups.md, section 12.9):
        CURRENT, ANCESTOR (the sender has not applied our latest changes yet),
        AHEAD (a later epoch: we are behind, or on another branch), FORKED (an
        epoch we hold, or passed, with another hash: a split), or UNKNOWN (older
        than every state we hold). InvalidArgument for a malformed argument.
        """
        return state_relation(self.states, epoch, state_hash)

    # ---------------------------------------------------------------- receiving

    @classmethod
    def from_genesis(cls, message: ControlMessage, devices: DeviceDirectory) -> GroupUpdate:
        """Start a group from its verified ``create`` message."""
        author_identity = _verify_author(message, devices)
        genesis = _genesis(message, author_identity)
        return GroupUpdate(cls((genesis,)), message, describe_change(None, genesis))

    def apply(
        self,
        message: ControlMessage,
        devices: DeviceDirectory,
        *,
        history: int = MAX_GROUP_HISTORY,
    ) -> GroupUpdate:
        """Apply a received (or our own) control message on the current state.

        See the module's apply rules; ``history`` is how many ancestors the
        result keeps. Raises only RemoteProtocolError subclasses for a refused
        message (and InvalidArgument for a bad ``history``). A StaleChange for
        a message whose parent epoch is above ours (:meth:`builds_ahead`) may
        apply later; any other never will.
        """
        _check_uint(history, UINT32_MAX, "history")
        if not isinstance(message, ControlMessage):
            raise InvalidArgument("message is a ControlMessage")
        current = self.current
        if message.group_id != current.group_id:
            raise UnauthorizedChange("the change is for another group")
        author_identity = _verify_author(message, devices)
        if any(state.change_id == message.change_id for state in self.states):
            raise DuplicateMessage("this change is already applied")
        if isinstance(message.action, CreateGroup):
            raise UnauthorizedChange("the group already exists")
        if (message.parent_epoch, message.parent_hash) != (current.epoch, current.state_hash):
            if self.builds_ahead(message):
                raise StaleChange("the change builds on an epoch we do not hold yet")
            raise StaleChange("the change builds on a state that is not our current one")
        state = _child(current, message, author_identity)
        kept = (*self.states, state)[-(history + 1) :]
        return GroupUpdate(Group(kept), message, describe_change(current, state))

    def builds_ahead(self, message: ControlMessage) -> bool:
        """Whether ``message`` names a parent epoch above ours: it may apply once we catch up."""
        return message.parent_epoch > self.current.epoch

    @classmethod
    def join(
        cls,
        welcome: Welcome,
        devices: DeviceDirectory,
        *,
        user_id: str,
        user_identity: bytes,
        history: int = MAX_GROUP_HISTORY,
    ) -> GroupUpdate:
        """Join from a welcome addressed to (``user_id``, ``user_identity``).

        Only for a group not held yet (else apply ``welcome.message``).
        Verifies the change as :meth:`apply` does, on the states the welcome
        carries, after checking that they chain up to the state the change
        was signed on. The events list every member (the group as the joiner
        first sees it). UnauthorizedChange if the welcome does not add this user.
        """
        message = welcome.message
        if not welcome.history:
            update = cls.from_genesis(message, devices)
        else:
            try:
                held = cls(welcome.history)
            except InvalidArgument:
                raise UnauthorizedChange("the welcome's states do not form a chain") from None
            parent = held.current
            if (parent.group_id, parent.epoch, parent.state_hash) != (
                message.group_id,
                message.parent_epoch,
                message.parent_hash,
            ):
                raise UnauthorizedChange("the welcome's last state is not the one the add was on")
            action = message.action
            if not isinstance(action, AddMember) or action.user_id != user_id:
                raise UnauthorizedChange("the welcome's change does not add this user")
            update = held.apply(message, devices, history=history)
        member = update.group.current.member(user_id)
        if member is None or member.user_identity != user_identity:
            raise UnauthorizedChange("the welcome does not make this user a member")
        return GroupUpdate(update.group, message, describe_change(None, update.group.current))

    # ---------------------------------------------------------------- sending

    def propose(
        self,
        action: Action,
        *,
        author_user_id: str,
        author_device_id: int,
        device_key: IdentityKeyPair,
    ) -> ControlMessage:
        """Sign ``action`` on the current state, for sending to every member's devices.

        A candidate: the group is left as it is. The author applies the result
        with :meth:`apply` like everyone else, once it knows the change came
        first for its epoch (module docstring, Sequencing). InvalidArgument if
        the action is not allowed on the current state.
        """
        current = self.current
        author = current.member(author_user_id)
        if author is None:
            raise InvalidArgument("only a member can change the group")
        message = ControlMessage.sign(
            device_key,
            group_id=current.group_id,
            parent_epoch=current.epoch,
            parent_hash=current.state_hash,
            author_user_id=author_user_id,
            author_device_id=author_device_id,
            action=action,
        )
        try:
            _child(current, message, author.user_identity)
        except RemoteProtocolError as exc:
            raise InvalidArgument(exc.message) from None
        return message

    def welcome(
        self,
        message: ControlMessage,
        *,
        max_history: int = MAX_GROUP_HISTORY + 1,
        max_size: int = MAX_MESSAGE_SIZE,
    ) -> Welcome:
        """The welcome for the member(s) that held ``message`` (a create or an add) made.

        Carries the add's parent and as many ancestors as ``max_history``
        and ``max_size`` (of the encoded welcome) allow. InvalidState unless
        the message made one of the held states, its parent is still held,
        and the welcome fits.
        """
        for index, state in enumerate(self.states):
            if state.change_id != message.change_id:
                continue
            if isinstance(message.action, CreateGroup):
                return Welcome(message, ())
            if not isinstance(message.action, AddMember) or index == 0:
                break
            # Fixed overhead: the array header, version and the message's bin header.
            size = len(message.encode()) + 16
            first = index
            for ancestor in reversed(self.states[max(0, index - max_history) : index]):
                size += len(ancestor.encode()) + 5
                if size > max_size:
                    break
                first -= 1
            if first == index:
                break
            return Welcome(message, self.states[first:index])
        raise InvalidState("no welcome: not a held create or add, its parent is gone, or too big")

    # ---------------------------------------------------------------- storage

    def to_bytes(self) -> bytes:
        return pack([STATE_VERSION, [state.encode() for state in self.states]])

    @classmethod
    def from_bytes(cls, data: bytes) -> Group:
        """Load a stored group; UnknownStateVersion or StateError if it cannot be."""

        def read(fields: Fields) -> Group:
            states = fields.array(max_len=MAX_STATE_SIZE)
            return cls(tuple(decode_states(states, "group pickle", stored=True)))

        return load_pickle(data, "group pickle", read)

    def __repr__(self) -> str:
        return f"Group({self.current!r}, held={len(self.states)})"


# ------------------------------------------------------------------ helpers for callers


def create_group(
    *,
    title: str,
    members: Iterable[AddMember],
    author_user_id: str,
    author_device_id: int,
    device_key: IdentityKeyPair,
    rng: RandomSource = SYSTEM_RANDOM,
    replaces: Replaces | None = None,
) -> ControlMessage:
    """Sign a ``create`` for a new group with a random id (members in any order);
    with ``replaces``, a reinit of that group.

    Start it with :meth:`Group.from_genesis` and send
    ``Welcome(message, None)`` to every member's devices.
    """
    return ControlMessage.sign(
        device_key,
        group_id=rng.random_bytes(GROUP_ID_SIZE),
        parent_epoch=0,
        parent_hash=GENESIS_PARENT_HASH,
        author_user_id=author_user_id,
        author_device_id=author_device_id,
        action=CreateGroup(title, tuple(sorted(members, key=lambda m: m.user_id)), replaces),
    )


def member_devices(
    state: GroupState, devices: DeviceDirectory
) -> dict[str, tuple[DeviceEntry, ...]]:
    """Each member's devices per the signed device lists held: the fan-out targets.

    Members with no list held are left out (fetch theirs first). A list
    signed by another identity than the member's raises UntrustedIdentity.
    """
    result: dict[str, tuple[DeviceEntry, ...]] = {}
    for member in state.members:
        signed = _lookup(devices, member.user_id)
        if signed is None:
            continue
        if signed.device_list.user_identity != member.user_identity:
            raise UntrustedIdentity(f"device list of {member.user_id!r} has another identity")
        result[member.user_id] = signed.device_list.devices
    return result
