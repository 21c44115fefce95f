"""Users of the tests: deterministic identities, devices, and the device lists users sign.

The device-list, group and relay tests all build their parties here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from hushchat.protocol.consts import DEVICE_LIST_SIGNATURE_CONTEXT, PROTOCOL_VERSION
from hushchat.protocol.devices import (
    DeviceEntry,
    DeviceList,
    SignedDeviceList,
    device_proof_message,
)
from hushchat.protocol.encoding import pack
from hushchat.protocol.keys import IdentityKeyPair


def keypair(label: str) -> IdentityKeyPair:
    """The identity key pair named ``label``: the same label always gives the same keys."""
    return IdentityKeyPair(hashlib.sha256(label.encode()).digest())


@dataclass
class Device:
    user_id: str
    device_id: int
    identity: IdentityKeyPair

    @property
    def address(self) -> tuple[str, int]:
        return (self.user_id, self.device_id)


@dataclass
class User:
    """A user with a user identity and devices; signs its own device lists."""

    user_id: str
    identity: IdentityKeyPair
    devices: dict[int, Device] = field(default_factory=dict)
    counter: int = 0

    @property
    def public_identity(self) -> bytes:
        """The user identity's public key, as device lists and group members carry it."""
        return self.identity.public.ed25519

    def signed_device_list(self) -> SignedDeviceList:
        """The user's current devices, at the current counter, signed by the user identity."""
        entries = tuple(
            DeviceEntry.prove(d.identity, self.user_id, d.device_id, self.public_identity)
            for d in sorted(self.devices.values(), key=lambda d: d.device_id)
        )
        device_list = DeviceList(self.user_id, self.public_identity, self.counter, entries)
        return device_list.sign(self.identity)

    def signed_list(self) -> bytes:
        """:meth:`signed_device_list`, encoded (what a device uploads to the relay)."""
        return self.signed_device_list().encode()

    def add_device(self, device_id: int, label: str | None = None) -> Device:
        device = Device(self.user_id, device_id, keypair(label or f"{self.user_id}/{device_id}"))
        self.devices[device_id] = device
        self.counter += 1
        return device

    def remove_device(self, device_id: int) -> None:
        del self.devices[device_id]
        self.counter += 1


def make_user(user_id: str, device_ids: Iterable[int] = (1,)) -> User:
    """A user with these devices in its first device list (counter 0)."""
    user = User(user_id, keypair(f"user:{user_id}"))
    for device_id in device_ids:
        user.devices[device_id] = Device(user_id, device_id, keypair(f"{user_id}/{device_id}"))
    return user


def signed_list_naming(user_id: str, device_id: int = 1) -> bytes:
    """A device list of ``user_id`` signed as a hostile client would, byte by byte: it
    names any user id (one DeviceEntry.prove refuses too), with valid signatures."""
    user, device = keypair(f"user:{user_id}"), keypair(f"{user_id}/{device_id}")
    user_public = user.public.ed25519
    proof = device.sign(device_proof_message(user_id, device_id, user_public))
    body = pack(
        [PROTOCOL_VERSION, user_id, user_public, 0, [[device_id, device.public.ed25519, proof]]]
    )
    return pack([body, user.sign(DEVICE_LIST_SIGNATURE_CONTEXT + body)])
