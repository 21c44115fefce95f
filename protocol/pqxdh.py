"""X3DH and PQXDH key agreement (signal.org specifications; PQXDH revision 2).

Only the key agreement lives here: which DH outputs and KEM secret go into
the KDF, in which order, and the associated data. Sessions are built on the
result by :mod:`hushchat.protocol.session`.

    DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)
    DH4 = DH(EK_A, OPK_B)   (only with a one-time prekey)
    SS  = ML-KEM-768 shared secret   (PQXDH only)
    SK  = HKDF-SHA-256(salt = 32 zero bytes,
                       ikm  = 0xFF * 32 || DH1 || DH2 || DH3 [|| DH4] [|| SS],
                       info = PQXDH_INFO or X3DH_INFO, length 32)
    AD  = Encode(IK_A) || Encode(IK_B)
          || pack([user_id_A, device_id_A, user_identity_A,
                   user_id_B, device_id_B, user_identity_B])

Identity keys are Ed25519, used for DH in their X25519 form; ``Encode`` is
their Ed25519 encoding (0x06 || key), which binds the full identity (the
X25519 form loses the sign of x). ML-KEM binds its public key into the
shared secret, so PQXDH revision 2 section 4.12 does not require adding
``EncodeKEM(PQPK_B)`` to AD. X3DH and PQXDH use different info strings so a
session of one can never be confused with the other.

The appendix to AD names who each side believes the devices belong to (X3DH
section 3.3 and PQXDH section 3.3 allow appending identifying information):
Alice takes Bob's from the device list that names his key, Bob takes Alice's
from the list of the user the relay says sent the message. Every message of
the session is authenticated under AD, so if the two disagree (a relay
presenting alice.1 as mallory.5, under a list that names alice's device key
for mallory) nothing decrypts: a session is never with a key alone, always
with a device of a user (the unknown-key share of X3DH section 4.8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import primitives as p
from .consts import (
    ED25519_KEY_SIZE,
    KDF_PREFIX,
    PQXDH_INFO,
    SHARED_SECRET_SIZE,
    X3DH_INFO,
)
from .devices import check_identity_key, check_user_id, read_user_id
from .encoding import UINT32_MAX, Fields, pack
from .errors import InvalidArgument
from .keys import IdentityKeyPair, PublicIdentity
from .prekeys import PreKeyBundle


@dataclass(frozen=True, slots=True)
class Party:
    """Whose a session's device is: user id, device id and user identity (from a device list)."""

    user_id: str
    device_id: int
    user_identity: bytes

    def __post_init__(self) -> None:
        check_user_id(self.user_id, stored=True)
        if (
            isinstance(self.device_id, bool)
            or not isinstance(self.device_id, int)
            or not 0 <= self.device_id <= UINT32_MAX
        ):
            raise InvalidArgument("a device id is an integer from 0 to 2**32-1")
        check_identity_key(self.user_identity)

    def to_wire(self) -> list[object]:
        return [self.user_id, self.device_id, self.user_identity]

    @classmethod
    def read(cls, fields: Fields, what: str) -> Party:
        # Read only from a session pickle: a party named as when it was stored.
        nested = fields.nested(what=what, count=3)
        return cls(read_user_id(nested, stored=True), nested.uint(), nested.bin(ED25519_KEY_SIZE))

    def __str__(self) -> str:
        return f"{self.user_id}.{self.device_id}"


@dataclass(frozen=True, slots=True)
class HandshakeHeader:
    """What the responder needs to repeat the key agreement (sent in the clear)."""

    identity: PublicIdentity
    base_key: bytes
    signed_prekey_id: int
    one_time_prekey_id: int | None
    kem_prekey_id: int | None
    kem_ciphertext: bytes | None = field(repr=False)

    @property
    def is_post_quantum(self) -> bool:
        return self.kem_ciphertext is not None


@dataclass(frozen=True, slots=True)
class SharedSecret:
    """The agreed secret and associated data. Never printed."""

    secret: bytes = field(repr=False)
    associated_data: bytes = field(repr=False)


def _kdf(dh_outputs: list[bytes], kem_secret: bytes | None) -> bytes:
    ikm = KDF_PREFIX + b"".join(dh_outputs)
    info = X3DH_INFO
    if kem_secret is not None:
        ikm += kem_secret
        info = PQXDH_INFO
    return p.hkdf_sha256(ikm, salt=bytes(32), info=info, length=SHARED_SECRET_SIZE)


