"""Group membership: signed control messages, apply rules, forks, joiners, encodings."""

from __future__ import annotations

import contextlib
import hashlib
from itertools import permutations
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from hushchat.protocol import consts
from hushchat.protocol.devices import DeviceEntry, DeviceList, SignedDeviceList
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.errors import (
    BadSignature,
    DecodeError,
    DuplicateMessage,
    InvalidArgument,
    InvalidKey,
    InvalidState,
    NonCanonicalEncoding,
    ProtocolError,
    StaleChange,
    StateError,
    UnauthorizedChange,
    UnknownStateVersion,
    UnknownVersion,
    UntrustedIdentity,
)
from hushchat.protocol.group import (
    GENESIS_PARENT_HASH,
    Action,
    ActionCode,
    AddMember,
    AdminChanged,
    ControlMessage,
    CreateGroup,
    Group,
    GroupEvent,
    GroupState,
    GroupUpdate,
    Leave,
    Member,
    MemberAdded,
    MemberRemoved,
    RemoveMember,
    SetAdmin,
    SetTitle,
    StateDecodeCache,
    TitleChanged,
    Welcome,
    create_group,
    member_devices,
)
from hushchat.protocol.primitives import SeededRandom
from tests.support.reference import SMALL_ORDER_KEY
from tests.support.users import User, keypair, make_user

# ------------------------------------------------------------------ a pool of users


def add_member(user: User) -> AddMember:
    """The action that adds ``user`` to a group."""
    return AddMember(user.user_id, user.public_identity)


POOL = [make_user(f"user{i:02}", range(1, 2 + i % 3)) for i in range(12)]  # 1-3 devices
ALICE, BOB, CAROL, DAVE, ERIN = POOL[:5]
OUTSIDER = POOL[11]
DIRECTORY: dict[str, SignedDeviceList] = {u.user_id: u.signed_device_list() for u in POOL}
MALLORY_KEY = keypair("mallory")


def sign(group: Group, user: User, action: Action, device_id: int = 1) -> ControlMessage:
    state = group.current
    return ControlMessage.sign(
        user.devices[device_id].identity,
        group_id=state.group_id,
        parent_epoch=state.epoch,
        parent_hash=state.state_hash,
        author_user_id=user.user_id,
        author_device_id=device_id,
        action=action,
    )


def start(*members: User, title: str = "team") -> tuple[Group, ControlMessage]:
    """ALICE creates a group with ``members``."""
    message = create_group(
        title=title,
        members=[add_member(m) for m in members],
        author_user_id=ALICE.user_id,
        author_device_id=1,
        device_key=ALICE.devices[1].identity,
        rng=SeededRandom(b"group id"),
    )
    return Group.from_genesis(message, DIRECTORY).group, message


def step(group: Group, user: User, action: Action, device_id: int = 1) -> GroupUpdate:
    """``user`` proposes ``action`` and the result is applied (by anyone)."""
    message = group.propose(
        action,
        author_user_id=user.user_id,
        author_device_id=device_id,
        device_key=user.devices[device_id].identity,
    )
    return group.apply(message, DIRECTORY)


def refused(group: Group, message: ControlMessage, error: type[ProtocolError]) -> None:
    """Applying ``message`` (also after a wire round trip) raises ``error``; state is intact."""
    before = group.to_bytes()
    with pytest.raises(error):
        group.apply(message, DIRECTORY)
    with pytest.raises(error):
        group.apply(ControlMessage.decode(message.encode()), DIRECTORY)
    assert group.to_bytes() == before


# ------------------------------------------------------------------ creating and joining


def test_create_makes_author_the_only_admin() -> None:
    group, message = start(BOB, CAROL)
    state = group.current
    assert state.epoch == 0
    assert state.prev_hash == GENESIS_PARENT_HASH
    assert state.change_id == message.change_id
    assert state.user_ids == (ALICE.user_id, BOB.user_id, CAROL.user_id)
    assert state.admins == (ALICE.user_id,)
    assert state.title == "team"


def test_every_member_joins_the_same_state_from_the_create() -> None:
    group, message = start(BOB, CAROL)
    welcome = Welcome.decode(group.welcome(message).encode())
    for user in (BOB, CAROL):
        update = Group.join(
            welcome, DIRECTORY, user_id=user.user_id, user_identity=user.public_identity
        )
        assert update.group == group
        assert update.events == (
            MemberAdded(ALICE.user_id, ALICE.public_identity, True),
            MemberAdded(BOB.user_id, BOB.public_identity, False),
            MemberAdded(CAROL.user_id, CAROL.public_identity, False),
            TitleChanged("team"),
        )


def test_joiner_gets_the_state_after_its_add() -> None:
    group, _ = start(BOB)
    group = step(group, ALICE, SetTitle("renamed")).group
    update = step(group, ALICE, add_member(DAVE))
    welcome = Welcome.decode(update.group.welcome(update.message).encode())
    assert [s.epoch for s in welcome.history] == [0, 1]
    joined = Group.join(
        welcome, DIRECTORY, user_id=DAVE.user_id, user_identity=DAVE.public_identity
    )
    assert joined.group == update.group
    assert MemberAdded(DAVE.user_id, DAVE.public_identity, False) in joined.events


def test_welcome_history_is_bounded() -> None:
    group, _ = start(BOB)
    for i in range(5):
        group = step(group, ALICE, SetTitle(f"t{i}")).group
    update = step(group, ALICE, add_member(DAVE))
    assert len(update.group.welcome(update.message, max_history=2).history) == 2
    parent_only = len(update.message.encode()) + len(group.current.encode()) + 40
    assert len(update.group.welcome(update.message, max_size=parent_only).history) == 1
    with pytest.raises(InvalidState):
        update.group.welcome(update.message, max_size=100)
    title = step(update.group, ALICE, SetTitle("x"))
    with pytest.raises(InvalidState):
        title.group.welcome(title.message)


