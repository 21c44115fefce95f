"""A one-to-one conversation with the pure protocol core, and no network at all.

This is the smallest complete use of hushchat's ``protocol`` package:

1. Bob creates an account (identity key + prekeys) and publishes a bundle.
2. Alice starts a PQXDH session from Bob's bundle and sends a first message.
3. Bob answers that initial message, which creates his side of the session.
4. They talk; every message moves the Double Ratchet forward.
5. State is saved to bytes and loaded back, as an app would across restarts.
6. Both compute the same safety number to compare out of band.

Run it:  python examples/one_to_one.py
"""

from __future__ import annotations

from hushchat.protocol import Account, SafetyNumber, SessionRecord
from hushchat.protocol.errors import DuplicateMessage


def main() -> None:
    now = 1_700_000_000  # the core never reads a clock: the app passes time in

    # Bob: an account is a device identity plus its private prekeys.
    bob = Account.create(now=now)
    # What the relay would hand out: Bob's public keys, signed by his identity.
    bundle = bob.bundle("bob", device_id=1)

    # Alice: verifies the bundle's signatures and runs PQXDH (X25519 + ML-KEM-768).
    alice = Account.create(now=now)
    alice_to_bob = SessionRecord(alice.create_outbound_session(bundle, now=now))
    first = alice_to_bob.encrypt(b"Hi Bob, this is end-to-end encrypted.", now=now)
    print(f"Alice -> Bob: initial message of {len(first)} bytes (carries the handshake)")

    # Bob: a new record for Alice's device. The first message creates the session.
    bob_from_alice = SessionRecord()
    result = bob_from_alice.decrypt(first, bob, now=now)
    print(f"Bob reads:    {result.plaintext.decode()!r} (new session: {result.new_session})")

    reply = bob_from_alice.encrypt(b"Hi Alice! Received.", now=now)
    print(f"Alice reads:  {alice_to_bob.decrypt(reply, alice, now=now).plaintext.decode()!r}")

    # Out of order is fine: Alice sends two, Bob reads the second first.
    one = alice_to_bob.encrypt(b"one", now=now)
    two = alice_to_bob.encrypt(b"two", now=now)
    print(
        f"Bob reads:    {bob_from_alice.decrypt(two, bob, now=now).plaintext!r} then "
        f"{bob_from_alice.decrypt(one, bob, now=now).plaintext!r}"
    )

    # A replayed message is refused: its key is gone (forward secrecy).
    try:
        bob_from_alice.decrypt(one, bob, now=now)
    except DuplicateMessage as exc:
        print(f"Replay:       refused with {exc.code}")

    # Save and load, as an app does across restarts (keep these bytes secret).
    saved_record, saved_account = bob_from_alice.to_bytes(), bob.to_bytes()
    bob = Account.from_bytes(saved_account)
    bob_from_alice = SessionRecord.from_bytes(saved_record)
    later = alice_to_bob.encrypt(b"still there after your restart?", now=now + 60)
    print(f"After reload: {bob_from_alice.decrypt(later, bob, now=now + 60).plaintext!r}")
    print(f"Session record: {len(saved_record)} bytes")

    # Safety numbers: both compute the same 60 digits from the two identity keys.
    alice_view = SafetyNumber.compute(
        "alice", alice.identity.public.ed25519, "bob", bob.identity.public.ed25519
    )
    bob_view = SafetyNumber.compute(
        "bob", bob.identity.public.ed25519, "alice", alice.identity.public.ed25519
    )
    assert alice_view.digits == bob_view.digits
    print(f"Safety number: {alice_view.grouped()}")


if __name__ == "__main__":
    main()
