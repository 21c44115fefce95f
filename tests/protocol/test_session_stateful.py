"""Two devices over a network that reorders, drops and duplicates, as a Hypothesis state
machine (libsignal's proptest_session_resets model), plus simultaneous initiation."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from itertools import count

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from hushchat.protocol.account import Account
from hushchat.protocol.consts import MAX_SKIPPED_KEYS
from hushchat.protocol.double_ratchet import Header
from hushchat.protocol.errors import DuplicateMessage, RemoteProtocolError
from hushchat.protocol.messages import PreKeyMessage, decode_message
from hushchat.protocol.primitives import SeededRandom
from hushchat.protocol.session import SessionRecord
from tests.support.clock import NOW
from tests.support.peers import Peer

NAMES = ("alice", "bob")
MODES = ["pqxdh", "pqxdh-no-opk", "x3dh", "x3dh-no-opk", "simultaneous"]


@dataclasses.dataclass(frozen=True)
class Envelope:
    number: int
    data: bytes
    plaintext: bytes


def other(name: str) -> str:
    return "bob" if name == "alice" else "alice"


def start_session(sender: Peer, receiver: Peer, mode: str) -> None:
    post_quantum = mode.startswith("pqxdh") or mode == "simultaneous"
    one_time = not mode.endswith("no-opk")
    bundle = receiver.account.bundle(
        receiver.local.user_id, 1, one_time=one_time, post_quantum=post_quantum
    )
    sender.start(bundle, post_quantum=post_quantum)


def knows_ratchet_key(record: SessionRecord, data: bytes) -> bool:
    """Whether some session still remembers the message's chain (so a replay of
    it must be reported as a duplicate rather than as a forgery)."""
    message = decode_message(data)
    inner = message.message if isinstance(message, PreKeyMessage) else message
    key = Header.decode(inner.header).ratchet_key
    return any(
        key == s.ratchet.remote_ratchet_key or key in s.ratchet.previous_ratchet_keys
        for s in record.sessions()
    )


def handshake_only_change(original: bytes, mutated: bytes, record: SessionRecord) -> bool:
    """A mutation that only touched the prekey ids or KEM ciphertext of an initial message
    whose session already exists: those fields are then unused."""
    try:
        a, b = decode_message(original), decode_message(mutated)
    except RemoteProtocolError:
        return False
    return (
        isinstance(a, PreKeyMessage)
        and isinstance(b, PreKeyMessage)
        and a.message == b.message
        and a.handshake.base_key == b.handshake.base_key
        and a.handshake.identity == b.handshake.identity
        and any(s.base_key == a.handshake.base_key for s in record.sessions())
    )


class Conversation(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.peers: dict[str, Peer] = {}
        self.in_flight: dict[str, list[Envelope]] = {name: [] for name in NAMES}  # by receiver
        self.delivered: dict[str, list[Envelope]] = {name: [] for name in NAMES}
        self.undelivered: dict[str, int] = {name: 0 for name in NAMES}  # in flight or dropped
        self.numbers = count()

    @initialize(mode=st.sampled_from(MODES))
    def start(self, mode: str) -> None:
        for name in NAMES:
            rng = SeededRandom(name.encode())
            account = Account.create(now=NOW, one_time_prekeys=2, rng=rng)
            self.peers[name] = Peer(account, rng, me=name, peer=other(name))
        start_session(self.peers["alice"], self.peers["bob"], mode)
        if mode == "simultaneous":
            start_session(self.peers["bob"], self.peers["alice"], mode)

    # ------------------------------------------------------------ honest traffic

    def send(self, sender: str, burst: int = 1) -> None:
        for _ in range(burst):
            number = next(self.numbers)
            plaintext = b"%s #%d" % (sender.encode(), number)
            data = self.peers[sender].encrypt(plaintext)
            self.in_flight[other(sender)].append(Envelope(number, data, plaintext))
            self.undelivered[other(sender)] += 1

    @precondition(lambda self: self.peers["alice"].record.has_usable_session(NOW))
    @rule(burst=st.integers(1, 4))
    def alice_sends(self, burst: int) -> None:
        self.send("alice", burst)

    @precondition(lambda self: self.peers["bob"].record.has_usable_session(NOW))
    @rule(burst=st.integers(1, 4))
    def bob_sends(self, burst: int) -> None:
        self.send("bob", burst)

    def deliver_envelope(self, receiver: str, envelope: Envelope) -> None:
        result = self.peers[receiver].decrypt(envelope.data)
        assert result.plaintext == envelope.plaintext
        assert envelope not in self.delivered[receiver]
        self.delivered[receiver].append(envelope)
        self.undelivered[receiver] -= 1

    @precondition(lambda self: any(self.in_flight.values()))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        """Deliver any message in flight: the network reorders freely."""
        receiver = data.draw(st.sampled_from([n for n in NAMES if self.in_flight[n]]))
        queue = self.in_flight[receiver]
        envelope = queue.pop(data.draw(st.integers(0, len(queue) - 1)))
        self.deliver_envelope(receiver, envelope)

    @precondition(lambda self: any(self.in_flight.values()))
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        receiver = data.draw(st.sampled_from([n for n in NAMES if self.in_flight[n]]))
        queue = self.in_flight[receiver]
        queue.pop(data.draw(st.integers(0, len(queue) - 1)))

    @rule(name=st.sampled_from(NAMES))
    def reload(self, name: str) -> None:
        """Persist and reload a device's state mid-conversation."""
        peer = self.peers[name]
        peer.account = Account.from_bytes(peer.account.to_bytes())
        peer.record = SessionRecord.from_bytes(peer.record.to_bytes())

    # ------------------------------------------------------------ hostile traffic

    def refuse(self, receiver: str, data: bytes) -> RemoteProtocolError:
        peer = self.peers[receiver]
        before = peer.state()
        try:
            peer.decrypt(data)
        except RemoteProtocolError as exc:
            assert peer.state() == before, "a refused input changed the state"
            return exc
        raise AssertionError("input was accepted")

    @precondition(lambda self: any(self.delivered.values()))
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        receiver = data.draw(st.sampled_from([n for n in NAMES if self.delivered[n]]))
        envelope = data.draw(st.sampled_from(self.delivered[receiver]))
        expect_duplicate = knows_ratchet_key(self.peers[receiver].record, envelope.data)
        error = self.refuse(receiver, envelope.data)
        if expect_duplicate:
            assert isinstance(error, DuplicateMessage), repr(error)

    @rule(receiver=st.sampled_from(NAMES), data=st.binary(max_size=200))
    def garbage(self, receiver: str, data: bytes) -> None:
        self.refuse(receiver, data)

    @precondition(lambda self: any(self.in_flight.values()))
    @rule(data=st.data())
    def tamper(self, data: st.DataObject) -> None:
        """A bit-flipped copy of a message in flight is refused; the original stays good."""
        receiver = data.draw(st.sampled_from([n for n in NAMES if self.in_flight[n]]))
        queue = self.in_flight[receiver]
        # Often the oldest: the one most likely overtaken, its key stored.
        index = data.draw(st.one_of(st.just(0), st.integers(0, len(queue) - 1)))
        envelope = queue[index]
        # Half the flips hit the authenticated tail (ciphertext and tag): flips
        # elsewhere mostly land in a PQXDH message's KEM ciphertext.
        size = len(envelope.data) * 8
        low = data.draw(st.sampled_from([0, size - 32 * 8]))
        bit = data.draw(st.integers(low, size - 1))
        mutated = bytearray(envelope.data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        peer = self.peers[receiver]
        if handshake_only_change(envelope.data, bytes(mutated), peer.record):
            # Delivered as the original would have been (libsignal behaves alike).
            queue.pop(index)
            self.deliver_envelope(receiver, dataclasses.replace(envelope, data=bytes(mutated)))
            return
        self.refuse(receiver, bytes(mutated))

    # ------------------------------------------------------------ invariants

    @invariant()
    def stored_keys_belong_to_undelivered_messages(self) -> None:
        """Forward secrecy: a key is kept only for a message not yet delivered."""
        for name, peer in self.peers.items():
            stored = sum(len(s.ratchet.skipped) for s in peer.record.sessions())
            assert stored <= min(self.undelivered[name], MAX_SKIPPED_KEYS)

    @invariant()
    def state_round_trips(self) -> None:
        for peer in self.peers.values():
            data = peer.record.to_bytes()
            assert SessionRecord.from_bytes(data).to_bytes() == data

    def teardown(self) -> None:
        """Quiesce: deliver what is in flight, talk once each way, agree on a session."""
        if sys.exc_info()[0] is not None or not self.peers:
            return  # a step already failed: report that, not a consequence of it
        for receiver in NAMES:
            while self.in_flight[receiver]:
                self.deliver_envelope(receiver, self.in_flight[receiver].pop(0))
        for sender in ("alice", "bob", "alice"):
            if self.peers[sender].record.has_usable_session(NOW):
                self.send(sender)
                self.deliver_envelope(other(sender), self.in_flight[other(sender)].pop())
        alice, bob = self.peers["alice"].record.current, self.peers["bob"].record.current
        assert alice is not None and bob is not None
        assert alice.base_key == bob.base_key


Conversation.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestConversation = Conversation.TestCase


@pytest.mark.fuzz
def test_conversation_long_run() -> None:
    run_state_machine_as_test(
        Conversation,
        settings=settings(max_examples=5000, stateful_step_count=80, deadline=None),
    )


# ------------------------------------------------------------------ simultaneous initiation


def simultaneous(make_account: Callable[..., Account], rng: SeededRandom) -> tuple[Peer, Peer]:
    alice = Peer(make_account(), rng, me="alice", peer="bob")
    bob = Peer(make_account(), rng, me="bob", peer="alice")
    start_session(alice, bob, "simultaneous")
    start_session(bob, alice, "simultaneous")
    return alice, bob


@pytest.mark.parametrize("order", ["alice-first", "bob-first", "interleaved"])
def test_simultaneous_initiation_converges(
    make_account: Callable[..., Account], rng: SeededRandom, order: str
) -> None:
    alice, bob = simultaneous(make_account, rng)
    from_alice = [alice.encrypt(b"a%d" % i) for i in range(2)]
    from_bob = [bob.encrypt(b"b%d" % i) for i in range(2)]
    deliveries = {
        "alice-first": [(bob, m) for m in from_alice] + [(alice, m) for m in from_bob],
        "bob-first": [(alice, m) for m in from_bob] + [(bob, m) for m in from_alice],
        "interleaved": [
            (bob, from_alice[1]),
            (alice, from_bob[0]),
            (alice, from_bob[1]),
            (bob, from_alice[0]),
        ],
    }[order]
    for receiver, message in deliveries:
        assert receiver.decrypt(message).plaintext in {b"a0", b"a1", b"b0", b"b1"}
    # One message each way, one after the other: both end on the same session.
    assert bob.decrypt(alice.encrypt(b"ping")).plaintext == b"ping"
    assert alice.decrypt(bob.encrypt(b"pong")).plaintext == b"pong"
    assert alice.record.current is not None and bob.record.current is not None
    assert alice.record.current.base_key == bob.record.current.base_key
    for _ in range(3):
        assert bob.decrypt(alice.encrypt(b"more")).plaintext == b"more"
        assert alice.decrypt(bob.encrypt(b"more")).plaintext == b"more"
    assert alice.record.current.base_key == bob.record.current.base_key


def test_simultaneous_replies_still_converge(
    make_account: Callable[..., Account], rng: SeededRandom
) -> None:
    """Both answer at once after the crossing handshakes: each promotes the other's choice,
    so the sessions swap; the next exchange in turn settles it."""
    alice, bob = simultaneous(make_account, rng)
    to_bob, to_alice = alice.encrypt(b"a"), bob.encrypt(b"b")
    bob.decrypt(to_bob)
    alice.decrypt(to_alice)
    to_bob, to_alice = alice.encrypt(b"a2"), bob.encrypt(b"b2")
    assert bob.decrypt(to_bob).plaintext == b"a2"
    assert alice.decrypt(to_alice).plaintext == b"b2"
    assert bob.decrypt(alice.encrypt(b"ping")).plaintext == b"ping"
    assert alice.decrypt(bob.encrypt(b"pong")).plaintext == b"pong"
    assert alice.record.current.base_key == bob.record.current.base_key  # type: ignore[union-attr]