def test_welcome_for_someone_else_is_refused() -> None:
    group, _ = start(BOB)
    update = step(group, ALICE, add_member(DAVE))
    welcome = update.group.welcome(update.message)
    with pytest.raises(UnauthorizedChange):
        Group.join(welcome, DIRECTORY, user_id=ERIN.user_id, user_identity=ERIN.public_identity)
    with pytest.raises(UnauthorizedChange):
        Group.join(welcome, DIRECTORY, user_id=DAVE.user_id, user_identity=ERIN.public_identity)
    create = Welcome(start(BOB)[1], ())
    with pytest.raises(UnauthorizedChange):
        Group.join(create, DIRECTORY, user_id=DAVE.user_id, user_identity=DAVE.public_identity)


def test_welcome_with_a_forged_snapshot_is_refused() -> None:
    group, _ = start(BOB)
    update = step(group, ALICE, add_member(DAVE))
    parent = group.current
    # The relay slips a ghost member into the snapshot the joiner is given.
    ghost = GroupState(
        parent.group_id,
        parent.epoch,
        parent.prev_hash,
        parent.change_id,
        parent.title,
        tuple(sorted((*parent.members, Member(ERIN.user_id, ERIN.public_identity)), key=_uid)),
    )
    forged = Welcome(update.message, (ghost,))
    with pytest.raises(UnauthorizedChange):
        Group.join(forged, DIRECTORY, user_id=DAVE.user_id, user_identity=DAVE.public_identity)


def test_welcome_whose_history_does_not_chain_is_refused() -> None:
    group, _ = start(BOB)
    group = step(group, ALICE, SetTitle("one")).group
    update = step(group, ALICE, add_member(DAVE))
    other, _ = start(CAROL)
    broken = Welcome(update.message, (other.current, group.current))
    with pytest.raises(UnauthorizedChange):
        Group.join(broken, DIRECTORY, user_id=DAVE.user_id, user_identity=DAVE.public_identity)


def test_joiner_follows_a_fork_rooted_before_its_add() -> None:
    # ALICE and BOB (both admins) change the group concurrently; ALICE adds
    # DAVE on her branch. If BOB's change wins, DAVE's add is undone for
    # DAVE too, because his welcome carries the fork's root.
    group, _ = start(BOB, CAROL)
    group = step(group, ALICE, SetAdmin(BOB.user_id, True)).group
    a = sign(group, ALICE, SetTitle("alice"))
    b = sign(group, BOB, SetTitle("bob"))
    loser, winner = sorted((a, b), key=lambda m: m.change_id, reverse=True)
    author = ALICE if loser is a else BOB
    on_loser = group.apply(loser, DIRECTORY).group
    add = step(on_loser, author, add_member(DAVE))
    joined = Group.join(
        add.group.welcome(add.message),
        DIRECTORY,
        user_id=DAVE.user_id,
        user_identity=DAVE.public_identity,
    ).group
    switched = joined.apply(winner, DIRECTORY)
    assert switched.group.current == group.apply(winner, DIRECTORY).group.current
    assert switched.discarded == (loser.change_id, add.message.change_id)
    assert MemberRemoved(DAVE.user_id) in switched.events


# ------------------------------------------------------------------ actions and events


def test_add_remove_leave_admin_title_events() -> None:
    group, _ = start(BOB)
    update = step(group, ALICE, add_member(CAROL))
    assert update.events == (MemberAdded(CAROL.user_id, CAROL.public_identity, False),)
    assert update.group.current.epoch == 1
    assert update.group.current.prev_hash == group.current.state_hash
    update = step(update.group, ALICE, SetAdmin(CAROL.user_id, True))
    assert update.events == (AdminChanged(CAROL.user_id, True),)
    update = step(update.group, CAROL, RemoveMember(BOB.user_id), device_id=2)
    assert update.events == (MemberRemoved(BOB.user_id),)
    update = step(update.group, ALICE, SetTitle("new"))
    assert update.events == (TitleChanged("new"),)
    update = step(update.group, ALICE, Leave())
    assert update.events == (MemberRemoved(ALICE.user_id),)
    assert update.group.current.user_ids == (CAROL.user_id,)
    assert update.group.current.admins == (CAROL.user_id,)
    assert update.group.current.epoch == 5


def test_any_member_device_may_leave() -> None:
    group, _ = start(BOB, CAROL)
    update = step(group, CAROL, Leave(), device_id=3)
    assert update.events == (MemberRemoved(CAROL.user_id),)


def test_admin_may_remove_and_demote_other_admins() -> None:
    group, _ = start(BOB, CAROL)
    group = step(group, ALICE, SetAdmin(BOB.user_id, True)).group
    demoted = step(group, BOB, SetAdmin(ALICE.user_id, False), device_id=2)
    assert demoted.group.current.admins == (BOB.user_id,)
    removed = step(group, BOB, RemoveMember(ALICE.user_id), device_id=2)
    assert removed.group.current.admins == (BOB.user_id,)


@pytest.mark.parametrize(
    ("author", "action"),
    [
        (BOB, SetTitle("bob is not an admin")),
        (BOB, add_member(ERIN)),
        (ALICE, add_member(BOB)),  # already a member
        (ALICE, RemoveMember(DAVE.user_id)),  # not a member
        (ALICE, RemoveMember(ALICE.user_id)),  # self-removal is leave
        (ALICE, Leave()),  # the last admin
        (ALICE, SetAdmin(ALICE.user_id, False)),  # the last admin
        (ALICE, SetAdmin(ALICE.user_id, True)),  # no change
        (ALICE, SetAdmin(DAVE.user_id, True)),  # not a member
        (ALICE, SetTitle("team")),  # no change
        (ALICE, CreateGroup("again", ())),
        (DAVE, SetTitle("outsider")),
        (DAVE, Leave()),
    ],
)
def test_changes_the_state_does_not_allow_are_refused(author: User, action: Action) -> None:
    group, _ = start(BOB, CAROL)
    with pytest.raises(InvalidArgument):
        group.propose(
            action,
            author_user_id=author.user_id,
            author_device_id=1,
            device_key=author.devices[1].identity,
        )
    if isinstance(action, CreateGroup):
        return  # a create cannot name a parent; covered by test_create_for_existing_group
    refused(group, sign(group, author, action), UnauthorizedChange)


