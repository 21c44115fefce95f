"""Someone who reads the logs, a crash report or a debugger's output learns no secret.

An app or the relay that logs an object (``%r``), or an exception's message
built from one, must not print a key, a message's plaintext or an invitation
token (BRIEF rule 5). tests/protocol/test_purity.py checks the one-to-one
state (accounts, sessions, handshakes); this file the group, relay and
client-library objects that hold secrets.
"""

from __future__ import annotations

from hushchat.protocol.client_core import Address, MessageReceived, MessageSentByOtherDevice
from hushchat.protocol.group_cipher import OutboundSenderKey, SenderKeyRecord
from hushchat.protocol.primitives import SeededRandom, hkdf_sha256
from hushchat.protocol.sender_keys import SenderKeyDistributionMessage
from hushchat.transport.relay.storage.atrest import EPOCH_KEYS_INFO, KeyChain, KeyState
from hushchat.transport.wire.frames import PublishDeviceList
from tests.support.clock import NOW

GROUP_ID = bytes(range(16))
ALICE = Address("alice", 1)


def leaks(obj: object, secrets: list[bytes]) -> list[str]:
    """The secrets that ``repr(obj)`` or ``str(obj)`` shows, in hex or as a bytes literal."""
    shown = repr(obj) + str(obj)
    assert secrets and all(len(s) >= 16 for s in secrets)
    return [s.hex() for s in secrets if s.hex() in shown or repr(s)[2:-1] in shown]


def test_sender_keys_print_no_chain_key() -> None:
    outbound = OutboundSenderKey.create(GROUP_ID, NOW, SeededRandom(b"chain"))
    skdm = SenderKeyDistributionMessage.decode(outbound.distribution_message(sender=ALICE))
    record = SenderKeyRecord(GROUP_ID)
    record.process_distribution(skdm, sender=ALICE)
    for obj in (outbound, skdm, record):
        assert leaks(obj, [skdm.chain_key]) == [], obj


def test_the_relay_key_chain_prints_no_key() -> None:
    state = KeyState.new(3600, 10)
    chain = KeyChain(state)
    keys = chain.keys(11)
    assert keys is not None
    later = chain._chain(11)
    derived = hkdf_sha256(later, salt=None, info=EPOCH_KEYS_INFO, length=64)
    secrets = [state.chain, later, derived[:32], derived[32:]]
    for obj in (state, state.next(), chain, keys):
        assert leaks(obj, secrets) == [], obj


def test_an_invitation_token_is_not_printed_with_its_frame() -> None:
    token = "Zm9yLXRoZS1pbnZpdGVkLW9ubHk"
    frame = PublishDeviceList(7, b"\x91" * 40, token)
    assert token not in repr(frame) + str(frame)


def test_events_print_no_message_body() -> None:
    body = b"the meeting moved to the old mill at nine"
    events = (
        MessageReceived(ALICE, b"\x01" * 16, NOW, body),
        MessageSentByOtherDevice(ALICE, "bob", b"\x02" * 16, NOW, body),
    )
    for event in events:
        assert leaks(event, [body]) == [], event
