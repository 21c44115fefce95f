"""Wire formats of one-to-one messages.

    RatchetMessage = [1, header: bin, body: bin]
    PreKeyMessage  = [2, identity: bin32, base_key: bin32, signed_prekey_id: u32,
                      one_time_prekey_id: u32 | nil, kem_prekey_id: u32 | nil,
                      kem_ciphertext: bin1088 | nil, header: bin, body: bin]

``header`` is the Double Ratchet header's canonical encoding (its bytes are
authenticated as they are); ``body`` is ciphertext || 16-byte tag. A
PreKeyMessage is a RatchetMessage plus what the responder needs to run the
key agreement; the initiator sends them until it hears back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .consts import ED25519_KEY_SIZE, MAX_MESSAGE_SIZE, MLKEM768_CIPHERTEXT_SIZE, X25519_KEY_SIZE
from .encoding import Fields, pack, unpack
from .errors import DecodeError
from .keys import PublicIdentity
from .pqxdh import HandshakeHeader
from .primitives import check_x25519_public

MESSAGE_TYPE_RATCHET = 1
MESSAGE_TYPE_PREKEY = 2


@dataclass(frozen=True, slots=True)
class RatchetMessage:
    header: bytes
    body: bytes = field(repr=False)

    def encode(self) -> bytes:
        return encode_ratchet_message(self.header, self.body)


def encode_ratchet_message(header: bytes, body: bytes) -> bytes:
    """A :class:`RatchetMessage`'s encoding without the object (every message sent needs one)."""
    return pack([MESSAGE_TYPE_RATCHET, header, body])


@dataclass(frozen=True, slots=True)
class PreKeyMessage:
    handshake: HandshakeHeader
    message: RatchetMessage

    def encode(self) -> bytes:
        h = self.handshake
        return pack(
            [
                MESSAGE_TYPE_PREKEY,
                h.identity.ed25519,
                h.base_key,
                h.signed_prekey_id,
                h.one_time_prekey_id,
                h.kem_prekey_id,
                h.kem_ciphertext,
                self.message.header,
                self.message.body,
            ]
        )


def decode_message(data: bytes) -> RatchetMessage | PreKeyMessage:
    """Decode either message type; only DecodeError (or InvalidKey) on bad input."""
    value = unpack(data, what="message", max_size=MAX_MESSAGE_SIZE)
    if not isinstance(value, list) or not value:
        raise DecodeError("message: expected a non-empty array")
    if value[0] == MESSAGE_TYPE_RATCHET:
        fields = Fields(value, what="RatchetMessage", count=3)
        fields.uint()
        header = fields.bin(max_size=128)
        return RatchetMessage(header, fields.bin())
    if value[0] == MESSAGE_TYPE_PREKEY:
        fields = Fields(value, what="PreKeyMessage", count=9)
        fields.uint()
        identity = PublicIdentity.from_bytes(fields.bin(ED25519_KEY_SIZE))
        base_key = check_x25519_public(fields.bin(X25519_KEY_SIZE))
        signed_prekey_id = fields.uint()
        one_time_prekey_id = fields.optional_uint()
        kem_prekey_id = fields.optional_uint()
        kem_ciphertext = fields.optional_bin(MLKEM768_CIPHERTEXT_SIZE)
        if (kem_prekey_id is None) != (kem_ciphertext is None):
            raise DecodeError("PreKeyMessage: KEM id and ciphertext go together")
        handshake = HandshakeHeader(
            identity,
            base_key,
            signed_prekey_id,
            one_time_prekey_id,
            kem_prekey_id,
            kem_ciphertext,
        )
        header = fields.bin(max_size=128)
        return PreKeyMessage(handshake, RatchetMessage(header, fields.bin()))
    raise DecodeError("message: unknown message type")