def test_last_member_cannot_leave() -> None:
    group, _ = start()
    refused(group, sign(group, ALICE, Leave()), UnauthorizedChange)


def test_create_for_existing_group_is_refused() -> None:
    group, message = start(BOB)
    refused(group, message, DuplicateMessage)
    other = ControlMessage.sign(
        BOB.devices[1].identity,
        group_id=group.group_id,
        parent_epoch=0,
        parent_hash=GENESIS_PARENT_HASH,
        author_user_id=BOB.user_id,
        author_device_id=1,
        action=CreateGroup("takeover", ()),
    )
    refused(group, other, UnauthorizedChange)


def test_create_listing_its_author_is_refused() -> None:
    message = ControlMessage.sign(
        ALICE.devices[1].identity,
        group_id=bytes(16),
        parent_epoch=0,
        parent_hash=GENESIS_PARENT_HASH,
        author_user_id=ALICE.user_id,
        author_device_id=1,
        action=CreateGroup("x", (add_member(ALICE),)),
    )
    with pytest.raises(UnauthorizedChange):
        Group.from_genesis(message, DIRECTORY)


def test_genesis_must_be_a_create() -> None:
    group, _ = start(BOB)
    with pytest.raises(UnauthorizedChange):
        Group.from_genesis(sign(group, ALICE, SetTitle("x")), DIRECTORY)


def test_group_full() -> None:
    members = [
        Member(f"m{i:04}", POOL[i % 12].public_identity) for i in range(consts.MAX_GROUP_MEMBERS)
    ]
    members[0] = Member(ALICE.user_id, ALICE.public_identity, admin=True)
    full = GroupState(
        bytes(16), 0, GENESIS_PARENT_HASH, bytes(32), "", tuple(sorted(members, key=_uid))
    )
    refused(Group((full,)), sign(Group((full,)), ALICE, add_member(BOB)), UnauthorizedChange)


def _uid(member: Member) -> str:
    return member.user_id


# ------------------------------------------------------------------ a malicious relay


def test_unsigned_change_is_refused() -> None:
    group, _ = start(BOB)
    message = sign(group, ALICE, add_member(DAVE))
    unsigned = ControlMessage(
        message.group_id,
        message.parent_epoch,
        message.parent_hash,
        message.author_user_id,
        message.author_device_id,
        message.action,
        bytes(64),
    )
    refused(group, unsigned, BadSignature)


def test_flipped_signature_bit_is_refused() -> None:
    group, _ = start(BOB)
    wire = bytearray(sign(group, ALICE, add_member(DAVE)).encode())
    wire[-1] ^= 0x40
    refused(group, ControlMessage.decode(bytes(wire)), BadSignature)


def test_arguments_changed_after_signing_are_refused() -> None:
    group, _ = start(BOB)
    message = sign(group, ALICE, add_member(DAVE))
    swapped = ControlMessage(
        message.group_id,
        message.parent_epoch,
        message.parent_hash,
        message.author_user_id,
        message.author_device_id,
        add_member(ERIN),
        message.signature,
    )
    refused(group, swapped, BadSignature)


def test_ghost_member_signed_by_non_admin_is_refused() -> None:
    group, _ = start(BOB, CAROL)
    refused(group, sign(group, BOB, add_member(OUTSIDER), device_id=2), UnauthorizedChange)


def test_ghost_member_added_by_non_member_is_refused() -> None:
    group, _ = start(BOB)
    # The outsider has a valid device list and signs properly: still not a member.
    refused(group, sign(group, OUTSIDER, add_member(OUTSIDER)), UnauthorizedChange)


def test_change_from_a_device_not_in_the_authors_list_is_refused() -> None:
    group, _ = start(BOB)
    state = group.current
    fields: dict[str, Any] = {
        "group_id": state.group_id,
        "parent_epoch": state.epoch,
        "parent_hash": state.state_hash,
        "author_user_id": ALICE.user_id,
        "action": add_member(OUTSIDER),
    }
    # A key the relay made up, claiming a device id ALICE does not have.
    unknown_device = ControlMessage.sign(MALLORY_KEY, author_device_id=7, **fields)
    refused(group, unknown_device, UnauthorizedChange)
    # ...or claiming ALICE's real device id: the signature does not verify.
    refused(group, ControlMessage.sign(MALLORY_KEY, author_device_id=1, **fields), BadSignature)


def test_change_without_author_device_list_is_refused() -> None:
    group, _ = start(BOB)
    message = sign(group, ALICE, add_member(DAVE))
    before = group.to_bytes()
    directory = dict(DIRECTORY)
    del directory[ALICE.user_id]
    with pytest.raises(UnauthorizedChange):
        group.apply(message, directory)
    with pytest.raises(UnauthorizedChange):
        group.apply(message, lambda user_id: DIRECTORY[BOB.user_id])
    assert group.to_bytes() == before


def test_device_list_with_a_substituted_user_identity_is_untrusted() -> None:
    group, _ = start(BOB)
    # The relay serves a list for "ALICE" signed by its own user identity,
    # naming a device key it holds.
    fake = DeviceList.initial(
        ALICE.user_id, MALLORY_KEY.public.ed25519, [DeviceEntry(1, MALLORY_KEY.public.ed25519)]
    ).sign(MALLORY_KEY)
    message = ControlMessage.sign(
        MALLORY_KEY,
        group_id=group.group_id,
        parent_epoch=0,
        parent_hash=group.current.state_hash,
        author_user_id=ALICE.user_id,
        author_device_id=1,
        action=add_member(OUTSIDER),
    )
    before = group.to_bytes()
    with pytest.raises(UntrustedIdentity):
        group.apply(message, {**DIRECTORY, ALICE.user_id: fake})
    assert group.to_bytes() == before
    with pytest.raises(UntrustedIdentity):
        member_devices(group.current, {**DIRECTORY, ALICE.user_id: fake})


