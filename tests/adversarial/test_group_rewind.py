"""Rewinding a group by grinding a change id: the attacks, played with ClientCores.

Until group version 2 a member followed the "best chain" (spec 12.4 of
group version 1): a change on a held ancestor replaced the chain after it when its
change id was smaller. The author of a change chooses free fields, here its
``author_device_id``: it computes change ids for thousands of device ids
(the id is a hash of the unsigned body, so the search costs one SHA-256 a
try), links a device under the best id by signing a new device list for
itself, and signs the change with that device. With it:

* a member who is no admin signs ``leave`` on the state before an admin's
  removal of its accomplice, and every member drops the removal: the removed
  user is a member again and reads what is sent next;
* a member already removed signs ``leave`` on a state from before its own
  removal and undoes a later removal of someone else;
* an admin undoes another admin's change the same way.

Each test plays the attack against ClientCores on the in-memory relay of
tests/support/harness.py, the accomplices dropping the removals addressed to
them (they keep the group as it was), and checks that it has no effect.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hushchat.protocol.client_core import Address, MessageReceived, Undecryptable
from hushchat.protocol.content import GroupControl
from hushchat.protocol.group import (
    Action,
    ControlMessage,
    Leave,
    RemoveMember,
    SetAdmin,
    SetTitle,
)
from hushchat.protocol.primitives import SeededRandom
from tests.support.harness import CONTROL, Delivery, Network

# Device ids tried by the grinding search: the best of 4,096 change ids is
# below a given honest one with probability 4096/4097.
GRINDING_TRIES = 4096


def A(user_id: str, device_id: int = 1) -> Address:
    return Address(user_id, device_id)


@pytest.fixture
def net(request: pytest.FixtureRequest) -> Network:
    return Network(SeededRandom(request.node.nodeid.encode()))


def make_group(net: Network, users: list[str], admins: list[str]) -> bytes:
    """alice's group of ``users`` (alice first), ``admins`` promoted, every session set up."""
    for user_id in users:
        net.add_user(user_id)
    group_id, _ = net.create_group(A(users[0]), "friends", users[1:])
    net.deliver_all()
    for admin in admins:
        if admin != users[0]:
            net.change_group(A(users[0]), group_id, SetAdmin(admin, True))
            net.deliver_all()
    for user_id in users:
        net.send_group(A(user_id), group_id, b"hello")
    net.deliver_all()
    return group_id


@dataclass(frozen=True)
class Parent:
    """A state an attacker builds on: its epoch and hash."""

    epoch: int
    state_hash: bytes


def current(net: Network, address: Address, group_id: bytes) -> Parent:
    state = net.core(address).group(group_id)
    return Parent(state.epoch, state.state_hash)


def change_and_keep_from(
    net: Network, author: Address, group_id: bytes, action: Action, accomplice: str
) -> bytes:
    """``author`` makes a change; everyone applies it but ``accomplice``, who drops its copies.

    Returns the change id of the change, as the state it made records it.
    """
    net.change_group(author, group_id, action)
    net.take(recipient=A(accomplice), label=CONTROL)
    net.deliver_all()
    return net.core(author).group(group_id).change_id


def grind(author: str, group_id: bytes, parent: Parent, action: Action) -> tuple[int, bytes]:
    """The device id (of GRINDING_TRIES, from 2) giving ``action`` the smallest change id.

    The attacker does not need to know which change it races: the best of a
    few thousand ids beats almost any honest change.
    """
    ids = {}
    for device_id in range(2, 2 + GRINDING_TRIES):
        unsigned = ControlMessage(
            group_id, parent.epoch, parent.state_hash, author, device_id, action, bytes(64)
        )
        ids[unsigned.change_id] = device_id
    best = min(ids)
    return ids[best], best


