"""Group membership: signed changes, apply rules, concurrent changes, joiners, encodings."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
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
    GroupState,
    GroupUpdate,
    Leave,
    Member,
    MemberAdded,
    MemberRemoved,
    RemoveMember,
    Replaces,
    SetAdmin,
    SetTitle,
    StateDecodeCache,
    StateRelation,
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


def test_a_joiner_refuses_a_concurrent_change_on_the_state_before_its_add() -> None:
    # BOB's change raced ALICE's add of DAVE and lost: DAVE never applies it.
    group, _ = start(BOB, CAROL)
    group = step(group, ALICE, SetAdmin(BOB.user_id, True)).group
    rival = sign(group, BOB, SetTitle("bob"), device_id=2)
    add = step(group, ALICE, add_member(DAVE))
    joined = Group.join(
        add.group.welcome(add.message),
        DIRECTORY,
        user_id=DAVE.user_id,
        user_identity=DAVE.public_identity,
    ).group
    refused(joined, rival, StaleChange)


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


def test_a_reinit_may_not_name_its_own_group() -> None:
    message = create_group(
        title="t",
        members=[add_member(BOB)],
        author_user_id=ALICE.user_id,
        author_device_id=1,
        device_key=ALICE.devices[1].identity,
        rng=SeededRandom(b"same id"),
        replaces=Replaces(SeededRandom(b"same id").random_bytes(16), 3, bytes(32)),
    )
    with pytest.raises(UnauthorizedChange):
        Group.from_genesis(message, DIRECTORY)
    other = Replaces(bytes(16), 3, bytes(32))
    reinit = create_group(
        title="t",
        members=[add_member(BOB)],
        author_user_id=ALICE.user_id,
        author_device_id=1,
        device_key=ALICE.devices[1].identity,
        rng=SeededRandom(b"other id"),
        replaces=other,
    )
    started = Group.from_genesis(ControlMessage.decode(reinit.encode()), DIRECTORY)
    assert isinstance(started.message.action, CreateGroup)
    assert started.message.action.replaces == other


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
    entry = DeviceEntry.prove(MALLORY_KEY, ALICE.user_id, 1, MALLORY_KEY.public.ed25519)
    fake = DeviceList.initial(ALICE.user_id, MALLORY_KEY.public.ed25519, [entry]).sign(MALLORY_KEY)
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


def test_of_two_concurrent_changes_the_first_applied_wins() -> None:
    group = two_admins()
    a = sign(group, ALICE, add_member(ERIN))
    b = sign(group, BOB, RemoveMember(CAROL.user_id), device_id=2)
    for first, second in ((a, b), (b, a)):
        update = group.apply(first, DIRECTORY)
        # Whatever its change id: members never switch branches.
        refused(update.group, second, StaleChange)
        assert not update.group.builds_ahead(second)


def test_a_smaller_change_id_on_an_ancestor_changes_nothing() -> None:
    # Version 1's fork rule let a change on a held ancestor replace the chain
    # after it when its change id was smaller; any author could grind one.
    group = two_admins()
    before = group
    group = step(group, ALICE, RemoveMember(CAROL.user_id)).group
    group = step(group, ALICE, SetTitle("after")).group
    for author, action, device_id in (
        (DAVE, Leave(), 1),  # no admin
        (CAROL, Leave(), 3),  # removed since
        (BOB, SetTitle("bob"), 2),  # another admin
    ):
        rival = sign(before, author, action, device_id)
        assert before.apply(rival, DIRECTORY)  # valid on the state it was made on
        refused(group, rival, StaleChange)


def test_a_removed_member_authors_nothing() -> None:
    group = two_admins()
    group = step(group, ALICE, RemoveMember(CAROL.user_id)).group
    for action in (Leave(), SetTitle("carol's")):
        refused(group, sign(group, CAROL, action, device_id=3), UnauthorizedChange)


def test_a_change_built_on_a_losing_change_is_stale() -> None:
    group = two_admins()
    a = sign(group, ALICE, SetTitle("a"))
    b = sign(group, BOB, SetTitle("b"), device_id=2)
    on_b = group.apply(b, DIRECTORY).group
    follow_up = sign(on_b, BOB, add_member(ERIN), device_id=2)
    after_a = group.apply(a, DIRECTORY).group
    refused(after_a, follow_up, StaleChange)
    assert not after_a.builds_ahead(follow_up)  # dropped, never held


def test_history_bounds_held_states() -> None:
    group, _ = start(BOB)
    for i in range(consts.MAX_GROUP_HISTORY + 5):
        group = step(group, ALICE, SetTitle(str(i))).group
    assert len(group.states) == consts.MAX_GROUP_HISTORY + 1
    assert group.current.epoch == consts.MAX_GROUP_HISTORY + 5
    short = group.apply(sign(group, ALICE, SetTitle("x")), DIRECTORY, history=2).group
    assert [s.epoch for s in short.states] == [group.epoch - 1, group.epoch, group.epoch + 1]


def test_relation_of_a_senders_state() -> None:
    group = two_admins()
    ancestor = group.current
    group = step(group, ALICE, SetTitle("a")).group
    sibling = group.states[-2]
    other = two_admins().apply(sign(two_admins(), BOB, SetTitle("b"), device_id=2), DIRECTORY)
    assert group.relation(group.epoch, group.state_hash) is StateRelation.CURRENT
    assert group.relation(ancestor.epoch, ancestor.state_hash) is StateRelation.ANCESTOR
    assert group.relation(sibling.epoch, sibling.state_hash) is StateRelation.ANCESTOR
    assert group.relation(group.epoch, other.group.state_hash) is StateRelation.FORKED
    assert group.relation(0, bytes(32)) is StateRelation.FORKED
    assert group.relation(group.epoch + 1, bytes(32)) is StateRelation.AHEAD
    for _ in range(consts.MAX_GROUP_HISTORY + 1):
        group = step(group, ALICE, SetTitle(f"t{group.epoch}")).group
    assert group.relation(ancestor.epoch, ancestor.state_hash) is StateRelation.UNKNOWN
    with pytest.raises(InvalidArgument):
        group.relation(-1, bytes(32))
    with pytest.raises(InvalidArgument):
        group.relation(0, bytes(31))


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
    CreateGroup("reinit", (add_member(BOB),), Replaces(bytes(range(16)), 2**64 - 1, bytes(32))),
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
        consts.GROUP_VERSION,
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
        consts.GROUP_VERSION,
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
        GroupState.decode(pack([consts.PROTOCOL_VERSION + 1, *fields[1:]]), cache=warm)
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
        GroupState.decode(pack([consts.PROTOCOL_VERSION + 1, *state[1:]]))
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
        Welcome.decode(pack([consts.GROUP_VERSION, sign(group, ALICE, Leave()).encode(), [7]]))
    leave = sign(group, ALICE, Leave()).encode()
    with pytest.raises(DecodeError):
        Welcome.decode(pack([consts.GROUP_VERSION, leave, [b""] * 18]))


def test_version_1_changes_and_welcomes_are_refused() -> None:
    # Version 1 members follow the fork rule: a member never mixes the two.
    group, _ = start(BOB)
    body, signature = unpack(sign(group, ALICE, Leave()).encode(), what="test")
    old = pack([pack([1, *unpack(body, what="test")[1:]]), signature])
    with pytest.raises(UnknownVersion):
        ControlMessage.decode(old)
    with pytest.raises(UnknownVersion):
        Welcome.decode(pack([1, sign(group, ALICE, Leave()).encode(), []]))


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
        lambda: Replaces(bytes(15), 0, bytes(32)),
        lambda: Replaces(bytes(16), -1, bytes(32)),
        lambda: CreateGroup("t", (), replaces=(bytes(16), 0, bytes(32))),  # type: ignore[arg-type]
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
        group.apply(sign(group, ALICE, Leave()), DIRECTORY, history=-1)
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
        pack([consts.PROTOCOL_VERSION, pack(value), [pack(value)]]),
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


# ------------------------------------------------------------------ sequencing

# The model keeps every state (the depth limit has its own test).
DEEP = 10_000
USERS = {u.user_id: u for u in POOL}
DEVICES = sorted((u.user_id, d) for u in POOL for d in u.devices)
Device = tuple[str, int]


@dataclass(frozen=True)
class Entry:
    """One item of the relay's log: a change sent to ``to``, a receipt, or a welcome."""

    kind: str  # "change" (to every member device but the author's), "receipt", "welcome"
    data: bytes
    to: frozenset[Device]