def test_removed_member_cannot_change_the_group() -> None:
    group, _ = start(BOB)
    group = step(group, ALICE, SetAdmin(BOB.user_id, True)).group
    group = step(group, ALICE, RemoveMember(BOB.user_id)).group
    refused(group, sign(group, BOB, add_member(OUTSIDER)), UnauthorizedChange)


def test_replayed_change_is_a_duplicate() -> None:
    group, _ = start(BOB)
    update = step(group, ALICE, add_member(DAVE))
    refused(update.group, update.message, DuplicateMessage)


def test_change_for_another_group_is_refused() -> None:
    group, _ = start(BOB)
    other, _ = start(BOB, title="other")
    other = Group(
        (
            GroupState(
                bytes(16),
                0,
                GENESIS_PARENT_HASH,
                other.current.change_id,
                "other",
                other.current.members,
            ),
        )
    )
    refused(group, sign(other, ALICE, add_member(DAVE)), UnauthorizedChange)


def test_change_from_the_future_is_stale() -> None:
    group, _ = start(BOB)
    ahead = step(step(group, ALICE, SetTitle("1")).group, ALICE, SetTitle("2"))
    refused(group, ahead.message, StaleChange)


# ------------------------------------------------------------------ concurrent changes


def two_admins() -> Group:
    group, _ = start(BOB, CAROL, DAVE)
    return step(group, ALICE, SetAdmin(BOB.user_id, True)).group


def test_concurrent_changes_converge_in_either_order() -> None:
    group = two_admins()
    a = sign(group, ALICE, add_member(ERIN))
    b = sign(group, BOB, RemoveMember(CAROL.user_id), device_id=2)
    winner, loser = sorted((a, b), key=lambda m: m.change_id)
    first_winner = group.apply(winner, DIRECTORY)
    refused(first_winner.group, loser, StaleChange)
    first_loser = group.apply(loser, DIRECTORY)
    switched = first_loser.group.apply(winner, DIRECTORY)
    assert switched.group == first_winner.group
    assert switched.discarded == (loser.change_id,)
    # Corrective events: undo the loser's change, then do the winner's.
    expected: dict[bytes, list[GroupEvent]] = {
        a.change_id: [MemberAdded(ERIN.user_id, ERIN.public_identity, False)],
        b.change_id: [MemberRemoved(CAROL.user_id)],
    }
    undo: dict[bytes, list[GroupEvent]] = {
        a.change_id: [MemberRemoved(ERIN.user_id)],
        b.change_id: [MemberAdded(CAROL.user_id, CAROL.public_identity, False)],
    }
    assert set(switched.events) == set(undo[loser.change_id] + expected[winner.change_id])


def test_change_built_on_a_discarded_change_is_stale() -> None:
    group = two_admins()
    a = sign(group, ALICE, SetTitle("a"))
    b = sign(group, BOB, SetTitle("b"), device_id=2)
    winner, loser = sorted((a, b), key=lambda m: m.change_id)
    on_loser = group.apply(loser, DIRECTORY).group
    follow_up = sign(on_loser, ALICE, add_member(ERIN))
    after = group.apply(winner, DIRECTORY).group
    refused(after, follow_up, StaleChange)
    # A member that applied the loser and its follow-up drops both.
    deep = on_loser.apply(follow_up, DIRECTORY).group.apply(winner, DIRECTORY)
    assert deep.group == after
    assert deep.discarded == (loser.change_id, follow_up.change_id)


def test_fork_older_than_the_held_history_is_stale() -> None:
    group = two_admins()
    a = sign(group, ALICE, SetTitle("a"))
    b = sign(group, BOB, SetTitle("b"), device_id=2)
    winner, loser = sorted((a, b), key=lambda m: m.change_id)
    held = group.apply(loser, DIRECTORY, fork_depth=1).group
    held = step(held, ALICE, add_member(ERIN)).group
    held = held.apply(sign(held, ALICE, SetTitle("c")), DIRECTORY, fork_depth=1).group
    assert len(held.states) == 2
    refused(held, winner, StaleChange)


def test_fork_depth_bounds_held_states() -> None:
    group, _ = start(BOB)
    for i in range(consts.MAX_GROUP_FORK_DEPTH + 5):
        group = step(group, ALICE, SetTitle(str(i))).group
    assert len(group.states) == consts.MAX_GROUP_FORK_DEPTH + 1
    assert group.current.epoch == consts.MAX_GROUP_FORK_DEPTH + 5


# ------------------------------------------------------------------ fan-out


def test_member_devices_come_from_signed_lists() -> None:
    group, _ = start(BOB, CAROL)
    devices = member_devices(group.current, {k: v for k, v in DIRECTORY.items() if k != "user02"})
    assert devices == {
        ALICE.user_id: DIRECTORY[ALICE.user_id].device_list.devices,
        BOB.user_id: DIRECTORY[BOB.user_id].device_list.devices,
    }


# ------------------------------------------------------------------ encodings


ALL_ACTIONS: list[Action] = [
    CreateGroup("títle", (add_member(BOB), add_member(CAROL))),
    add_member(BOB),
    RemoveMember("someone"),
    Leave(),
    SetAdmin(BOB.user_id, True),
    SetAdmin(BOB.user_id, False),
    SetTitle(""),
]


@pytest.mark.parametrize("action", ALL_ACTIONS, ids=lambda a: type(a).__name__)
def test_control_message_round_trip(action: Action) -> None:
    create = isinstance(action, CreateGroup)
    message = ControlMessage.sign(
        ALICE.devices[1].identity,
        group_id=bytes(range(16)),
        parent_epoch=0 if create else 2**64 - 2,
        parent_hash=GENESIS_PARENT_HASH if create else bytes(range(32)),
        author_user_id=ALICE.user_id,
        author_device_id=2**32 - 1,
        action=action,
    )
    wire = message.encode()
    decoded = ControlMessage.decode(wire)
    assert decoded == message
    assert decoded.change_id == message.change_id
    assert decoded.encode() == wire


