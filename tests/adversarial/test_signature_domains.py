"""A signature collected in one role never serves in another (spec 9.5).

A hostile relay collects what devices sign for it (AUTH, over a challenge
and a name it picks) and everything they publish (prekeys, device lists,
group changes, group messages). Each kind of signed bytes starts with its
own domain, and no start is a prefix of another, so no signature of one
kind verifies as another. These check, with the code's own signing, that
each kind's signed bytes start as the table of 9.5 says.
"""

from __future__ import annotations

from hushchat.protocol.client_core import Address
from hushchat.protocol.devices import DeviceEntry, SignedDeviceList
from hushchat.protocol.encoding import pack
from hushchat.protocol.group import GENESIS_PARENT_HASH, ControlMessage, SetTitle
from hushchat.protocol.keys import encode_mlkem768, encode_x25519, sign_prekey
from hushchat.protocol.primitives import ed25519_verify
from hushchat.protocol.sender_keys import signed_bytes
from hushchat.transport.wire.auth import sign_auth
from tests.support.users import make_user

# The "signed bytes start with" column of spec 9.5.
STARTS = {
    "signed prekey": b"\x05",
    "KEM prekey": b"\x0b",
    "group control": b"hushchat_group_control",
    "relay auth": b"hushchat_relay_auth",
    "device proof": b"hushchat_device_proof",
    "device list": b"hushchat_device_list",
    "group message": b"\x92",
}


def test_no_start_is_a_prefix_of_another() -> None:
    for kind, start in STARTS.items():
        for other, other_start in STARTS.items():
            if kind != other:
                assert not other_start.startswith(start), (kind, other)


def test_each_kind_signs_behind_its_own_start() -> None:
    alice = make_user("alice")
    device = alice.devices[1].identity
    device_public = device.public.ed25519
    user_public = alice.identity.public.ed25519

    challenge, relay_name = bytes(range(32)), "relay.example"
    auth = sign_auth(device, relay_name, challenge, "alice", 1)
    ed25519_verify(
        device_public, auth, STARTS["relay auth"] + pack([relay_name, challenge, "alice", 1])
    )

    entry = DeviceEntry.prove(device, "alice", 1, user_public)
    ed25519_verify(
        device_public, entry.proof, STARTS["device proof"] + pack(["alice", 1, user_public])
    )

    signed = SignedDeviceList.decode(alice.signed_list())
    ed25519_verify(user_public, signed.signature, STARTS["device list"] + signed.body)

    change = ControlMessage.sign(
        device,
        group_id=bytes(16),
        parent_epoch=0,
        parent_hash=GENESIS_PARENT_HASH,
        author_user_id="alice",
        author_device_id=1,
        action=SetTitle("t"),
    )
    ed25519_verify(device_public, change.signature, STARTS["group control"] + change.body)

    x25519_key, mlkem_key = bytes([9]) * 32, bytes([1]) * 1184
    for kind, encoded in (
        ("signed prekey", encode_x25519(x25519_key)),
        ("KEM prekey", encode_mlkem768(mlkem_key)),
    ):
        assert encoded.startswith(STARTS[kind])
        ed25519_verify(device_public, sign_prekey(device, encoded), encoded)

    assert signed_bytes(Address("alice", 1), b"body").startswith(STARTS["group message"])
