"""A hostile relay splits a group; members detect it and an admin brings them back to one state.

Two admins change the group at once and the relay delivers the two changes
in different orders to different members: each member applies the first it
gets and refuses the other, so the group splits into two branches (spec
12-groups.md, section 12.9). It cannot make anyone switch branches, apply a
change it did not get, or rewind. Members notice from the state a sender
names (Group.relation; carried by every group message, spec 04): FORKED.
The way back is a reinit: an admin continues the group in a new one with
the members it holds, and every member that holds it as an admin moves
there (GroupReplaced). Runs ClientCores on the in-memory relay of
tests/support/harness.py.
"""

from __future__ import annotations

import pytest

from hushchat.protocol.client_core import (
    Address,
    GroupReplaced,
    GroupUpdated,
    MessageReceived,
    Undecryptable,
)
from hushchat.protocol.errors import InvalidArgument
from hushchat.protocol.group import SetAdmin, SetTitle, StateRelation
from hushchat.protocol.primitives import SeededRandom
from tests.support.harness import CONTROL, Network


def A(user_id: str, device_id: int = 1) -> Address:
    return Address(user_id, device_id)


@pytest.fixture
def net(request: pytest.FixtureRequest) -> Network:
    return Network(SeededRandom(request.node.nodeid.encode()))


def split(net: Network) -> bytes:
    """alice and bob (admins), carol and dave; alice and carol end on one branch, bob and
    dave on another: the relay hands each side its own admin's change first."""
    for user_id in ("alice", "bob", "carol", "dave"):
        net.add_user(user_id)
    group_id, _ = net.create_group(A("alice"), "friends", ["bob", "carol", "dave"])
    net.deliver_all()
    net.change_group(A("alice"), group_id, SetAdmin("bob", True))
    net.deliver_all()
    for user_id in ("alice", "bob", "carol", "dave"):
        net.send_group(A(user_id), group_id, b"hello")
    net.deliver_all()
    net.change_group(A("alice"), group_id, SetTitle("alice's"), settle=False)
    net.change_group(A("bob"), group_id, SetTitle("bob's"), settle=False)
    side = {"alice": "alice", "carol": "alice", "bob": "bob", "dave": "bob"}
    # Each device first gets what its side's admin sent (its receipt included), then the rest.
    for first in (True, False):
        for envelope in list(net.in_flight):
            if (envelope.sender.user_id == side[envelope.recipient.user_id]) == first:
                net.deliver(envelope)
    return group_id


def test_a_split_is_detected_from_the_state_a_sender_names(net: Network) -> None:
    group_id = split(net)
    views = {u: net.core(A(u)).group(group_id) for u in ("alice", "bob", "carol", "dave")}
    assert views["alice"] == views["carol"] and views["bob"] == views["dave"]
    assert views["alice"] != views["bob"] and views["alice"].epoch == views["bob"].epoch
    # No branch switched: the other side's change was refused as stale everywhere.
    refused = [
        e
        for d in net.delivered
        for e in d.events
        if isinstance(e, Undecryptable) and e.reason == "STALE_CHANGE"
    ]
    assert len(refused) == 4  # every device refused the other side's change
    carol = net.core(A("carol"))._state.groups[group_id]
    assert carol.relation(views["dave"].epoch, views["dave"].state_hash) is StateRelation.FORKED
    assert carol.relation(views["alice"].epoch, views["alice"].state_hash) is (
        StateRelation.CURRENT
    )


def test_a_reinit_by_an_admin_brings_every_member_back_to_one_group(net: Network) -> None:
    group_id = split(net)
    envelopes_before = len(net.delivered)
    new_group = _reinit(net, A("bob"), group_id)
    for address in (A("alice"), A("bob"), A("carol"), A("dave")):
        core = net.core(address)
        assert core.group_ids == (new_group,), address
        assert core.group(new_group).title == "bob's"
    moved = {
        d.envelope.recipient.user_id
        for d in net.delivered[envelopes_before:]
        for e in d.events
        if isinstance(e, GroupReplaced) and e == GroupReplaced(group_id, new_group, A("bob"))
    }
    assert moved == {"alice", "carol", "dave"}
    # One group again: everyone reads everyone.
    net.send_group(A("carol"), new_group, b"together again")
    readers = {
        d.envelope.recipient.user_id
        for d in net.deliver_all()
        for e in d.events
        if isinstance(e, MessageReceived) and e.body == b"together again"
    }
    assert readers == {"alice", "bob", "dave"}


def _reinit(net: Network, admin: Address, group_id: bytes) -> bytes:
    core = net.core(admin)
    net.ensure_sessions(admin, core.membership_needs(core.group(group_id).user_ids, now=net.now))
    new_group, sends = core.reinit_group(group_id, now=net.tick())
    net.persist(admin)
    net._enqueue_all(admin, sends)
    net.deliver_all()
    return new_group


def test_only_an_admin_reinitializes(net: Network) -> None:
    group_id = split(net)
    with pytest.raises(InvalidArgument, match="only an admin"):
        net.core(A("carol")).reinit_group(group_id, now=net.tick())


def test_a_reinit_by_a_removed_admin_replaces_nothing_for_those_who_removed_him(
    net: Network,
) -> None:
    # alice removes bob on her side; bob's reinit from his side moves dave (who holds bob
    # as an admin) but not alice or carol, for whom bob is no longer a member: for them
    # it is only a new group, held beside the old one.
    group_id = split(net)
    net.remove_member(A("alice"), group_id, "bob")
    net.deliver_all()
    assert "bob" not in net.core(A("carol")).group(group_id).user_ids
    new_group = _reinit(net, A("bob"), group_id)
    assert group_id in net.core(A("alice")).group_ids
    assert group_id in net.core(A("carol")).group_ids
    assert net.core(A("dave")).group_ids == (new_group,)
    joined = [
        e
        for e in net.events[A("carol")]
        if isinstance(e, GroupUpdated) and e.group_id == new_group and e.joined
    ]
    assert len(joined) == 1
    assert not any(isinstance(e, GroupReplaced) for e in net.events[A("carol")])


def test_across_a_split_a_removed_member_reads_nothing_sent_after_its_removal(
    net: Network,
) -> None:
    # alice removes dave on her side, and the relay withholds the removal from bob and
    # dave: whoever applied the removal sends nothing dave can read.
    group_id = split(net)
    net.remove_member(A("alice"), group_id, "dave", settle=False)
    withheld = net.take(recipient=A("bob")) + net.take(recipient=A("dave"))
    assert {e.label for e in withheld} == {CONTROL}
    net.deliver_all()
    assert "dave" not in net.core(A("carol")).group(group_id).user_ids
    net.send_group(A("carol"), group_id, b"not for dave")
    readers = {
        d.envelope.recipient.user_id
        for d in net.deliver_all()
        for e in d.events
        if isinstance(e, MessageReceived) and e.body == b"not for dave"
    }
    assert readers == {"alice", "bob"}