def test_control_message_layout() -> None:
    group, _ = start(BOB)
    message = sign(group, ALICE, SetAdmin(BOB.user_id, True))
    body, signature = unpack(message.encode(), what="test")
    assert unpack(body, what="test") == [
        consts.PROTOCOL_VERSION,
        group.group_id,
        0,
        group.current.state_hash,
        ALICE.user_id,
        1,
        ActionCode.SET_ADMIN,
        [BOB.user_id, True],
    ]
    ALICE.devices[1].identity.public.verify(
        signature, consts.GROUP_CONTROL_SIGNATURE_CONTEXT + body
    )
    assert message.change_id == hashlib.sha256(consts.GROUP_CHANGE_ID_CONTEXT + body).digest()


def test_state_layout_and_hash() -> None:
    group, message = start(BOB)
    state = group.current
    assert unpack(state.encode(), what="test") == [
        consts.PROTOCOL_VERSION,
        state.group_id,
        0,
        GENESIS_PARENT_HASH,
        message.change_id,
        "team",
        [[ALICE.user_id, ALICE.public_identity, True], [BOB.user_id, BOB.public_identity, False]],
    ]
    expected = hashlib.sha256(consts.GROUP_STATE_HASH_CONTEXT + state.encode()).digest()
    assert state.state_hash == expected
    assert GroupState.decode(state.encode()) == state


def build_history() -> tuple[Group, GroupUpdate]:
    group, _ = start(BOB, CAROL)
    group = step(group, ALICE, SetTitle("x")).group
    return group, step(group, ALICE, add_member(DAVE))


def test_group_pickle_round_trip() -> None:
    _, update = build_history()
    data = update.group.to_bytes()
    assert Group.from_bytes(data) == update.group
    assert Group.from_bytes(data).to_bytes() == data
    assert unpack(data, what="test") == [
        consts.STATE_VERSION,
        [s.encode() for s in update.group.states],
    ]


def test_welcome_round_trip() -> None:
    _, update = build_history()
    welcome = update.group.welcome(update.message)
    assert Welcome.decode(welcome.encode()) == welcome
    assert unpack(welcome.encode(), what="test") == [
        consts.PROTOCOL_VERSION,
        update.message.encode(),
        [s.encode() for s in update.group.states[:-1]],
    ]


def _decoded(data: bytes, cache: StateDecodeCache | None) -> GroupState | str:
    try:
        return GroupState.decode(data, cache=cache)
    except ProtocolError as exc:
        return exc.code


def test_states_of_a_pickle_share_their_member_lists() -> None:
    _, update = build_history()
    # The create and the title change have the same members: decoded once.
    create, titled, added = Group.from_bytes(update.group.to_bytes()).states
    assert titled.members is create.members
    assert added.members is not create.members
    assert [titled, added] == list(update.group.states[1:])


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_warm_cache_decodes_exactly_like_a_cold_one(data: st.DataObject) -> None:
    """A state whose member list the cache holds decodes to what a fresh decode gives
    (the same state, or the same error), whatever was changed around that list."""
    _, update = build_history()
    encodings = [s.encode() for s in update.group.states]
    warm = StateDecodeCache()
    for encoding in encodings:
        GroupState.decode(encoding, cache=warm)
    mutated = bytearray(data.draw(st.sampled_from(encodings)))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(mutated)))
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip" and at < len(mutated):
            mutated[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=3))
        elif op == "delete":
            del mutated[at : at + data.draw(st.integers(1, 3))]
        elif op == "truncate":
            del mutated[at:]
    assert _decoded(bytes(mutated), warm) == _decoded(bytes(mutated), None)


def test_a_cached_member_list_needs_a_valid_head() -> None:
    _, update = build_history()
    state = update.group.states[1]
    warm = StateDecodeCache()
    GroupState.decode(state.encode(), cache=warm)
    fields = unpack(state.encode(), what="test")
    with pytest.raises(UnknownVersion):
        GroupState.decode(pack([2, *fields[1:]]), cache=warm)
    with pytest.raises(DecodeError):  # epoch 0 needs the genesis parent hash
        GroupState.decode(pack([*fields[:2], 0, *fields[3:]]), cache=warm)
    non_canonical_epoch = b"\xcf" + fields[2].to_bytes(8, "big")  # uint64 for a small epoch
    data = b"".join([b"\x97", pack(fields[0]), pack(fields[1]), non_canonical_epoch])
    data += b"".join(pack(f) for f in fields[3:])
    with pytest.raises(NonCanonicalEncoding):
        GroupState.decode(data, cache=warm)


def test_pickle_errors() -> None:
    _, update = build_history()
    states = [s.encode() for s in update.group.states]
    with pytest.raises(UnknownStateVersion):
        Group.from_bytes(pack([consts.STATE_VERSION + 1, states]))
    with pytest.raises(StateError):
        Group.from_bytes(pack([consts.STATE_VERSION, []]))
    with pytest.raises(StateError):
        Group.from_bytes(pack([consts.STATE_VERSION, [states[0], states[2]]]))
    with pytest.raises(StateError):
        Group.from_bytes(pack([consts.STATE_VERSION, [states[0], 5]]))
    with pytest.raises(StateError):
        Group.from_bytes(update.group.to_bytes()[:-1])


