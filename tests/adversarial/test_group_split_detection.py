"""Split detection: members holding different states of one group notice it from its messages.

An admin that signs two changes on one state, or a relay that withholds a
change from some members, leaves members on different states of a group;
every group message carries its sender's (epoch, state hash), so a receiver
whose state differs is told (GroupStateMismatch, spec/04-sender-keys.md
section 4.9): at once for a split (FORKED) and for a sender ahead that no
change the receiver holds explains (a withheld change), once per sender,
state and relation. A sender ahead because of a change the receiver holds
but cannot apply yet raises no alarm. ClientCore on the in-memory relay of
tests/support/harness.py.
"""

from __future__ import annotations

from hushchat.protocol.client_core import (
    Address,
    GroupStateMismatch,
    GroupUpdated,
    MessageReceived,
)
from hushchat.protocol.content import GroupControl
from hushchat.protocol.group import ControlMessage, Group, GroupState, SetTitle
from tests.support.harness import CONTROL, A, Network


def quartet(net: Network) -> bytes:
    for user_id in ("alice", "bob", "carol", "dave"):
        net.add_user(user_id)
    group_id, _ = net.create_group(A("alice"), "friends", ["bob", "carol", "dave"])
    net.deliver_all()
    return group_id


def signed_by_alice(net: Network, on: GroupState, title: str) -> ControlMessage:
    """A title change alice's device signs on ``on``, outside her client (never applied there)."""
    alice = net.core(A("alice"))
    return Group((on,)).propose(
        SetTitle(title),
        author_user_id="alice",
        author_device_id=1,
        device_key=alice.account.identity,
    )


def hand(net: Network, change: ControlMessage, to: Address) -> tuple[object, ...]:
    """Alice's device sends ``change`` to ``to`` alone; the events it caused there."""
    content = GroupControl(change.encode(), None).encode()
    return net.receive(net.inject_content(A("alice"), to, content)).events


def state(net: Network, address: Address, group_id: bytes) -> GroupState:
    return net.core(address).group(group_id)


def mismatches(net: Network, address: Address) -> list[GroupStateMismatch]:
    return [e for e in net.events[address] if isinstance(e, GroupStateMismatch)]


def mismatch(
    group_id: bytes, sender: Address, relation: str, theirs: GroupState, ours: GroupState
) -> GroupStateMismatch:
    return GroupStateMismatch(
        group_id,
        sender,
        relation,
        theirs.epoch,
        theirs.state_hash,
        ours.epoch,
        ours.state_hash,
    )


def test_an_admin_who_equivocates_is_noticed_at_the_next_message(net: Network) -> None:
    group_id = quartet(net)
    start = state(net, A("alice"), group_id)
    # Alice signs two changes on one state: bob gets one, carol the other.
    hand(net, signed_by_alice(net, start, "party"), A("bob"))
    hand(net, signed_by_alice(net, start, "no party"), A("carol"))
    bob, carol = state(net, A("bob"), group_id), state(net, A("carol"), group_id)
    assert bob.epoch == carol.epoch and bob.state_hash != carol.state_hash
    net.send_group(A("bob"), group_id, b"see you at the party")
    net.deliver_all()
    # The message is delivered, and carol is told bob holds another state.
    assert [e.body for e in net.events[A("carol")] if isinstance(e, MessageReceived)] == [
        b"see you at the party"
    ]
    assert mismatches(net, A("carol")) == [mismatch(group_id, A("bob"), "forked", bob, carol)]
    # Once per sender and state: bob's next messages say nothing new, even after a reload.
    net.reload(A("carol"))
    net.send_group(A("bob"), group_id, b"really")
    net.deliver_all()
    assert len(mismatches(net, A("carol"))) == 1
    # Carol's message tells bob the same from his side.
    net.send_group(A("carol"), group_id, b"no party for me")
    net.deliver_all()
    assert mismatches(net, A("bob")) == [mismatch(group_id, A("carol"), "forked", carol, bob)]
    # Alice and dave, on the state both changes were signed on, never got either: for
    # them bob and carol are ahead, by a change no one delivered to them.
    for address in (A("alice"), A("dave")):
        assert {(m.sender, m.relation) for m in mismatches(net, address)} == {
            (A("bob"), "ahead"),
            (A("carol"), "ahead"),
        }


