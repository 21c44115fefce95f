"""An attacker who times the receiver's refusals learns nothing of the expected tag.

A forger who could see how many leading bytes of a tag matched would find a
valid tag byte by byte; every comparison of a secret against attacker input
must take the same time whatever the bytes (BRIEF rule 5). Timing cannot be
measured reliably in a test, so these check that the comparison the attacker
reaches is the constant-time one, with the attacker's own bytes.
"""

from __future__ import annotations

import hmac
from dataclasses import replace

import pytest

from hushchat.protocol.client_core import Undecryptable
from hushchat.protocol.consts import MAC_SIZE
from tests.support.harness import TEXT, A, Network

Compared = list[tuple[bytes, bytes]]


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> Compared:
    """Every pair of byte strings given to hmac.compare_digest while the test runs."""
    seen: Compared = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return seen


def test_a_forged_message_tag_is_compared_in_constant_time(
    net: Network, compared: Compared
) -> None:
    net.add_user("alice")
    net.add_user("bob")
    net.send_direct(A("alice"), "bob", b"warm up")
    net.deliver_all()
    net.send_direct(A("bob"), "alice", b"warm up")
    net.deliver_all()
    [envelope] = [e for e in net.send_direct(A("alice"), "bob", b"secret") if e.label == TEXT]
    net.in_flight.remove(envelope)
    forged_tag = bytes(b ^ 0x5A for b in envelope.payload[-MAC_SIZE:])
    forged = replace(envelope, payload=envelope.payload[:-MAC_SIZE] + forged_tag)
    compared.clear()
    assert net.receive(forged).events == (Undecryptable(A("alice"), "BAD_MAC"),)
    assert any(theirs == forged_tag for _, theirs in compared)