def test_decoders_refuse_bad_fields() -> None:
    group, _ = start(BOB)
    state = unpack(group.current.encode(), what="test")
    with pytest.raises(UnknownVersion):
        GroupState.decode(pack([2, *state[1:]]))
    with pytest.raises(DecodeError):  # members out of order
        GroupState.decode(pack([*state[:6], state[6][::-1]]))
    with pytest.raises(DecodeError):  # no admin
        GroupState.decode(pack([*state[:6], [[m[0], m[1], False] for m in state[6]]]))
    with pytest.raises(DecodeError):  # epoch 0 needs the zero parent hash
        GroupState.decode(pack([*state[:3], b"\x01" * 32, *state[4:]]))
    with pytest.raises(InvalidKey):
        GroupState.decode(pack([*state[:6], [[ALICE.user_id, SMALL_ORDER_KEY, True]]]))
    body, signature = unpack(sign(group, ALICE, Leave()).encode(), what="test")
    fields = unpack(body, what="test")
    for bad, error in [
        ([9, *fields[1:]], UnknownVersion),
        ([*fields[:6], 99, []], DecodeError),  # unknown action
        ([*fields[:7], [1]], DecodeError),  # leave takes no arguments
        ([*fields[:6], ActionCode.CREATE, ["", []]], DecodeError),  # create needs epoch 0
        ([*fields[:6], ActionCode.ADD_MEMBER, ["", ALICE.public_identity]], DecodeError),
        ([*fields[:6], ActionCode.ADD_MEMBER, ["x", SMALL_ORDER_KEY]], InvalidKey),
        ([*fields[:6], ActionCode.SET_TITLE, ["x" * 257]], DecodeError),
        ([*fields[:6], ActionCode.SET_ADMIN, ["x", 1]], DecodeError),
    ]:
        with pytest.raises(error):
            ControlMessage.decode(pack([pack(bad), signature]))
    unsorted = [["b", BOB.public_identity], ["a", CAROL.public_identity]]
    create_fields = [fields[0], fields[1], 0, GENESIS_PARENT_HASH, *fields[4:6]]
    with pytest.raises(DecodeError):
        ControlMessage.decode(pack([pack([*create_fields, 0, ["t", unsorted]]), signature]))
    with pytest.raises(DecodeError):
        Welcome.decode(pack([1, sign(group, ALICE, Leave()).encode(), [7]]))
    with pytest.raises(DecodeError):
        Welcome.decode(pack([1, sign(group, ALICE, Leave()).encode(), [b""] * 18]))


@pytest.mark.parametrize(
    "build",
    [
        lambda: Member("", ALICE.public_identity),
        lambda: Member("x", SMALL_ORDER_KEY),
        lambda: SetTitle("x" * 257),
        lambda: SetTitle("\ud800"),
        lambda: SetAdmin("x", 1),  # type: ignore[arg-type]
        lambda: CreateGroup("t", (add_member(CAROL), add_member(BOB))),
        lambda: CreateGroup("t", (add_member(BOB), add_member(BOB))),
        lambda: GroupState(bytes(15), 0, GENESIS_PARENT_HASH, bytes(32), "", ()),
        lambda: GroupState(bytes(16), 0, GENESIS_PARENT_HASH, bytes(32), "", ()),
        lambda: GroupState(bytes(16), 1, GENESIS_PARENT_HASH, bytes(32), "", ()),
        lambda: Group(()),
        lambda: Welcome(add_member(BOB), ()),  # type: ignore[arg-type]
        lambda: ControlMessage(bytes(16), 2**64 - 1, bytes(32), "a", 1, Leave(), bytes(64)),
        lambda: ControlMessage(bytes(16), 1, bytes(32), "a", 1, CreateGroup("", ()), bytes(64)),
        lambda: ControlMessage(bytes(16), 1, bytes(32), "a", 1, Leave(), bytes(63)),
        lambda: ControlMessage(bytes(16), 1, bytes(32), "a", 1, "leave", bytes(64)),  # type: ignore[arg-type]
    ],
)
def test_local_construction_is_validated(build: Any) -> None:
    with pytest.raises(InvalidArgument):
        build()


def test_apply_refuses_bad_local_arguments() -> None:
    group, _ = start(BOB)
    with pytest.raises(InvalidArgument):
        group.apply(sign(group, ALICE, Leave()), DIRECTORY, fork_depth=-1)
    with pytest.raises(InvalidArgument):
        group.apply(b"bytes", DIRECTORY)  # type: ignore[arg-type]


def test_repr_names_no_more_than_public_values() -> None:
    _, update = build_history()
    text = repr(update.group) + repr(update.message)
    assert "epoch=2" in text and "user00" in text


# ------------------------------------------------------------------ hostile input


_, _SAMPLE = build_history()
_SAMPLES = {
    "control": _SAMPLE.message.encode(),
    "state": _SAMPLE.group.current.encode(),
    "welcome": _SAMPLE.group.welcome(_SAMPLE.message).encode(),
    "pickle": _SAMPLE.group.to_bytes(),
}


def decode_any(kind: str, data: bytes) -> object:
    if kind == "control":
        return ControlMessage.decode(data)
    if kind == "state":
        return GroupState.decode(data)
    if kind == "welcome":
        return Welcome.decode(data)
    return Group.from_bytes(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(_SAMPLES)), st.binary(max_size=300))
def test_garbage_raises_only_protocol_errors(kind: str, data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_any(kind, data)


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.sampled_from([bytes(16), bytes(32), ALICE.public_identity, bytes(64)])
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=8),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(_SAMPLES)), _VALUES)
def test_structured_garbage_raises_only_protocol_errors(kind: str, value: Any) -> None:
    for data in (
        pack(value),
        pack([pack(value), bytes(64)]),
        pack([1, pack(value), [pack(value)]]),
    ):
        with contextlib.suppress(ProtocolError):
            decode_any(kind, data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(_SAMPLES)), st.data())
def test_corrupted_encodings_raise_only_protocol_errors(kind: str, data: st.DataObject) -> None:
    sample = bytearray(_SAMPLES[kind])
    position = data.draw(st.integers(0, len(sample) - 1))
    sample[position] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(ProtocolError):
        decoded = decode_any(kind, bytes(sample))
        if isinstance(decoded, ControlMessage):
            # Whatever still decodes never changes a group it does not verify against.
            group = _SAMPLE.group
            before = group.to_bytes()
            with contextlib.suppress(ProtocolError):
                group.apply(decoded, DIRECTORY)
            assert group.to_bytes() == before


