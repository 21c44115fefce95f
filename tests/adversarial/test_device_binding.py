"""A device key belongs to one user: mallory's list naming alice's device key, at the
relay and in the core.

Mallory lists alice's device identity key as her own device mallory.5. A
relay that restamps the sender of alice's envelopes as mallory.5 would then
make bob read alice's words as mallory's, and bob's replies to "mallory"
would reach alice as if written to her, while alice's and bob's safety
numbers still match. The relay must refuse such a list at upload, clients
must refuse it, and a session with alice.1 must never be presented as one
with mallory.5 (tests/support/misattribution.py builds mallory's lists; the
end-to-end attack through a hostile relay is in test_hostile_relay_e2e.py).

Against the code before device proofs and user-bound sessions (protocol
version 1) the relay stored mallory's list, and alice's app received bob's
message meant for mallory as bob's message to her.
"""

from __future__ import annotations

import pytest

from hushchat.protocol.client_core import ClientCore, MessageReceived, Undecryptable
from hushchat.protocol.devices import DeviceEntry
from hushchat.protocol.errors import BadDeviceProof, BadMac
from hushchat.protocol.primitives import SeededRandom
from hushchat.transport.wire.errors import DeviceListRejected
from tests.support.harness import A, Network
from tests.support.misattribution import (
    MALLORY_5,
    Proof,
    consented,
    copied,
    forged,
    mallory_device,
    mallory_list,
    publish,
)
from tests.support.relay import connected, register, relay_config, running_relay
from tests.support.users import make_user

ALICE, BOB = A("alice"), A("bob")


# ------------------------------------------------------------------ the relay, at upload


@pytest.mark.parametrize(
    ("proof", "cause"),
    [
        (forged, "BAD_DEVICE_PROOF"),
        (copied, "BAD_DEVICE_PROOF"),
        (consented, "DUPLICATE_DEVICE_KEY"),
    ],
    ids=["forged-proof", "copied-proof", "consented"],
)
async def test_the_relay_refuses_a_list_naming_another_users_device_key(
    proof: Proof, cause: str
) -> None:
    alice = make_user("alice")
    alice_device = alice.devices[1].identity
    alice_entry = DeviceEntry.prove(alice_device, "alice", 1, alice.identity.public.ed25519)
    async with running_relay(relay_config()) as port:
        await register(port, alice)
        # As a registration, and as an update by mallory's authenticated device.
        with pytest.raises(DeviceListRejected) as refused:
            await publish(port, mallory_list(naming=(alice_device, alice_entry, proof)))
        assert refused.value.cause == cause
        await publish(port, mallory_list())
        mallory_1 = mallory_device()
        with pytest.raises(DeviceListRejected) as refused:
            await publish(
                port, mallory_list(naming=(alice_device, alice_entry, proof), counter=1), mallory_1
            )
        assert refused.value.cause == cause
        async with connected(port, alice.devices[1]) as bob_side:
            served = await bob_side.fetch_device_list("mallory")
        assert served == mallory_list()


# ------------------------------------------------------------------ the reverse, in the core


def reverse_network() -> tuple[Network, ClientCore, ClientCore]:
    net = Network(SeededRandom(b"reverse misattribution"))
    net.add_user("alice")
    net.add_user("bob")
    return net, net.core(ALICE), net.core(BOB)


@pytest.mark.parametrize("proof", [forged, copied], ids=["forged", "copied"])
def test_bob_refuses_a_list_naming_alices_key_for_mallory(proof: Proof) -> None:
    _, alice, bob = reverse_network()
    naming = (alice.account.identity, alice.device_entry, proof)
    with pytest.raises(BadDeviceProof):
        bob.process_device_list(mallory_list(naming=naming, own_device=False))
    assert bob.device_list("mallory") is None


def test_bob_cannot_be_made_to_write_to_alice_when_he_means_mallory() -> None:
    """Bob sends to "mallory" under a list naming alice's key (with a proof alice's device
    made for mallory, and bob not knowing alice); the relay serves alice's bundle as
    mallory.5's and hands bob's copy for mallory.5 to alice.1, stamped as his."""
    net = Network(SeededRandom(b"reverse misattribution"))
    net.add_user("alice")
    alice = net.core(ALICE)
    # Bob has not met alice yet: he holds his own list and the one served for mallory.
    bob = ClientCore.create_primary("bob", 1, now=net.now, rng=SeededRandom(b"bob"))
    own = bob.own_device_list
    assert own is not None
    alice.process_device_list(own.encode())
    naming = (alice.account.identity, alice.device_entry, consented)
    bob.process_device_list(mallory_list(naming=naming, own_device=False))
    bob.process_bundle(net.prekeys[ALICE].bundle(MALLORY_5).encode(), now=net.now)
    _, sends = bob.send_direct("mallory", b"for mallory only", now=net.tick())
    [to_mallory] = [s for s in sends if s.recipient_user == "mallory"]
    payload = dict(to_mallory.payloads)[5]
    outcome = alice.receive(BOB, 1, payload, now=net.tick())
    assert not any(isinstance(e, MessageReceived) for e in outcome.events), outcome.events
    assert outcome.events == (Undecryptable(BOB, BadMac.code),)