def play_ground_change(
    net: Network,
    author: str,
    group_id: bytes,
    parent: Parent,
    action: Action,
    target: bytes,
    recipients: list[str],
) -> list[Delivery]:
    """Grind, link the device found, sign ``action`` with it, and send it to ``recipients``."""
    device_id, change_id = grind(author, group_id, parent, action)
    assert change_id < target, "the search found no smaller change id: try another seed"
    ground = net.link_device(author, device_id)  # a new signed device list, for everyone
    message = ControlMessage.sign(
        ground.account.identity,
        group_id=group_id,
        parent_epoch=parent.epoch,
        parent_hash=parent.state_hash,
        author_user_id=author,
        author_device_id=device_id,
        action=action,
    )
    assert message.change_id < target
    content = GroupControl(message.encode(), None).encode()
    deliveries = []
    for user_id in recipients:
        for address in net.devices_of(user_id):
            deliveries.append(net.receive(net.inject_content(ground.address, address, content)))
    return deliveries


def assert_removed_for_good(
    net: Network, group_id: bytes, removed: str, members: list[str], deliveries: list[Delivery]
) -> None:
    """``removed`` is out for every member, and reads nothing the members send from now on."""
    for user_id in members:
        for address in net.devices_of(user_id):
            core = net.core(address)
            # (The attacker's ground device never joined.)
            if group_id in core.group_ids:
                assert removed not in core.group(group_id).user_ids, address
    secret = b"sent after the removal"
    for user_id in members:
        net.send_group(A(user_id), group_id, secret)
    for delivery in net.deliver_all():
        if delivery.envelope.recipient.user_id == removed:
            for event in delivery.events:
                assert not (isinstance(event, MessageReceived) and event.body == secret), event
    for delivery in deliveries:
        if delivery.envelope.recipient.user_id in members:
            # The ground change is refused: it builds on a state that is no longer current.
            assert delivery.events == (Undecryptable(delivery.envelope.sender, "STALE_CHANGE"),), (
                delivery.events
            )


@pytest.mark.parametrize("admins", [["alice"], ["alice", "bob"]], ids=["one admin", "two admins"])
def test_a_member_who_is_no_admin_cannot_undo_a_removal_by_grinding(
    net: Network, admins: list[str]
) -> None:
    # mallory (no admin) helps eve back in after the last admin listed removed her.
    group_id = make_group(net, ["alice", "bob", "eve", "mallory"], admins)
    remover = A(admins[-1])
    before = current(net, remover, group_id)
    removal = change_and_keep_from(net, remover, group_id, RemoveMember("eve"), "eve")
    deliveries = play_ground_change(
        net, "mallory", group_id, before, Leave(), removal, ["alice", "bob", "eve"]
    )
    assert_removed_for_good(net, group_id, "eve", ["alice", "bob"], deliveries)


@pytest.mark.parametrize("admins", [["alice"], ["alice", "bob"]], ids=["one admin", "two admins"])
def test_a_removed_member_cannot_undo_a_later_removal_by_grinding(
    net: Network, admins: list[str]
) -> None:
    # eve, removed first, helps frank back in after his own removal.
    group_id = make_group(net, ["alice", "bob", "eve", "frank"], admins)
    remover = A(admins[-1])
    before = current(net, remover, group_id)
    net.change_group(remover, group_id, RemoveMember("eve"))  # eve applies it like everyone
    net.deliver_all()
    removal_of_eve = net.core(remover).group(group_id).change_id
    change_and_keep_from(net, remover, group_id, RemoveMember("frank"), "frank")
    deliveries = play_ground_change(
        net, "eve", group_id, before, Leave(), removal_of_eve, ["alice", "bob", "frank"]
    )
    assert_removed_for_good(net, group_id, "frank", ["alice", "bob"], deliveries)
    for address in net.devices_of("alice") + net.devices_of("bob"):
        assert "eve" not in net.core(address).group(group_id).user_ids


def test_an_admin_cannot_undo_another_admins_removal_by_grinding(net: Network) -> None:
    # alice disagrees with bob's removal of eve: a ground title change on the state before it.
    group_id = make_group(net, ["alice", "bob", "eve"], ["alice", "bob"])
    before = current(net, A("bob"), group_id)
    removal = change_and_keep_from(net, A("bob"), group_id, RemoveMember("eve"), "eve")
    deliveries = play_ground_change(
        net, "alice", group_id, before, SetTitle("ours"), removal, ["bob", "eve"]
    )
    assert_removed_for_good(net, group_id, "eve", ["alice", "bob"], deliveries)