# ------------------------------------------------------------------ convergence

# Convergence is tested with unbounded history; the depth limit has its own test.
DEEP = 10_000
USERS = {u.user_id: u for u in POOL}
DEVICES = sorted((u.user_id, d) for u in POOL for d in u.devices)
Device = tuple[str, int]


def best_chain(genesis: GroupState, messages: list[ControlMessage]) -> GroupState:
    """The oracle: from genesis, repeatedly take the valid child with the smallest change id."""
    node = genesis
    while True:
        children = []
        for message in messages:
            if (message.parent_epoch, message.parent_hash) != (node.epoch, node.state_hash):
                continue
            with contextlib.suppress(ProtocolError):
                children.append(Group((node,)).apply(message, DIRECTORY).group.current)
        if not children:
            return node
        node = min(children, key=lambda s: s.change_id)


def deliver_all(group: Group, order: list[ControlMessage]) -> Group:
    """Apply ``order``, retrying stale changes until none applies (as senders retry)."""
    pending = list(order)
    progress = True
    while progress:
        progress = False
        retry = []
        for message in pending:
            try:
                group = group.apply(message, DIRECTORY, fork_depth=DEEP).group
                progress = True
            except StaleChange:
                retry.append(message)
            except DuplicateMessage:
                pass
        pending = retry
    return group


def test_every_delivery_order_converges() -> None:
    group, _ = start(BOB, CAROL, DAVE)
    group = step(group, ALICE, SetAdmin(BOB.user_id, True)).group
    group = step(group, ALICE, SetAdmin(CAROL.user_id, True)).group
    a = sign(group, ALICE, SetTitle("a"))
    b = sign(group, BOB, add_member(ERIN), device_id=2)
    c = sign(group, CAROL, RemoveMember(DAVE.user_id), device_id=3)
    a2 = sign(group.apply(a, DIRECTORY).group, ALICE, SetAdmin(DAVE.user_id, True))
    b2 = sign(group.apply(b, DIRECTORY).group, BOB, SetTitle("b"))
    messages = [a, b, c, a2, b2]
    best = best_chain(group.current, messages)
    assert best.epoch in (group.current.epoch + 1, group.current.epoch + 2)
    finals = {deliver_all(group, list(order)).current for order in permutations(messages)}
    assert finals == {best}


class Replicas:
    """Every device's copy of the group, fed by a relay that reorders, drops and duplicates."""

    def __init__(self) -> None:
        self.groups: dict[Device, Group | None] = dict.fromkeys(DEVICES)
        self.inbox: dict[Device, list[tuple[str, bytes]]] = {d: [] for d in DEVICES}
        # Everything ever sent to each device: the senders' retry log.
        self.sent: dict[Device, list[tuple[str, bytes]]] = {d: [] for d in DEVICES}
        self.messages: list[ControlMessage] = []

    def send(self, kind: str, data: bytes, to: list[Device]) -> None:
        for device in to:
            self.inbox[device].append((kind, data))
            self.sent[device].append((kind, data))

    def publish(self, author: Device, update: GroupUpdate) -> None:
        """The author applied ``update``; it sends the change (and any welcome)."""
        self.groups[author] = update.group
        message = update.message
        self.messages.append(message)
        self.send("control", message.encode(), [d for d in DEVICES if d != author])
        if isinstance(message.action, (AddMember, CreateGroup)):
            welcome = update.group.welcome(message, max_history=DEEP).encode()
            joiners = (
                [m.user_id for m in message.action.members]
                if isinstance(message.action, CreateGroup)
                else [message.action.user_id]
            )
            self.send("welcome", welcome, [d for d in DEVICES if d[0] in joiners])

    def receive(self, device: Device, kind: str, data: bytes) -> bool | None:
        """Process one delivery: True if it changed the group, None if worth retrying later."""
        group = self.groups[device]
        if kind == "welcome":
            welcome = Welcome.decode(data, max_history=DEEP)
            if group is None:
                user = USERS[device[0]]
                self.groups[device] = Group.join(
                    welcome,
                    DIRECTORY,
                    user_id=user.user_id,
                    user_identity=user.public_identity,
                    fork_depth=DEEP,
                ).group
                return True
            message = welcome.message  # a device holding the group applies only the change
        else:
            message = ControlMessage.decode(data)
        if group is None:
            return None
        before = group.to_bytes()
        try:
            update = group.apply(message, DIRECTORY, fork_depth=DEEP)
        except StaleChange:
            assert group.to_bytes() == before
            return None
        except (DuplicateMessage, UnauthorizedChange):
            assert group.to_bytes() == before
            return False
        if update.discarded:
            event("a replica switched to a better fork")
        self.groups[device] = update.group
        return True

    def flush(self) -> None:
        """Senders retry until nothing changes: every message is delivered, in send order."""
        pending = {d: list(items) for d, items in self.sent.items()}
        progress = True
        while progress:
            progress = False
            for device, items in pending.items():
                retry = []
                for kind, data in items:
                    outcome = self.receive(device, kind, data)
                    progress = progress or bool(outcome)
                    if outcome is None:
                        retry.append((kind, data))
                pending[device] = retry