def canonical(genesis: Group, log: list[Entry]) -> GroupState:
    """The oracle: the log's changes in the relay's order, each applied if it fits then."""
    group = genesis
    for entry in log:
        if entry.kind == "change":
            with contextlib.suppress(ProtocolError):
                group = group.apply(
                    ControlMessage.decode(entry.data), DIRECTORY, history=DEEP
                ).group
    return group.current


class Replica:
    """One device's copy of the group, as ClientCore keeps it (spec 12.7)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.group: Group | None = None
        self.candidate: ControlMessage | None = None  # our change, until its receipt
        self.held: list[ControlMessage] = []  # changes that build ahead, or before our welcome
        self.inbox: list[int] = []  # log positions still to deliver, in the relay's order
        self.history: list[GroupState] = []  # every state this device went through

    def take(self, update: GroupUpdate) -> None:
        group = update.group
        previous = self.group.current if self.group is not None else None
        state = group.current
        if previous is not None:
            # Never another branch: each state is the child of the one before.
            assert (state.epoch, state.prev_hash) == (previous.epoch + 1, previous.state_hash)
            added = {e.user_id for e in update.events if isinstance(e, MemberAdded)}
            action = update.message.action
            # Nobody (back) in without an admin's add.
            assert added <= ({action.user_id} if isinstance(action, AddMember) else set())
            author = previous.member(update.message.author_user_id)
            assert author is not None and (author.admin or isinstance(action, Leave))
        self.history.append(state)
        self.group = group if state.member(self.device[0]) is not None else None
        if self.group is None:
            self.candidate = None

    def apply(self, message: ControlMessage) -> None:
        """Apply a change, or hold it; then whatever held change now fits."""
        if self.group is None:
            self.held.append(message)
            return
        try:
            self.take(self.group.apply(message, DIRECTORY, history=DEEP))
        except StaleChange:
            if self.group.builds_ahead(message):
                self.held.append(message)
            return
        except (DuplicateMessage, UnauthorizedChange):
            return
        self.apply_held()

    def apply_held(self) -> None:
        progress = True
        while progress and self.group is not None:
            progress = False
            for message in list(self.held):
                try:
                    update = self.group.apply(message, DIRECTORY, history=DEEP)
                except StaleChange:
                    if self.group.builds_ahead(message):
                        continue
                except ProtocolError:
                    pass
                else:
                    self.take(update)
                    progress = True
                self.held.remove(message)
                if self.group is None:
                    return


class GroupSequencing(RuleBasedStateMachine):
    """Concurrent changes by several admins and members, ordered by the relay.

    Every change goes into one log (the relay's order); each device receives
    its entries from its inbox, in that order. The relay duplicates entries
    and injects forgeries and changes on old states (any id: ground or not);
    a hostile one also withholds entries and delivers out of order, which
    splits members. At the end it delivers what is left. Invariants: no
    device ever switches branches or lets a user in without an admin's add
    (checked at every step, hostile or not); with a relay that keeps its
    order, every device holds the log's state applied in that order, or is
    out of the group if that state does not list it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.members = {d: Replica(d) for d in DEVICES}
        self.log: list[Entry] = []
        self.genesis: Group | None = None
        self.hostile = False

    # ---------------------------------------------------------------- the relay

    def send(self, kind: str, data: bytes, to: set[Device]) -> int:
        self.log.append(Entry(kind, data, frozenset(to)))
        for device in to:
            self.members[device].inbox.append(len(self.log) - 1)
        return len(self.log) - 1

    def devices(self, *states: GroupState) -> set[Device]:
        users = {u for s in states for u in s.user_ids}
        return {d for d in DEVICES if d[0] in users}

    def receive(self, device: Device, position: int) -> None:
        member = self.members[device]
        entry = self.log[position]
        if entry.kind == "receipt":
            candidate = member.candidate
            if candidate is not None and candidate.encode() == entry.data:
                member.candidate = None
                self.commit(member, candidate)
        elif entry.kind == "welcome":
            welcome = Welcome.decode(entry.data, max_history=DEEP)
            if member.group is not None:
                member.apply(welcome.message)
                return
            user = USERS[device[0]]
            member.take(
                Group.join(
                    welcome,
                    DIRECTORY,
                    user_id=user.user_id,
                    user_identity=user.public_identity,
                    history=DEEP,
                )
            )
            member.apply_held()
        else:
            member.apply(ControlMessage.decode(entry.data))

    def commit(self, member: Replica, candidate: ControlMessage) -> None:
        """Our change came first for its epoch (or lost: then it is dropped)."""
        group = member.group
        if group is None:
            return
        try:
            update = group.apply(candidate, DIRECTORY, history=DEEP)
        except StaleChange:
            event("a change lost the race for its epoch")
            return
        member.take(update)
        action = candidate.action
        if isinstance(action, AddMember):
            joiners = {d for d in DEVICES if d[0] == action.user_id}
            welcome = update.group.welcome(candidate, max_history=DEEP).encode()
            self.send("welcome", welcome, joiners)
        member.apply_held()

    # ---------------------------------------------------------------- members

    @initialize(size=st.integers(3, 7), admins=st.integers(0, 3), hostile=st.booleans())
    def create(self, size: int, admins: int, hostile: bool) -> None:
        members = POOL[1:size]
        message = create_group(
            title="t",
            members=[add_member(m) for m in members],
            author_user_id=ALICE.user_id,
            author_device_id=1,
            device_key=ALICE.devices[1].identity,
            rng=SeededRandom(b"sequencing"),
        )
        update = Group.from_genesis(message, DIRECTORY)
        self.genesis = update.group
        for device in self.devices(update.group.current):
            if device == (ALICE.user_id, 1):
                self.members[device].take(update)
        welcome = update.group.welcome(message).encode()
        self.send("welcome", welcome, self.devices(update.group.current) - {(ALICE.user_id, 1)})
        for member in members[:admins]:
            self.propose_as((ALICE.user_id, 1), SetAdmin(member.user_id, True))
        self.deliver_everything()  # a quiet start, before the relay turns hostile
        self.hostile = hostile

    def holders(self) -> list[Device]:
        return [d for d, m in self.members.items() if m.group is not None]

    def propose_as(self, device: Device, action: Action) -> None:
        member = self.members[device]
        if member.group is None or member.candidate is not None:
            return
        user = USERS[device[0]]
        try:
            message = member.group.propose(
                action,
                author_user_id=user.user_id,
                author_device_id=device[1],
                device_key=user.devices[device[1]].identity,
            )
        except InvalidArgument:
            return  # not allowed in this device's view of the group
        member.candidate = message
        after = member.group.apply(message, DIRECTORY).group.current
        # One relay send: the change to every device, and the author's receipt, in one place.
        self.send("change", message.encode(), self.devices(member.group.current, after) - {device})
        self.send("receipt", message.encode(), {device})

    def random_action(self, device: Device, data: st.DataObject) -> Action:
        member = self.members[device]
        assert member.group is not None
        state = member.group.current
        outsiders = [u.user_id for u in POOL if state.member(u.user_id) is None]
        target = data.draw(st.sampled_from(state.user_ids))
        choices: list[Action] = [Leave(), SetTitle(data.draw(st.sampled_from("abcd")))]
        choices += [RemoveMember(target), SetAdmin(target, True), SetAdmin(target, False)]
        if outsiders:
            choices.append(add_member(USERS[data.draw(st.sampled_from(outsiders))]))
        return data.draw(st.sampled_from(choices))

    @rule(data=st.data())
    def propose(self, data: st.DataObject) -> None:
        holders = self.holders()
        if holders:
            admins = [d for d in holders if d[0] in self.view(d).admins]
            pool = admins if admins and data.draw(st.integers(0, 3)) != 0 else holders
            device = data.draw(st.sampled_from(pool))
            self.propose_as(device, self.random_action(device, data))

    @rule(data=st.data())
    def race(self, data: st.DataObject) -> None:
        """Several devices change the group before hearing of each other's change."""
        holders = self.holders()
        if len(holders) > 1:
            for device in data.draw(st.lists(st.sampled_from(holders), min_size=2, unique=True)):
                self.propose_as(device, self.random_action(device, data))

    def view(self, device: Device) -> GroupState:
        group = self.members[device].group
        assert group is not None
        return group.current

    # ---------------------------------------------------------------- delivery

    def pick(self, data: st.DataObject) -> tuple[Replica, int] | None:
        busy = [m for m in self.members.values() if m.inbox]
        if not busy:
            return None
        member = data.draw(st.sampled_from(busy))
        return member, data.draw(st.integers(0, len(member.inbox) - 1))

    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        """In the relay's order; a hostile relay sometimes delivers a later entry first."""
        picked = self.pick(data)
        if picked is not None:
            member, index = picked
            if not self.hostile or data.draw(st.integers(0, 3)):
                index = 0
            self.receive(member.device, member.inbox.pop(index))

    @rule(data=st.data())
    def withhold(self, data: st.DataObject) -> None:
        picked = self.pick(data) if self.hostile else None
        if picked is not None:
            member, index = picked
            del member.inbox[index]

    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        picked = self.pick(data)
        if picked is not None:
            member, index = picked
            member.inbox.append(member.inbox[index])

    @rule(data=st.data())
    def grind_on_an_old_state(self, data: st.DataObject) -> None:
        """Someone who was a member of an old state signs a change on it, whatever its id."""
        states = [s for m in self.members.values() for s in m.history[:-1]]
        if not states:
            return
        old = data.draw(st.sampled_from(states))
        author = USERS[data.draw(st.sampled_from(old.user_ids))]
        device_id = data.draw(st.sampled_from(sorted(author.devices)))
        action: Action = Leave() if data.draw(st.booleans()) else SetTitle("rewound")
        message = ControlMessage.sign(
            author.devices[device_id].identity,
            group_id=old.group_id,
            parent_epoch=old.epoch,
            parent_hash=old.state_hash,
            author_user_id=author.user_id,
            author_device_id=device_id,
            action=action,
        )
        self.send("change", message.encode(), set(DEVICES) - {(author.user_id, device_id)})

    @rule(data=st.data())
    def relay_forges(self, data: st.DataObject) -> None:
        """The relay makes up a change: refused, the copy untouched."""
        holders = self.holders()
        if not holders:
            return
        group = self.members[data.draw(st.sampled_from(holders))].group
        assert group is not None
        state = group.current
        outsider = next((u for u in reversed(POOL) if state.member(u.user_id) is None), None)
        ghost: Action = add_member(outsider) if outsider else SetTitle("ghost")
        admin = USERS[state.admins[0]]
        kind = data.draw(st.sampled_from(["restamped", "non-admin", "foreign-key", "outsider"]))
        plain = [m for m in state.members if not m.admin]
        if kind == "restamped":
            # An admin's change claimed by another member's device: the signature fails.
            real = sign(group, admin, ghost)
            others = [u for u in state.user_ids if u != admin.user_id]
            if not others:
                return
            other = USERS[data.draw(st.sampled_from(others))]
            forged = ControlMessage(
                real.group_id,
                real.parent_epoch,
                real.parent_hash,
                other.user_id,
                1,
                real.action,
                real.signature,
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
            group.apply(ControlMessage.decode(forged.encode()), DIRECTORY, history=DEEP)
        assert group.to_bytes() == before

    def deliver_everything(self) -> None:
        """The relay delivers what is left, in its order."""
        while any(m.inbox for m in self.members.values()):
            for member in self.members.values():
                while member.inbox:
                    self.receive(member.device, member.inbox.pop(0))

    def teardown(self) -> None:
        if self.genesis is None:
            return
        self.deliver_everything()
        expected = canonical(self.genesis, self.log)
        event(f"final epoch >= {expected.epoch // 3 * 3}")
        if self.hostile:
            views = {m.group.current.state_hash for m in self.members.values() if m.group}
            event(f"a hostile relay left {min(len(views), 3)} (or more) branches")
            return
        for device, member in self.members.items():
            # The relay's order, nothing withheld: the log's state, or out of the group.
            if device[0] in expected.user_ids:
                assert member.group is not None and member.group.current == expected, device
            else:
                assert member.group is None, device


GroupSequencing.TestCase.settings = settings(max_examples=40, stateful_step_count=50, deadline=None)
TestGroupSequencing = GroupSequencing.TestCase


@pytest.mark.fuzz
class TestGroupSequencingFuzz(GroupSequencing.TestCase):  # type: ignore[misc, valid-type]
    """The same machine with a long budget: pytest -m fuzz."""

    settings = settings(max_examples=2000, stateful_step_count=120, deadline=None)
