"""Linking a new device to an existing user, as the chat does it (``/link``).

The relay knows no "link" operation, and a short code cannot carry a public
key, so the new device brings its key to the user's first device through
the relay as an ordinary end-to-end encrypted message, and the user
authenticates it by typing a short code across:

1. The new device registers a throwaway user ``link-<10 random hex digits>``
   (its only purpose is to be able to send one message), fetches the
   signed device list of the user it joins, and picks the lowest free
   device id ``n``. It creates its own keys (the device identity ``D``;
   the private key never leaves it), signs with ``D`` that it is device
   ``n`` of the user (its proof ``P``, spec/11-devices.md section 11.1) and
   sends the user a *link request*, ``LINK_REQUEST_PREFIX || msgpack([2,
   n, D, P])``, encrypted like any message, to every device of the user.
2. It shows the *link code*: the first 50 bits of SHA-256 over
   ``"hushchat link code v1" || 0x00 || msgpack([user_id,
   user_identity, n, D])``, as ten characters of Crockford's base32
   (``7KQ2M-9XD4H``), with the user identity as the new device got it.
3. On the first device the user types ``/link 7KQ2M-9XD4H``. The chat
   computes the code of each request it received in the last
   :data:`LINK_REQUEST_LIFETIME` seconds (at most :data:`MAX_LINK_REQUESTS`)
   with the user identity it holds itself, and links the device whose
   code matches: it signs a new device list naming ``n`` with ``D`` and
   ``P`` (the list refuses a proof that is not ``D``'s for this user).
4. The new device sees its key in the user's list and starts as that user's
   device ``n``: it asks the first device for its groups, as any linked
   device does.

What the code proves. The relay sees only a new user sending a ciphertext:
it does not learn ``D`` or the code before the link is made. To have its own
key linked it must send a request of its own and hope that its code equals
the one the user types, one chance in 2**50 per request, with at most
:data:`MAX_LINK_REQUESTS` requests considered. Learning ``D`` later does not
help: by then the link is made. If the relay gives the new device a false
user identity, the new device's code is computed over it, the first device
computes it over the real one, and no request matches: the first device
refuses (so trust the first device's verdict). Someone who sends many
requests can push a real one out of the window, which makes the user start
again (a nuisance, not a link). The throwaway user stays registered at the
relay; at a relay that registers by invitation it takes a token (the chat's
``--link --invite TOKEN``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import msgpack

from hushchat.protocol.consts import ED25519_SIGNATURE_SIZE, MAX_DEVICES_PER_USER
from hushchat.protocol.devices import DeviceEntry

LINK_REQUEST_PREFIX = b"hushchat link request\x00"
LINK_CODE_CONTEXT = b"hushchat link code v1\x00"
# Version 2 carries the new device's proof that it is the user's device n.
LINK_REQUEST_VERSION = 2
# A request older than this is ignored: the user types the code within minutes.
LINK_REQUEST_LIFETIME = 600.0
# Requests considered at once: each is one chance for a forger (module docstring).
MAX_LINK_REQUESTS = 3
# Crockford's base32: no I, L, O or U, so what is read aloud is typed right.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_CHARACTERS = 10  # 50 bits
THROWAWAY_PREFIX = "link-"


@dataclass(frozen=True, slots=True)
class LinkRequest:
    """A new device's request to become device ``device_id`` with identity key ``identity``,
    and its ``proof`` that it agrees to (the device entry its user's list will carry)."""

    device_id: int
    identity: bytes
    proof: bytes

    @classmethod
    def of(cls, entry: DeviceEntry) -> LinkRequest:
        return cls(entry.device_id, entry.identity, entry.proof)

    @property
    def entry(self) -> DeviceEntry:
        return DeviceEntry(self.device_id, self.identity, self.proof)

    def encode(self) -> bytes:
        # msgpack has no type hints: its packb is declared bytes here, as protocol/encoding does.
        body: bytes = msgpack.packb(
            [LINK_REQUEST_VERSION, self.device_id, self.identity, self.proof]
        )
        return LINK_REQUEST_PREFIX + body

    @classmethod
    def decode(cls, body: bytes) -> LinkRequest | None:
        """The request in a message body; None if the body is none (or malformed)."""
        if not body.startswith(LINK_REQUEST_PREFIX):
            return None
        try:
            version, device_id, identity, proof = msgpack.unpackb(body[len(LINK_REQUEST_PREFIX) :])
        except (ValueError, TypeError):
            return None
        if (
            version != LINK_REQUEST_VERSION
            or not isinstance(device_id, int)
            or not 1 <= device_id <= 2**32 - 1
            or not isinstance(identity, bytes)
            or len(identity) != 32
            or not isinstance(proof, bytes)
            or len(proof) != ED25519_SIGNATURE_SIZE
        ):
            return None
        return cls(device_id, identity, proof)


def link_code(user_id: str, user_identity: bytes, device_id: int, identity: bytes) -> str:
    """The code a new device shows and its user types on the first device: ``XXXXX-XXXXX``."""
    digest = hashlib.sha256(
        LINK_CODE_CONTEXT + msgpack.packb([user_id, user_identity, device_id, identity])
    ).digest()
    bits = int.from_bytes(digest[:8], "big") >> (64 - 5 * CODE_CHARACTERS)
    chars = [_ALPHABET[(bits >> (5 * i)) & 31] for i in reversed(range(CODE_CHARACTERS))]
    half = CODE_CHARACTERS // 2
    return "".join(chars[:half]) + "-" + "".join(chars[half:])


def normalise_code(typed: str) -> str:
    """A typed code in the form :func:`link_code` gives (case, spaces, dashes, O/0, I/L/1)."""
    text = typed.upper().replace("-", "").replace(" ", "")
    text = text.replace("O", "0").replace("I", "1").replace("L", "1")
    half = CODE_CHARACTERS // 2
    return text[:half] + "-" + text[half:]


def codes_match(typed: str, expected: str) -> bool:
    return hmac.compare_digest(normalise_code(typed).encode(), expected.encode())


def free_device_id(device_ids: tuple[int, ...]) -> int | None:
    """The lowest device id a new device can take; None if the user has the most allowed."""
    if len(device_ids) >= MAX_DEVICES_PER_USER:
        return None
    return next(i for i in range(1, MAX_DEVICES_PER_USER + 2) if i not in device_ids)


def throwaway_user_id() -> str:
    return THROWAWAY_PREFIX + secrets.token_hex(5)