class GroupConvergence(RuleBasedStateMachine):
    """Random admin changes, hostile delivery, then every replica must hold the best chain."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Replicas()
        self.genesis: GroupState | None = None

    @initialize(size=st.integers(3, 10), admins=st.integers(0, 3))
    def create(self, size: int, admins: int) -> None:
        members = POOL[1:size]
        message = create_group(
            title="t",
            members=[add_member(m) for m in members],
            author_user_id=ALICE.user_id,
            author_device_id=1,
            device_key=ALICE.devices[1].identity,
            rng=SeededRandom(b"convergence"),
        )
        update = Group.from_genesis(message, DIRECTORY)
        self.genesis = update.group.current
        self.net.publish((ALICE.user_id, 1), update)
        for member in members[:admins]:
            self.propose_as((ALICE.user_id, 1), SetAdmin(member.user_id, True))
        # A quiet start: everyone gets the group before the relay turns hostile.
        for device, inbox in self.net.inbox.items():
            while inbox:
                self.net.receive(device, *inbox.pop(0))

    def propose_as(self, device: Device, action: Action) -> None:
        group = self.net.groups[device]
        assert group is not None
        user = USERS[device[0]]
        try:
            message = group.propose(
                action,
                author_user_id=user.user_id,
                author_device_id=device[1],
                device_key=user.devices[device[1]].identity,
            )
        except InvalidArgument:
            return  # not allowed in this device's view of the group
        self.net.publish(device, group.apply(message, DIRECTORY, fork_depth=DEEP))

    def holders(self) -> list[Device]:
        return [d for d, g in self.net.groups.items() if g is not None]

    def view(self, device: Device) -> GroupState:
        group = self.net.groups[device]
        assert group is not None
        return group.current

    @rule(data=st.data())
    def propose(self, data: st.DataObject) -> None:
        # Mostly admins (in their own view): their changes are the ones that apply.
        admins = [d for d in self.holders() if d[0] in self.view(d).admins]
        roll: int = data.draw(st.integers(0, 3))
        if admins and roll:
            self.propose_random(data.draw(st.sampled_from(admins)), data)
        else:
            self.propose_random(data.draw(st.sampled_from(self.holders())), data)

    @rule(data=st.data())
    def race(self, data: st.DataObject) -> None:
        """Several admin devices change the group before hearing of each other's change."""
        admins = [d for d in self.holders() if d[0] in self.view(d).admins]
        if len(admins) > 1:
            for device in data.draw(st.lists(st.sampled_from(admins), min_size=2, unique=True)):
                self.propose_random(device, data)

    def propose_random(self, device: Device, data: st.DataObject) -> None:
        members = list(self.view(device).user_ids)
        outsiders = [u.user_id for u in POOL if u.user_id not in members]
        choices: list[Action] = [Leave(), SetTitle(data.draw(st.sampled_from("abcd")))]
        target = data.draw(st.sampled_from(members))
        choices += [RemoveMember(target), SetAdmin(target, True), SetAdmin(target, False)]
        if outsiders:
            choices.append(add_member(USERS[data.draw(st.sampled_from(outsiders))]))
        self.propose_as(device, data.draw(st.sampled_from(choices)))

    def pick(self, data: st.DataObject) -> tuple[Device, int] | None:
        busy = [d for d in DEVICES if self.net.inbox[d]]
        if not busy:
            return None
        device = data.draw(st.sampled_from(busy))
        return device, data.draw(st.integers(0, len(self.net.inbox[device]) - 1))

    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        picked = self.pick(data)
        if picked is not None:
            device, index = picked
            self.net.receive(device, *self.net.inbox[device].pop(index))

    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        picked = self.pick(data)
        if picked is not None:
            device, index = picked
            del self.net.inbox[device][index]

    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        picked = self.pick(data)
        if picked is not None:
            device, index = picked
            self.net.inbox[device].append(self.net.inbox[device][index])

    @rule(data=st.data())
    def relay_forges(self, data: st.DataObject) -> None:
        """The relay injects a change: it is refused and the replica is untouched."""
        device = data.draw(st.sampled_from(self.holders()))
        group = self.net.groups[device]
        assert group is not None
        state = group.current
        outsider = next((u for u in reversed(POOL) if state.member(u.user_id) is None), None)
        ghost: Action = add_member(outsider) if outsider else SetTitle("ghost")
        admin = USERS[state.admins[0]]
        plain = [m for m in state.members if not m.admin]
        kind = data.draw(st.sampled_from(["unsigned", "non-admin", "foreign-key", "outsider"]))
        if kind == "unsigned":
            real = sign(group, admin, ghost)
            forged = ControlMessage(
                real.group_id,
                real.parent_epoch,
                real.parent_hash,
                real.author_user_id,
                real.author_device_id,
                real.action,
                bytes(64),
            )
        elif kind == "non-admin" and plain:
            forged = sign(group, USERS[plain[0].user_id], ghost)
        elif kind == "foreign-key":
            forged = ControlMessage.sign(
                MALLORY_KEY,
                group_id=state.group_id,
                parent_epoch=state.epoch,
                parent_hash=state.state_hash,
                author_user_id=admin.user_id,
                author_device_id=data.draw(st.sampled_from([1, 9])),
                action=ghost,
            )
        elif outsider is not None:
            forged = sign(group, outsider, ghost)
        else:
            return
        before = group.to_bytes()
        with pytest.raises((BadSignature, UnauthorizedChange)):
            group.apply(ControlMessage.decode(forged.encode()), DIRECTORY, fork_depth=DEEP)
        assert group.to_bytes() == before

    def teardown(self) -> None:
        if self.genesis is None:
            return
        self.net.flush()
        best = best_chain(self.genesis, self.net.messages)
        event(f"final epoch >= {best.epoch // 5 * 5}")
        event(f"changes made: >= {len(self.net.messages) // 5 * 5}")
        made = {m.change_id for m in self.net.messages}
        for device, group in self.net.groups.items():
            if device[0] in best.user_ids:
                assert group is not None, device
            if group is not None:
                # Every device that holds the group, member or not, holds the best chain.
                assert group.current == best, device
                assert all(s.change_id in made for s in group.states), "a change nobody made"


GroupConvergence.TestCase.settings = settings(
    max_examples=40, stateful_step_count=50, deadline=None
)
TestGroupConvergence = GroupConvergence.TestCase


@pytest.mark.fuzz
class TestGroupConvergenceFuzz(GroupConvergence.TestCase):  # type: ignore[misc, valid-type]
    """The same machine with a long budget: pytest -m fuzz."""

    settings = settings(max_examples=2000, stateful_step_count=120, deadline=None)