def test_a_sender_ahead_on_another_branch_is_reported_again_as_a_split(net: Network) -> None:
    group_id = quartet(net)
    start = state(net, A("alice"), group_id)
    hand(net, signed_by_alice(net, start, "party"), A("bob"))
    hand(net, signed_by_alice(net, state(net, A("bob"), group_id), "party at 8"), A("bob"))
    hand(net, signed_by_alice(net, start, "no party"), A("carol"))
    # Bob is two changes past the start, carol one (another one): bob is ahead of her,
    # and she holds nothing that could bring her there.
    net.send_group(A("bob"), group_id, b"at 8 then")
    net.deliver_all()
    bob = state(net, A("bob"), group_id)
    assert mismatches(net, A("carol")) == [
        mismatch(group_id, A("bob"), "ahead", bob, state(net, A("carol"), group_id))
    ]
    # Carol gets a second change on her branch: both hold epoch 2, and differ.
    events = hand(
        net, signed_by_alice(net, state(net, A("carol"), group_id), "still no"), A("carol")
    )
    carol = state(net, A("carol"), group_id)
    assert (bob.epoch, carol.epoch) == (start.epoch + 2, start.epoch + 2)
    assert isinstance(events[0], GroupUpdated)
    assert events[1:] == (mismatch(group_id, A("bob"), "forked", bob, carol),)


def test_a_withheld_change_is_noticed_and_forgotten_once_it_arrives(net: Network) -> None:
    group_id = quartet(net)
    envelopes = net.remove_member(A("alice"), group_id, "dave")
    [to_carol] = [e for e in envelopes if e.label == CONTROL and e.recipient == A("carol")]
    net.in_flight.remove(to_carol)
    net.deliver_all()
    # The relay keeps alice's removal of dave from carol: bob's next message shows it.
    net.send_group(A("bob"), group_id, b"dave is gone")
    net.send_group(A("carol"), group_id, b"hi dave")
    net.deliver_all()
    bob = state(net, A("bob"), group_id)
    carol_before = state(net, A("carol"), group_id)
    assert mismatches(net, A("carol")) == [mismatch(group_id, A("bob"), "ahead", bob, carol_before)]
    # Carol is behind, not split: those ahead of her hear nothing wrong.
    assert all(mismatches(net, a) == [] for a in (A("alice"), A("bob")))
    # The change arrives: carol holds bob's state, and his messages are fine again.
    net.receive(to_carol)
    net.send_group(A("bob"), group_id, b"agreed")
    net.deliver_all()
    assert len(mismatches(net, A("carol"))) == 1
    assert state(net, A("carol"), group_id) == bob


def test_a_change_held_for_the_one_before_it_explains_a_sender_ahead(net: Network) -> None:
    group_id = quartet(net)
    first = net.remove_member(A("alice"), group_id, "dave")
    [first_to_carol] = [e for e in first if e.label == CONTROL and e.recipient == A("carol")]
    net.in_flight.remove(first_to_carol)
    second = net.change_group(A("alice"), group_id, SetTitle("without dave"))
    [second_to_carol] = [e for e in second if e.label == CONTROL and e.recipient == A("carol")]
    net.in_flight.remove(second_to_carol)
    net.deliver_all()
    # The relay hands carol the second change first: she holds it, waiting for the first.
    net.receive(second_to_carol)
    net.send_group(A("bob"), group_id, b"two changes on")
    to_carol = [e for e in net.in_flight if e.recipient == A("carol")]
    events = [event for envelope in to_carol for event in net.deliver(envelope).events]
    assert [type(e) for e in events] == [MessageReceived]
    # The first change arrives; both apply, and carol holds what bob claimed.
    applied = net.receive(first_to_carol).events
    assert [type(e) for e in applied] == [GroupUpdated, GroupUpdated]
    net.deliver_all()
    assert all(mismatches(net, a) == [] for a in net.devices)
    assert state(net, A("carol"), group_id) == state(net, A("bob"), group_id)
