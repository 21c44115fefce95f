"""Every decoder, fed random bytes and mutations of valid encodings (bit flips,
truncations, extensions, insertions, deletions), raises only typed errors:
wire decoders only RemoteProtocolError, state loaders only StateError. A
wire value that decodes re-encodes to the same bytes (canonical encoding).

The default run uses a moderate budget; ``pytest -m fuzz`` runs the same
properties with the budget of tests/support/fuzzing.py per decoder, and counts them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hushchat.protocol.account import Account
from hushchat.protocol.double_ratchet import Header
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.errors import RemoteProtocolError, StateError
from hushchat.protocol.fingerprint import SafetyNumber
from hushchat.protocol.messages import PreKeyMessage, decode_message
from hushchat.protocol.prekeys import PreKeyBundle
from hushchat.protocol.primitives import SeededRandom
from hushchat.protocol.session import SessionRecord
from tests.support.clock import NOW
from tests.support.fuzzing import CHECKED, FUZZ_EXAMPLES, budget, inputs
from tests.support.peers import party

DEFAULT_EXAMPLES = 400


@dataclass(frozen=True)
class Decoder:
    decode: Callable[[bytes], object]
    # Whether a successful decode must re-encode to its input.
    encode: Callable[[Any], bytes] | None
    allowed: type[Exception]


@dataclass(frozen=True)
class Corpus:
    seeds: dict[str, list[bytes]]
    safety_number: SafetyNumber


@functools.cache
def corpus() -> Corpus:
    """Valid encodings of every kind, from one deterministic conversation."""
    rng = SeededRandom(b"fuzz corpus")
    alice_party, bob_party = party("alice"), party("bob")
    alice = Account.create(now=NOW, one_time_prekeys=1, rng=rng)
    bob = Account.create(now=NOW, one_time_prekeys=2, rng=rng)
    bundles = [
        bob.bundle("bob", 1, one_time=one_time, post_quantum=pq)
        for one_time in (True, False)
        for pq in (True, False)
    ]

    def outbound(bundle: PreKeyBundle, post_quantum: bool) -> SessionRecord:
        session = alice.create_outbound_session(
            bundle, local=alice_party, remote=bob_party, now=NOW, post_quantum=post_quantum, rng=rng
        )
        return SessionRecord(session)

    alice_pq, alice_x3dh = outbound(bundles[0], True), outbound(bundles[3], False)
    pending = alice_pq.to_bytes()
    first_pq, first_x3dh = alice_pq.encrypt(b"hi", now=NOW), alice_x3dh.encrypt(b"", now=NOW)
    bob_record = SessionRecord()
    bob_record.decrypt(first_pq, bob, local=bob_party, remote=alice_party, now=NOW, rng=rng)
    skipped = [alice_pq.encrypt(b"%d" % i, now=NOW) for i in range(3)]
    bob_record.decrypt(skipped[2], bob, local=bob_party, remote=alice_party, now=NOW, rng=rng)
    ratchet = bob_record.encrypt(b"reply", now=NOW)
    alice_pq.decrypt(ratchet, alice, local=alice_party, remote=bob_party, now=NOW, rng=rng)
    # A second session: one previous.
    bob_record.decrypt(first_x3dh, bob, local=bob_party, remote=alice_party, now=NOW, rng=rng)
    messages = [first_pq, first_x3dh, ratchet, skipped[0]]
    headers = []
    for data in messages:
        message = decode_message(data)
        headers.append((message.message if isinstance(message, PreKeyMessage) else message).header)
    a, b = alice.identity.public.ed25519, bob.identity.public.ed25519
    ours = SafetyNumber.compute("alice", a, "bob", b, iterations=2)
    theirs = SafetyNumber.compute("bob", b, "alice", a, iterations=2)
    values: list[Any] = [0, 2**64 - 1, -(2**63), b"\0" * 300, "é" * 40, [1, [None, True]], ""]
    seeds = {
        "decode_message": messages,
        "Header.decode": headers,
        "PreKeyBundle.decode": [bundle.encode() for bundle in bundles],
        "SessionRecord.from_bytes": [
            SessionRecord().to_bytes(),
            pending,
            bob_record.to_bytes(),
            alice_pq.to_bytes(),
        ],
        "Account.from_bytes": [alice.to_bytes()],
        "SafetyNumber.verify_scanned": [theirs.scannable()],
        "encoding.unpack": [pack(v) for v in values],
    }
    return Corpus(seeds, ours)


def verify_scanned(data: bytes) -> None:
    corpus().safety_number.verify_scanned(data)


def unpack_any(data: bytes) -> object:
    return unpack(data, what="fuzz")


DECODERS = {
    "decode_message": Decoder(decode_message, lambda m: m.encode(), RemoteProtocolError),
    "Header.decode": Decoder(Header.decode, lambda h: h.encode(), RemoteProtocolError),
    "PreKeyBundle.decode": Decoder(PreKeyBundle.decode, lambda b: b.encode(), RemoteProtocolError),
    "SessionRecord.from_bytes": Decoder(SessionRecord.from_bytes, None, StateError),
    "Account.from_bytes": Decoder(Account.from_bytes, None, StateError),
    "SafetyNumber.verify_scanned": Decoder(verify_scanned, None, RemoteProtocolError),
    "encoding.unpack": Decoder(unpack_any, pack, RemoteProtocolError),
}


def check(name: str, data: bytes) -> None:
    decoder = DECODERS[name]
    try:
        value = decoder.decode(data)
    except decoder.allowed:
        return
    finally:
        CHECKED[f"decoder {name}"] += 1
    if decoder.encode is not None:
        assert decoder.encode(value) == data, "decoded, but not the canonical encoding"


@pytest.mark.parametrize("name", list(DECODERS))
@budget(DEFAULT_EXAMPLES)
@given(data=st.data())
def test_decoder(name: str, data: st.DataObject) -> None:
    check(name, data.draw(inputs(corpus().seeds[name])))


@pytest.mark.fuzz
@pytest.mark.parametrize("name", list(DECODERS))
@budget(FUZZ_EXAMPLES)
@given(data=st.data())
def test_decoder_fuzz(name: str, data: st.DataObject) -> None:
    check(name, data.draw(inputs(corpus().seeds[name])))


@pytest.mark.parametrize("name", list(DECODERS))
def test_corpus_decodes(name: str) -> None:
    """The seeds are valid: mutations start from real encodings."""
    for data in corpus().seeds[name]:
        value = DECODERS[name].decode(data)
        encode = DECODERS[name].encode
        assert encode is None or encode(value) == data
