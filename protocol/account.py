"""A device's long-term state: its identity key and its private prekeys.

The :class:`Account` answers initial messages. A one-time prekey is deleted,
and a one-time KEM prekey with it, only after the first message under it
decrypted (X3DH section 3.4); a handshake that used no one-time prekey has
its base key remembered, so a replay of it is refused (X3DH section 4.2).
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import primitives as p
from .consts import (
    MAX_ONE_TIME_PREKEYS,
    MAX_REMEMBERED_BASE_KEYS,
    MAX_SKIP,
    MAX_SKIPPED_KEYS,
    PREKEY_BATCH_SIZE,
    SIGNED_PREKEY_GRACE_PERIOD,
    STATE_VERSION,
)
from .double_ratchet import RatchetState
from .encoding import UINT32_MAX, UINT64_MAX, Fields, pack
from .errors import InvalidArgument, ReplayedHandshake, UnknownPreKey
from .keys import IdentityKeyPair, encode_mlkem768, encode_x25519
from .messages import PreKeyMessage
from .pickles import load_pickle
from .pqxdh import Party, initiate, respond
from .prekeys import (
    KemPreKeyPublic,
    OneTimePreKeyPublic,
    PreKeyBundle,
    PreKeyUpload,
    SignedPreKeyPublic,
)
from .session import Session


class _SignedPreKey:
    __slots__ = ("created_at", "private", "signature")

    def __init__(self, private: X25519PrivateKey, signature: bytes, created_at: int) -> None:
        self.private = private
        self.signature = signature
        self.created_at = created_at


class _KemPreKey:
    __slots__ = ("private", "signature")

    def __init__(self, private: MLKEM768PrivateKey, signature: bytes) -> None:
        self.private = private
        self.signature = signature


class Account:
    """A device identity and the private halves of everything it published."""

    def __init__(self, identity: IdentityKeyPair) -> None:
        self.identity = identity
        self._next_id = 1
        self._signed: dict[int, _SignedPreKey] = {}
        self._current_signed_id = 0
        self._one_time: dict[int, X25519PrivateKey] = {}
        self._kem_one_time: dict[int, _KemPreKey] = {}
        self._kem_last_resort_id = 0
        self._kem_last_resort: dict[int, _KemPreKey] = {}
        # (signed prekey id, base key) of accepted handshakes without a one-time prekey.
        self._seen_base_keys: list[tuple[int, bytes]] = []

    # ------------------------------------------------------------ creation

    @classmethod
    def create(
        cls,
        *,
        now: int,
        one_time_prekeys: int = PREKEY_BATCH_SIZE,
        rng: p.RandomSource = p.SYSTEM_RANDOM,
    ) -> Account:
        """A new identity with a signed prekey, a last-resort KEM prekey and one-time prekeys."""
        account = cls(IdentityKeyPair.generate(rng))
        account.rotate_signed_prekey(now=now, rng=rng)
        account.rotate_last_resort_kem_prekey(rng=rng)
        account.generate_one_time_prekeys(one_time_prekeys, rng=rng)
        return account

    def _take_id(self) -> int:
        # Monotonic ids: a reused id could make a peer's in-flight handshake
        # pick up a different key (a failure mode seen in other clients).
        key_id = self._next_id
        if key_id > UINT32_MAX:
            raise InvalidArgument("prekey ids exhausted")
        self._next_id += 1
        return key_id

    def rotate_signed_prekey(self, *, now: int, rng: p.RandomSource = p.SYSTEM_RANDOM) -> int:
        """Make a new signed prekey current; older ones are kept until :meth:`prune`."""
        private = p.x25519_generate(rng)
        signature = self.identity.sign(encode_x25519(p.x25519_public_bytes(private)))
        key_id = self._take_id()
        self._signed[key_id] = _SignedPreKey(private, signature, now)
        self._current_signed_id = key_id
        return key_id

    def rotate_last_resort_kem_prekey(self, *, rng: p.RandomSource = p.SYSTEM_RANDOM) -> int:
        """Make a new last-resort ML-KEM prekey current; the previous one stays usable."""
        key_id = self._take_id()
        self._kem_last_resort[key_id] = self._new_kem(rng)
        self._kem_last_resort_id = key_id
        # Keep the previous one for handshakes in flight, no more.
        for old in sorted(self._kem_last_resort)[:-2]:
            del self._kem_last_resort[old]
        return key_id

    def _new_kem(self, rng: p.RandomSource) -> _KemPreKey:
        private = p.mlkem768_generate(rng)
        signature = self.identity.sign(encode_mlkem768(p.mlkem768_public_bytes(private)))
        return _KemPreKey(private, signature)

    def generate_one_time_prekeys(
        self,
        count: int,
        *,
        rng: p.RandomSource = p.SYSTEM_RANDOM,
        max_kept: int = MAX_ONE_TIME_PREKEYS,
    ) -> None:
        """Add ``count`` one-time X25519 prekeys and as many one-time ML-KEM prekeys.

        Of each kind at most ``max_kept`` are kept: beyond it the oldest (lowest
        ids, the first the relay hands out) are deleted, and an initial message
        that names one is refused as any spent key is (UNKNOWN_PREKEY).
        """
        if isinstance(max_kept, bool) or not isinstance(max_kept, int) or max_kept < 1:
            raise InvalidArgument("max_kept is a positive integer")
        for _ in range(count):
            self._one_time[self._take_id()] = p.x25519_generate(rng)
            self._kem_one_time[self._take_id()] = self._new_kem(rng)
        for keys in (self._one_time, self._kem_one_time):
            for key_id in sorted(keys)[:-max_kept]:
                del keys[key_id]

    def prune(self, *, now: int, grace_period: int = SIGNED_PREKEY_GRACE_PERIOD) -> None:
        """Delete signed prekeys older than the current one by more than the grace period."""
        # The grace period runs from when the current key replaced the old ones.
        if now - self._signed[self._current_signed_id].created_at <= grace_period:
            return
        for key_id in [k for k in self._signed if k != self._current_signed_id]:
            del self._signed[key_id]
        self._seen_base_keys = [e for e in self._seen_base_keys if e[0] in self._signed]

    # ------------------------------------------------------------ publishing

    @property
    def signed_prekey_age_start(self) -> int:
        """When the current signed prekey was made (to decide on rotation)."""
        return self._signed[self._current_signed_id].created_at

    def _signed_public(self) -> SignedPreKeyPublic:
        spk = self._signed[self._current_signed_id]
        return SignedPreKeyPublic(
            self._current_signed_id, p.x25519_public_bytes(spk.private), spk.signature
        )

    @staticmethod
    def _kem_public(key_id: int, kem: _KemPreKey) -> KemPreKeyPublic:
        return KemPreKeyPublic(key_id, p.mlkem768_public_bytes(kem.private), kem.signature)

    def prekey_upload(self) -> PreKeyUpload:
        """Everything to publish: current signed keys and all unused one-time keys."""
        last_resort = self._kem_last_resort[self._kem_last_resort_id]
        return PreKeyUpload(
            signed_prekey=self._signed_public(),
            last_resort_kem_prekey=self._kem_public(self._kem_last_resort_id, last_resort),
            one_time_prekeys=tuple(
                OneTimePreKeyPublic(key_id, p.x25519_public_bytes(key))
                for key_id, key in self._one_time.items()
            ),
            one_time_kem_prekeys=tuple(
                self._kem_public(key_id, kem) for key_id, kem in self._kem_one_time.items()
            ),
        )

    def bundle(
        self, user_id: str, device_id: int, *, one_time: bool = True, post_quantum: bool = True
    ) -> PreKeyBundle:
        """A bundle built locally, for use without a relay (tests, examples).

        Takes the oldest one-time keys without deleting them: deleting is the
        job of whoever hands the bundle out, and of :meth:`create_inbound_session`.
        """
        opk = kem = None
        last_resort = False
        if one_time and self._one_time:
            key_id, key = next(iter(self._one_time.items()))
            opk = OneTimePreKeyPublic(key_id, p.x25519_public_bytes(key))
        if post_quantum:
            if one_time and self._kem_one_time:
                kem_id, kem_key = next(iter(self._kem_one_time.items()))
                last_resort = False
            else:
                kem_id = self._kem_last_resort_id
                kem_key = self._kem_last_resort[kem_id]
                last_resort = True
            kem = self._kem_public(kem_id, kem_key)
        return PreKeyBundle(
            user_id, device_id, self.identity.public, self._signed_public(), opk, kem, last_resort
        )

    # ------------------------------------------------------------ sessions

    def create_outbound_session(
        self,
        bundle: PreKeyBundle,
        *,
        local: Party,
        remote: Party,
        now: int,
        post_quantum: bool = True,
        rng: p.RandomSource = p.SYSTEM_RANDOM,
    ) -> Session:
        """Start a session from a peer's bundle (PQXDH by default, X3DH if asked).

        ``local`` and ``remote`` say whose each device is (spec/02-pqxdh.md
        section 2.4): ours, and the bundle's per the device list naming it.
        """
        header, shared = initiate(
            self.identity, bundle, local=local, remote=remote, post_quantum=post_quantum, rng=rng
        )
        ratchet = RatchetState.initiator(shared.secret, bundle.signed_prekey.public, rng)
        return Session(
            ratchet=ratchet,
            local_identity=self.identity.public,
            remote_identity=bundle.identity,
            local=local,
            remote=remote,
            is_initiator=True,
            base_key=header.base_key,
            created_at=now,
            pending=header,
        )

    def create_inbound_session(
        self,
        message: PreKeyMessage,
        *,
        local: Party,
        remote: Party,
        now: int,
        rng: p.RandomSource = p.SYSTEM_RANDOM,
        max_skip: int = MAX_SKIP,
        max_skipped_keys: int = MAX_SKIPPED_KEYS,
    ) -> tuple[Session, bytes]:
        """Answer an initial message: (new session, first plaintext).

        ``remote`` is whose the sending device is (per its user's device
        list), ``local`` whose ours is; the initiator must have bound the same
        (else BadMac). The account changes only if the first message
        decrypts: then the one-time prekeys it used are deleted, or its base
        key remembered.
        """
        h = message.handshake
        spk = self._signed.get(h.signed_prekey_id)
        if spk is None:
            raise UnknownPreKey("unknown signed prekey")
        opk = None
        if h.one_time_prekey_id is not None:
            opk = self._one_time.get(h.one_time_prekey_id)
            if opk is None:
                raise UnknownPreKey("unknown or already used one-time prekey")
        elif (h.signed_prekey_id, h.base_key) in self._seen_base_keys:
            raise ReplayedHandshake("this initial message was already accepted")
        kem = None
        if h.kem_prekey_id is not None:
            kem_entry = self._kem_one_time.get(h.kem_prekey_id) or self._kem_last_resort.get(
                h.kem_prekey_id
            )
            if kem_entry is None:
                raise UnknownPreKey("unknown or already used KEM prekey")
            kem = kem_entry.private
        shared = respond(
            self.identity,
            h,
            local=local,
            remote=remote,
            signed_prekey=spk.private,
            one_time_prekey=opk,
            kem_prekey=kem,
        )
        session = Session(
            ratchet=RatchetState.responder(shared.secret, spk.private),
            local_identity=self.identity.public,
            remote_identity=h.identity,
            local=local,
            remote=remote,
            is_initiator=False,
            base_key=h.base_key,
            created_at=now,
            pending=None,
        )
        plaintext = session.decrypt(
            message.message, rng=rng, max_skip=max_skip, max_skipped_keys=max_skipped_keys
        )
        # Commit: the keys are spent.
        if h.one_time_prekey_id is not None:
            del self._one_time[h.one_time_prekey_id]
        else:
            self._seen_base_keys.append((h.signed_prekey_id, h.base_key))
            del self._seen_base_keys[:-MAX_REMEMBERED_BASE_KEYS]
        if h.kem_prekey_id is not None:
            self._kem_one_time.pop(h.kem_prekey_id, None)
        return session, plaintext

    @property
    def one_time_prekey_count(self) -> int:
        return len(self._one_time)

    @property
    def signed_prekey_ids(self) -> tuple[int, ...]:
        """Ids of the signed prekeys held: the current one and replaced ones not yet pruned."""
        return tuple(sorted(self._signed))

    @property
    def remembered_base_keys(self) -> tuple[tuple[int, bytes], ...]:
        """(signed prekey id, base key) of handshakes accepted without a one-time prekey,
        oldest first."""
        return tuple(self._seen_base_keys)

    # ------------------------------------------------------------ serialization

    def to_bytes(self) -> bytes:
        return pack(
            [
                STATE_VERSION,
                self.identity.seed,
                self._next_id,
                self._current_signed_id,
                [
                    [key_id, p.x25519_private_bytes(s.private), s.signature, s.created_at]
                    for key_id, s in self._signed.items()
                ],
                [[key_id, p.x25519_private_bytes(k)] for key_id, k in self._one_time.items()],
                [
                    [key_id, p.mlkem768_seed(k.private), k.signature]
                    for key_id, k in self._kem_one_time.items()
                ],
                self._kem_last_resort_id,
                [
                    [key_id, p.mlkem768_seed(k.private), k.signature]
                    for key_id, k in self._kem_last_resort.items()
                ],
                [[spk_id, base_key] for spk_id, base_key in self._seen_base_keys],
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Account:
        def read_kem(items: list[object]) -> dict[int, _KemPreKey]:
            out = {}
            for item in items:
                f = Fields(item, what="kem_prekey", count=3)
                key_id = f.uint()
                out[key_id] = _KemPreKey(p.mlkem768_private_from_seed(f.bin(64)), f.bin(64))
            return out

        def read(fields: Fields) -> Account:
            account = cls(IdentityKeyPair(fields.bin(32)))
            account._next_id = fields.uint(UINT32_MAX + 1)
            account._current_signed_id = fields.uint()
            for item in fields.array(max_len=UINT32_MAX):
                f = Fields(item, what="signed_prekey", count=4)
                key_id = f.uint()
                account._signed[key_id] = _SignedPreKey(
                    p.x25519_private_from_bytes(f.bin(32)), f.bin(64), f.uint(UINT64_MAX)
                )
            for item in fields.array(max_len=UINT32_MAX):
                f = Fields(item, what="one_time_prekey", count=2)
                key_id = f.uint()
                account._one_time[key_id] = p.x25519_private_from_bytes(f.bin(32))
            account._kem_one_time = read_kem(fields.array(max_len=UINT32_MAX))
            account._kem_last_resort_id = fields.uint()
            account._kem_last_resort = read_kem(fields.array(max_len=UINT32_MAX))
            for item in fields.array(max_len=MAX_REMEMBERED_BASE_KEYS):
                f = Fields(item, what="seen_base_key", count=2)
                account._seen_base_keys.append((f.uint(), f.bin(32)))
            if (
                account._current_signed_id not in account._signed
                or account._kem_last_resort_id not in account._kem_last_resort
            ):
                raise InvalidArgument("current prekey missing")
            return account

        return load_pickle(data, "Account", read)

    def __repr__(self) -> str:
        return (
            f"Account(identity={self.identity.public.ed25519.hex()}, "
            f"one_time_prekeys={len(self._one_time)})"
        )
