"""A device holds a bounded number of groups: a stranger, or a member, attacks its storage.

Anyone who can open a session with a device can send it a welcome: a group
the stranger creates with the device as a member. Each group a device holds
is a stored record (a snapshot of up to MAX_GROUP_MEMBERS members, and
MAX_GROUP_HISTORY states behind it), so without a bound a sybil fills the
device's disk one welcome at a time. Played with the real ClientCore on the
in-memory relay of tests/support/harness.py.
"""

from __future__ import annotations

import pytest

from hushchat.protocol.client_core import Address, RecordKey, Undecryptable
from hushchat.protocol.consts import MAX_GROUPS
from hushchat.protocol.errors import InvalidState
from hushchat.protocol.group import AddMember, Leave, Replaces
from hushchat.protocol.primitives import SeededRandom
from tests.support.harness import A, Network, full_state


def welcomes_from(net: Network, author: str, member: str, count: int) -> list[bytes]:
    """``author`` creates ``count`` groups with ``member``; every welcome delivered."""
    group_ids = []
    for n in range(count):
        group_id, _ = net.create_group(A(author), f"spam {n}", [member])
        net.deliver_all()
        group_ids.append(group_id)
    return group_ids


def reinit(net: Network, author: Address, group_id: bytes, *, as_admin: bool = True) -> bytes:
    """``author`` continues ``group_id`` in a new group. A member who is no admin has
    its own (hostile) client build the reinit the library would refuse to build."""
    core = net.core(author)
    current = core.group(group_id)
    net.ensure_sessions(author, core.membership_needs(current.user_ids, now=net.now))
    if as_admin:
        new_group, sends = core.reinit_group(group_id, now=net.tick())
    else:
        adds = [AddMember(m.user_id, m.user_identity) for m in current.members]
        adds = [a for a in adds if a.user_id != author.user_id]
        replaces = Replaces(group_id, current.epoch, current.state_hash)
        new_group, sends = core._membership._create("mine now", adds, replaces, net.tick())
    net.persist(author)
    net._enqueue_all(author, sends)
    return new_group


def test_a_stranger_cannot_make_a_device_hold_more_than_max_groups() -> None:
    # Without persistence checks: they reload every record after each step.
    net = Network(SeededRandom(b"group count bound".ljust(32, b".")), check_persistence=False)
    net.add_user("bob")
    net.add_user("mallory")
    net.core(A("mallory"))._state.max_groups = 2 * MAX_GROUPS  # her own client has no limit
    group_ids = welcomes_from(net, "mallory", "bob", MAX_GROUPS)
    bob = net.core(A("bob"))
    assert len(bob.group_ids) == MAX_GROUPS
    extra, _ = net.create_group(A("mallory"), "one too many", ["bob"])
    deliveries = net.deliver_all()
    assert [e for d in deliveries for e in d.events] == [
        Undecryptable(A("mallory"), "TOO_MANY_GROUPS")
    ]
    assert extra not in bob.group_ids
    assert set(bob.group_ids) == set(group_ids)


def test_a_refused_welcome_stores_nothing_and_a_left_group_makes_room(net: Network) -> None:
    net.add_user("bob")
    net.add_user("mallory")
    net.add_user("alice")
    bob = net.core(A("bob"))
    bob._state.max_groups = 2  # the ClientCore parameter max_groups
    first, second = welcomes_from(net, "mallory", "bob", 2)
    net.create_group(A("alice"), "refused", ["bob"])
    [welcome] = [e for e in net.in_flight if e.recipient == A("bob")]
    net.in_flight.remove(welcome)
    net.receive(welcome)  # alice's first message: the session it came in is new
    before = full_state(bob)
    net.create_group(A("alice"), "refused again", ["bob"])
    assert [e for d in net.deliver_all() for e in d.events] == [
        Undecryptable(A("alice"), "TOO_MANY_GROUPS")
    ]
    after = full_state(bob)
    changed = {k for k in after.keys() | before.keys() if after.get(k) != before.get(k)}
    assert changed == {RecordKey.session(A("alice"))}  # the ratchet moved, nothing else
    net.change_group(A("bob"), first, Leave())
    net.deliver_all()
    [room] = welcomes_from(net, "alice", "bob", 1)
    assert set(bob.group_ids) == {second, room}


def test_an_admins_reinit_replaces_a_held_group_at_the_limit(net: Network) -> None:
    net.add_user("bob")
    net.add_user("alice")
    bob = net.core(A("bob"))
    bob._state.max_groups = 1
    [old] = welcomes_from(net, "alice", "bob", 1)
    new = reinit(net, A("alice"), old)
    net.deliver_all()
    assert bob.group_ids == (new,)


def test_a_member_cannot_pass_the_limit_by_claiming_to_replace_a_group(net: Network) -> None:
    """A reinit replaces a group only when its author is an admin there; a member's
    claim to replace one would otherwise add a group past the limit, again and again."""
    net.add_user("bob")
    net.add_user("alice")
    net.add_user("mallory")
    bob = net.core(A("bob"))
    [old] = welcomes_from(net, "alice", "bob", 1)
    net.add_member(A("alice"), old, "mallory")
    net.deliver_all()
    bob._state.max_groups = 1
    reinit(net, A("mallory"), old, as_admin=False)
    events = [e for d in net.deliver_all() if d.envelope.recipient == A("bob") for e in d.events]
    assert Undecryptable(A("mallory"), "TOO_MANY_GROUPS") in events
    assert bob.group_ids == (old,)


def test_creating_a_group_past_the_limit_is_refused_and_changes_nothing(net: Network) -> None:
    net.add_user("bob")
    bob = net.core(A("bob"))
    bob._state.max_groups = 1
    welcomes_from(net, "bob", "bob", 0)
    net.create_group(A("bob"), "mine", [])
    before = full_state(bob)
    with pytest.raises(InvalidState):
        bob.create_group("one too many", [], now=net.tick())
    assert full_state(bob) == before
