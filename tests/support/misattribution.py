"""Mallory's device list naming alice's device key as mallory.5, with each kind of proof.

No tests here; the device-binding and hostile-relay tests import it. Mallory
cannot make alice's device sign that it is hers, so her list carries a
proof she signed herself (:func:`forged`), or alice's real proof copied from
alice's list (:func:`copied`). :func:`consented` is a proof alice's device
did make for mallory (a device key reused under a second account, say):
lists alone cannot refuse it where the other user's list is not known, so
it exercises what sessions bind.
"""

from __future__ import annotations

from collections.abc import Callable

from hushchat.protocol.client_core import Address
from hushchat.protocol.consts import DEVICE_LIST_SIGNATURE_CONTEXT
from hushchat.protocol.devices import DeviceEntry, DeviceList, device_proof_message
from hushchat.protocol.encoding import pack
from hushchat.protocol.keys import IdentityKeyPair
from tests.support.relay import connected
from tests.support.users import Device, keypair

MALLORY_5 = Address("mallory", 5)
MALLORY = keypair("mallory user")
MALLORY_DEVICE = keypair("mallory device")

# How mallory's list names alice's device key as mallory.5: the proof it carries.
Proof = Callable[[IdentityKeyPair, DeviceEntry], bytes]


def forged(alice_device: IdentityKeyPair, alice_entry: DeviceEntry) -> bytes:
    """Mallory signs the device's proof herself."""
    return MALLORY.sign(device_proof_message("mallory", 5, MALLORY.public.ed25519))


def copied(alice_device: IdentityKeyPair, alice_entry: DeviceEntry) -> bytes:
    """Alice's device's real proof, taken from alice's list (it names alice.1)."""
    return alice_entry.proof


def consented(alice_device: IdentityKeyPair, alice_entry: DeviceEntry) -> bytes:
    """A proof alice's device made for mallory.5 (the device agreed to both users)."""
    return DeviceEntry.prove(alice_device, "mallory", 5, MALLORY.public.ed25519).proof


def mallory_list(
    *,
    naming: tuple[IdentityKeyPair, DeviceEntry, Proof] | None = None,
    counter: int = 0,
    own_device: bool = True,
) -> bytes:
    """Mallory's signed list: her own device 1 and, if given, alice's device as device 5."""
    entries: tuple[DeviceEntry, ...] = ()
    if own_device:
        entries += (DeviceEntry.prove(MALLORY_DEVICE, "mallory", 1, MALLORY.public.ed25519),)
    if naming is not None:
        key, entry, proof = naming
        entries += (DeviceEntry(5, key.public.ed25519, proof(key, entry)),)
    # Signed as the wire holds it: DeviceList.sign refuses a device without its proof.
    body = DeviceList("mallory", MALLORY.public.ed25519, counter, entries).encode_body()
    return pack([body, MALLORY.sign(DEVICE_LIST_SIGNATURE_CONTEXT + body)])


def mallory_device() -> Device:
    return Device("mallory", 1, MALLORY_DEVICE)


async def publish(port: int, signed_list: bytes, device: Device | None = None) -> None:
    """Upload a device list to the relay on ``port`` (registration without ``device``)."""
    async with connected(port, device) as connection:
        await connection.upload_device_list(signed_list)
