"""ClientCore checks every argument before it changes anything.

Each public entry point is called with an argument outside its limits on a
device with sessions, sender keys and a group: it must raise a
LocalProtocolError (LimitExceeded naming the limit, where a size is over
one) and leave the whole state, its pending changes and its random source
exactly as they were. A direct message one byte over MAX_PLAINTEXT_SIZE used
to be encrypted and sent: the recipient could not decode it (MALFORMED), and
a larger one left an outbox row the client could not read back.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from hushchat.protocol.client_core import Address, ClientCore
from hushchat.protocol.consts import (
    GROUP_ID_SIZE,
    MAX_GROUP_MEMBERS,
    MAX_GROUP_TITLE_SIZE,
    MAX_PLAINTEXT_SIZE,
    MAX_USER_ID_SIZE,
)
from hushchat.protocol.content import GroupText
from hushchat.protocol.errors import InvalidArgument, LimitExceeded, LocalProtocolError
from hushchat.protocol.primitives import SeededRandom
from tests.support.harness import Network, full_state


@pytest.fixture
def world(request: pytest.FixtureRequest) -> tuple[Network, ClientCore, bytes]:
    """Alice with sessions to bob and carol, a group of the three, messages both ways."""
    rng = SeededRandom(request.node.nodeid.encode())
    net = Network(rng)
    for user_id in ("alice", "bob", "carol"):
        net.add_user(user_id)
    alice = Address("alice", 1)
    net.send_direct(alice, "bob", b"hi")
    group_id, _ = net.create_group(alice, "friends", ["bob", "carol"])
    net.deliver_all()
    net.send_group(alice, group_id, b"hello")
    net.deliver_all()
    return net, net.devices[alice], group_id


def group_body_limit(now: int) -> int:
    """The longest group body whose GroupText fits MAX_PLAINTEXT_SIZE, whatever the epoch."""

    def size(body: int) -> int:
        return len(GroupText(bytes(16), now, b"x" * body, 2**64 - 1, bytes(32)).encode())

    body = MAX_PLAINTEXT_SIZE - size(0)
    while size(body) > MAX_PLAINTEXT_SIZE:
        body -= 1
    return body


def unchanged(core: ClientCore, call: Callable[[], Any], error: type[Exception]) -> Exception:
    """``call`` raises ``error`` and changes no record, no pending change, no random draw."""
    assert core.take_changes() is not None
    before = full_state(core)
    rng = core._state.rng
    assert isinstance(rng, SeededRandom)
    draws = rng._counter
    with pytest.raises(error) as raised:
        call()
    assert full_state(core) == before
    assert core.take_changes() == {}
    assert rng._counter == draws
    return raised.value


def test_a_direct_message_over_the_plaintext_limit_is_refused(world: Any) -> None:
    net, alice, _ = world
    for size in (MAX_PLAINTEXT_SIZE + 1, 70_000, 300_000, 1_000_000):
        sending = partial(alice.send_direct, "bob", b"x" * size, now=net.now)
        refused = unchanged(alice, sending, LimitExceeded)
        assert isinstance(refused, LimitExceeded)
        assert (refused.limit, refused.maximum) == ("MAX_PLAINTEXT_SIZE", MAX_PLAINTEXT_SIZE)
        assert "MAX_PLAINTEXT_SIZE" in str(refused)
    # At the limit it goes, and the recipient reads it.
    net.send_direct(Address("alice", 1), "bob", b"x" * MAX_PLAINTEXT_SIZE)
    [delivery] = net.deliver_all()
    assert [len(e.body) for e in delivery.events] == [MAX_PLAINTEXT_SIZE]


def test_a_group_message_over_the_plaintext_limit_changes_nothing(world: Any) -> None:
    """Checked before the sender key rotates or a distribution is encrypted."""
    net, alice, group_id = world
    limit = group_body_limit(net.now)
    # A rotation due (age) would otherwise draw a new key before the size check.
    net.now += alice.sender_key_max_age + 1
    refused = unchanged(
        alice,
        lambda: alice.send_group(group_id, b"x" * (limit + 1), now=net.now),
        LimitExceeded,
    )
    assert isinstance(refused, LimitExceeded) and refused.limit == "MAX_PLAINTEXT_SIZE"
    net.send_group(Address("alice", 1), group_id, b"x" * limit)
    bodies = [len(e.body) for d in net.deliver_all() for e in d.events if hasattr(e, "body")]
    assert bodies == [limit, limit]


BAD_USER_IDS = ["", "x" * (MAX_USER_ID_SIZE + 1), b"bob", None, "\ud800", "bob\x00evil"]


@pytest.mark.parametrize("user_id", BAD_USER_IDS, ids=repr)
def test_a_bad_user_id_is_refused_everywhere(world: Any, user_id: Any) -> None:
    net, alice, group_id = world
    now = net.now
    calls: list[Callable[[], Any]] = [
        lambda: alice.send_direct(user_id, b"hi", now=now),
        lambda: alice.create_group("g", ["bob", user_id], now=now),
        lambda: alice.add_member(group_id, user_id, now=now),
        lambda: alice.remove_member(group_id, user_id, now=now),
        lambda: alice.devices_without_session(["bob", user_id], now=now),
        lambda: alice.confirm_identity(user_id),
        lambda: alice.safety_number(user_id),
        lambda: alice.pending_identity(user_id),
        lambda: alice.device_list(user_id),
        lambda: alice.devices_of(user_id),
    ]
    for call in calls:
        unchanged(alice, call, InvalidArgument)


def test_bad_group_arguments_are_refused(world: Any) -> None:
    net, alice, group_id = world
    now = net.now
    too_many = [f"user{i}" for i in range(MAX_GROUP_MEMBERS)]
    long_title = "x" * (MAX_GROUP_TITLE_SIZE + 1)
    cases: list[tuple[Callable[[], Any], type[Exception]]] = [
        (lambda: alice.create_group(long_title, ["bob"], now=now), LimitExceeded),
        (lambda: alice.create_group(b"title", ["bob"], now=now), InvalidArgument),
        (lambda: alice.create_group("g", too_many, now=now), LimitExceeded),
        (lambda: alice.create_group("g", "bob", now=now), InvalidArgument),
        (lambda: alice.send_group(b"short", b"hi", now=now), InvalidArgument),
        (lambda: alice.send_group(group_id, "text", now=now), InvalidArgument),
        (lambda: alice.send_group(bytes(GROUP_ID_SIZE), b"hi", now=now), InvalidArgument),
        (lambda: alice.add_member(group_id[:-1], "bob", now=now), InvalidArgument),
        (lambda: alice.leave_group(None, now=now), InvalidArgument),
        (lambda: alice.group_send_needs(group_id + b"x", now=now), InvalidArgument),
        (lambda: alice.group(group_id[:4]), InvalidArgument),
        (lambda: alice.set_title(group_id, long_title, now=now), LimitExceeded),
        (lambda: alice.set_admin(group_id, "bob", 1, now=now), InvalidArgument),
        (lambda: alice.set_admin(group_id, "", True, now=now), InvalidArgument),
        (lambda: alice.reinit_group(b"short", now=now), InvalidArgument),
        (lambda: alice.has_pending_change(None), InvalidArgument),
        (lambda: alice.retry_change(group_id, now=-1), InvalidArgument),
        (lambda: alice.abandon_change(object()), InvalidArgument),
    ]
    for call, error in cases:
        unchanged(alice, call, error)


def test_bad_times_bodies_and_devices_are_refused(world: Any) -> None:
    net, alice, group_id = world
    cases: list[tuple[Callable[[], Any], type[Exception]]] = [
        (lambda: alice.send_direct("bob", b"hi", now=-1), InvalidArgument),
        (lambda: alice.send_direct("bob", b"hi", now=True), InvalidArgument),
        (lambda: alice.send_direct("bob", b"hi", now=2**64), InvalidArgument),
        (lambda: alice.send_direct("bob", "text", now=net.now), InvalidArgument),
        (lambda: alice.send_group(group_id, b"hi", now=1.5), InvalidArgument),
        (lambda: alice.devices_without_session(["bob"], now=-5), InvalidArgument),
        (lambda: alice.process_bundle(b"", now=-1), InvalidArgument),
        (lambda: alice.process_bundle("bundle", now=net.now), InvalidArgument),
        (lambda: alice.process_device_list("list"), InvalidArgument),
        (lambda: alice.receive(Address("bob", 1), 1, b"", now=-1), InvalidArgument),
        (lambda: alice.receive(("bob", 1), 1, b"", now=net.now), InvalidArgument),
        (lambda: alice.receive(Address("bob", 1), 1, "payload", now=net.now), InvalidArgument),
        (lambda: alice.link_device(2), InvalidArgument),
        (lambda: alice.link_device(b"not an entry"), InvalidArgument),
        (lambda: alice.unlink_device(-1), InvalidArgument),
        (lambda: alice.request_sync(now=-1), InvalidArgument),
        (lambda: alice.send_receipt("bob", [], now=net.now), InvalidArgument),
        (lambda: alice.send_receipt("bob", [b"short"], now=net.now), InvalidArgument),
        (lambda: alice.send_receipt("bob", bytes(16), now=net.now), InvalidArgument),
        (lambda: alice.send_receipt("bob", [bytes(16)] * 101, now=net.now), LimitExceeded),
        (lambda: alice.send_receipt("alice", [bytes(16)], now=net.now), InvalidArgument),
    ]
    for call, error in cases:
        raised = unchanged(alice, call, error)
        assert isinstance(raised, LocalProtocolError)
