"""A one-to-one conversation with the pure protocol core, and no network at all.

This is the smallest complete use of hushchat's ``protocol`` package:

0. Alice and Bob each have a user identity (which their device lists sign,
   spec/11-devices.md); a session binds whose each device is.
1. Bob creates an account (identity key + prekeys) and publishes a bundle.
2. Alice starts a PQXDH session from Bob's bundle and sends a first message.
3. Bob answers that initial message, which creates his side of the session.
4. They talk; every message moves the Double Ratchet forward.
5. State is saved to bytes and loaded back, as an app would across restarts.
6. Both compute the same safety number to compare out of band.

Run it:  python examples/one_to_one.py
"""

from __future__ import annotations

from hushchat.protocol import Account, IdentityKeyPair, Party, SafetyNumber, SessionRecord
from hushchat.protocol.errors import DuplicateMessage


def main() -> None:
    now = 1_700_000_000  # the core never reads a clock: the app passes time in

    # Each user's long-term identity; device 1 of each. A session is with a
    # device of a user, never with a bare key: both sides bind these, so a
    # relay cannot present Alice's device as someone else's.
    alice_user, bob_user = IdentityKeyPair.generate(), IdentityKeyPair.generate()
    alice_device = Party("alice", 1, alice_user.public.ed25519)
    bob_device = Party("bob", 1, bob_user.public.ed25519)

    # Bob: an account is a device identity plus its private prekeys.
    bob = Account.create(now=now)
    # What the relay would hand out: Bob's public keys, signed by his identity.
    bundle = bob.bundle("bob", device_id=1)

    # Alice: verifies the bundle's signatures and runs PQXDH (X25519 + ML-KEM-768).
    alice = Account.create(now=now)
    alice_to_bob = SessionRecord(
        alice.create_outbound_session(bundle, local=alice_device, remote=bob_device, now=now)
    )
    first = alice_to_bob.encrypt(b"Hi Bob, this is end-to-end encrypted.", now=now)
    print(f"Alice -> Bob: initial message of {len(first)} bytes (carries the handshake)")

    # Bob: a new record for Alice's device. The first message creates the session.
    bob_from_alice = SessionRecord()
    result = bob_from_alice.decrypt(first, bob, local=bob_device, remote=alice_device, now=now)
    print(f"Bob reads:    {result.plaintext.decode()!r} (new session: {result.new_session})")

    reply = bob_from_alice.encrypt(b"Hi Alice! Received.", now=now)
    answer = alice_to_bob.decrypt(reply, alice, local=alice_device, remote=bob_device, now=now)
    print(f"Alice reads:  {answer.plaintext.decode()!r}")

    # Out of order is fine: Alice sends two, Bob reads the second first.
    one = alice_to_bob.encrypt(b"one", now=now)
    two = alice_to_bob.encrypt(b"two", now=now)
    second = bob_from_alice.decrypt(two, bob, local=bob_device, remote=alice_device, now=now)
    first_sent = bob_from_alice.decrypt(one, bob, local=bob_device, remote=alice_device, now=now)
    print(f"Bob reads:    {second.plaintext!r} then {first_sent.plaintext!r}")

    # A replayed message is refused: its key is gone (forward secrecy).
    try:
        bob_from_alice.decrypt(one, bob, local=bob_device, remote=alice_device, now=now)
    except DuplicateMessage as exc:
        print(f"Replay:       refused with {exc.code}")

    # Save and load, as an app does across restarts (keep these bytes secret).
    saved_record, saved_account = bob_from_alice.to_bytes(), bob.to_bytes()
    bob = Account.from_bytes(saved_account)
    bob_from_alice = SessionRecord.from_bytes(saved_record)
    later = alice_to_bob.encrypt(b"still there after your restart?", now=now + 60)
    reloaded = bob_from_alice.decrypt(
        later, bob, local=bob_device, remote=alice_device, now=now + 60
    )
    print(f"After reload: {reloaded.plaintext!r}")
    print(f"Session record: {len(saved_record)} bytes")

    # Safety numbers: both compute the same 60 digits from the two user identities.
    alice_view = SafetyNumber.compute(
        "alice", alice_user.public.ed25519, "bob", bob_user.public.ed25519
    )
    bob_view = SafetyNumber.compute(
        "bob", bob_user.public.ed25519, "alice", alice_user.public.ed25519
    )
    assert alice_view.digits == bob_view.digits
    print(f"Safety number: {alice_view.grouped()}")


if __name__ == "__main__":
    main()
