"""Device authentication: the exact bytes a device signs to prove its identity key.

On every connection the relay sends a fresh random challenge in WELCOME.
The device answers with AUTH, carrying an Ed25519 signature by its device
identity key over::

    RELAY_AUTH_CONTEXT || pack([relay_name: str, challenge: bin(32),
                                user_id: str, device_id: uint32])

``pack`` is canonical msgpack, so the four values are unambiguous. The
context prefix separates these signatures from every other signature a
device identity makes (prekey signatures sign ``Encode(PK)``, which starts
with a key type byte 0x05 or 0x0B, never with ``h``). The challenge makes a
signature good for one connection only; ``relay_name`` (announced in
WELCOME, checked by a client that knows which relay it meant to reach) makes
it useless at any other relay.
"""

from __future__ import annotations

from typing import Final

from hushchat.protocol.encoding import pack
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.primitives import ed25519_verify

RELAY_AUTH_CONTEXT: Final = b"hushchat_relay_auth"

# Bytes of randomness in a challenge: enough that no two connections ever
# share one (birthday bound 2^128).
AUTH_CHALLENGE_SIZE: Final = 32


def auth_message(relay_name: str, challenge: bytes, user_id: str, device_id: int) -> bytes:
    """The bytes a device signs in AUTH."""
    return RELAY_AUTH_CONTEXT + pack([relay_name, challenge, user_id, device_id])


def sign_auth(
    identity: IdentityKeyPair, relay_name: str, challenge: bytes, user_id: str, device_id: int
) -> bytes:
    """The AUTH signature of ``identity`` (the device identity key pair)."""
    return identity.sign(auth_message(relay_name, challenge, user_id, device_id))


def verify_auth(
    identity_public: bytes,
    signature: bytes,
    relay_name: str,
    challenge: bytes,
    user_id: str,
    device_id: int,
) -> None:
    """Check an AUTH signature; BadSignature (or InvalidKey) if it does not verify."""
    ed25519_verify(
        identity_public, signature, auth_message(relay_name, challenge, user_id, device_id)
    )