def associated_data(
    initiator: PublicIdentity,
    responder: PublicIdentity,
    initiator_party: Party,
    responder_party: Party,
) -> bytes:
    """``Encode(IK_A) || Encode(IK_B) || pack([party A..., party B...])`` (spec 02 section 2.4)."""
    parties = pack([*initiator_party.to_wire(), *responder_party.to_wire()])
    return initiator.encode() + responder.encode() + parties


def initiate(
    identity: IdentityKeyPair,
    bundle: PreKeyBundle,
    *,
    local: Party,
    remote: Party,
    post_quantum: bool = True,
    rng: p.RandomSource = p.SYSTEM_RANDOM,
) -> tuple[HandshakeHeader, SharedSecret]:
    """Alice's side: verify the bundle, agree on SK, say what Bob needs.

    ``local`` is whose our device is; ``remote`` whose the bundle's device
    is, per the device list that names it (its user id and device id must be
    the bundle's). Raises BadSignature for a bad prekey signature,
    NonContributoryKey for an all-zero DH output, InvalidArgument if PQXDH is
    asked of a bundle without a KEM prekey.
    """
    if (remote.user_id, remote.device_id) != (bundle.user_id, bundle.device_id):
        raise InvalidArgument("the remote party is not the bundle's device")
    bundle.verify()
    if post_quantum and bundle.kem_prekey is None:
        raise InvalidArgument("PQXDH needs a bundle with an ML-KEM prekey")
    base_key = p.x25519_generate(rng)
    spk = bundle.signed_prekey.public
    dh = [
        identity.dh(spk),
        p.x25519(base_key, bundle.identity.x25519),
        p.x25519(base_key, spk),
    ]
    if bundle.one_time_prekey is not None:
        dh.append(p.x25519(base_key, bundle.one_time_prekey.public))
    kem_secret = kem_ciphertext = None
    kem_id = None
    if post_quantum and bundle.kem_prekey is not None:
        p.mlkem768_public_key(bundle.kem_prekey.public)  # refuse undecodable keys up front
        kem_secret, kem_ciphertext = rng.encapsulate(bundle.kem_prekey.public)
        kem_id = bundle.kem_prekey.key_id
    secret = _kdf(dh, kem_secret)
    header = HandshakeHeader(
        identity=identity.public,
        base_key=p.x25519_public_bytes(base_key),
        signed_prekey_id=bundle.signed_prekey.key_id,
        one_time_prekey_id=None
        if bundle.one_time_prekey is None
        else bundle.one_time_prekey.key_id,
        kem_prekey_id=kem_id,
        kem_ciphertext=kem_ciphertext,
    )
    ad = associated_data(identity.public, bundle.identity, local, remote)
    return header, SharedSecret(secret, ad)


def respond(
    identity: IdentityKeyPair,
    header: HandshakeHeader,
    *,
    local: Party,
    remote: Party,
    signed_prekey: X25519PrivateKey,
    one_time_prekey: X25519PrivateKey | None,
    kem_prekey: MLKEM768PrivateKey | None,
) -> SharedSecret:
    """Bob's side, given the private keys the header's ids name.

    ``remote`` is whose the sending device is, per the device list of the
    user the relay says sent it; ``local`` whose ours is. The base key must
    lie in the prime-order subgroup (InvalidKey): it identifies the
    handshake for replay detection, and a torsioned copy of it would agree
    on the same SK under a different identifier.
    """
    p.check_x25519_prime_order(header.base_key)
    dh = [
        p.x25519(signed_prekey, header.identity.x25519),
        identity.dh(header.base_key),
        p.x25519(signed_prekey, header.base_key),
    ]
    if one_time_prekey is not None:
        dh.append(p.x25519(one_time_prekey, header.base_key))
    if (kem_prekey is None) != (header.kem_ciphertext is None):
        # Never fall back to X3DH (or ignore a KEM secret) behind the caller's back.
        raise InvalidArgument("a KEM prekey is needed exactly when the header has a ciphertext")
    kem_secret = None
    if kem_prekey is not None and header.kem_ciphertext is not None:
        kem_secret = p.mlkem768_decapsulate(kem_prekey, header.kem_ciphertext)
    secret = _kdf(dh, kem_secret)
    return SharedSecret(secret, associated_data(header.identity, identity.public, remote, local))
