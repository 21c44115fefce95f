"""Sessions with one peer device, and the record that keeps them.

A :class:`Session` is one Double Ratchet conversation born from one
handshake. A :class:`SessionRecord` holds, per peer device, the current
session and up to ``MAX_PREVIOUS_SESSIONS`` previous ones, as libsignal
does (spec/05-session-management.md):

* sending uses the current session;
* a ratchet message is tried on the current session, then on the previous
  ones, newest first; the one that decrypts becomes current (promotion).
  ``DuplicateMessage`` from any of them is final;
* a prekey message whose base key matches a held session goes to that
  session; otherwise it creates a new session, which becomes current, and
  the old current one is archived;
* simultaneous initiation (both sides start at once) therefore converges:
  each side's current session becomes the one the other side last
  successfully used, and after one message in each direction both hold the
  same current session.

Every decrypt is transactional: on any error, nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from . import primitives as p
from .consts import (
    ED25519_KEY_SIZE,
    MAX_PREVIOUS_SESSIONS,
    MAX_SKIP,
    MAX_SKIPPED_KEYS,
    MAX_UNACKNOWLEDGED_SESSION_AGE,
    MLKEM768_CIPHERTEXT_SIZE,
    STATE_VERSION,
)
from .double_ratchet import RatchetState
from .encoding import UINT64_MAX, Fields, pack
from .errors import (
    DuplicateMessage,
    InvalidState,
    NoSession,
    ProtocolError,
    UntrustedIdentity,
)
from .keys import PublicIdentity
from .messages import PreKeyMessage, RatchetMessage, decode_message, encode_ratchet_message
from .pickles import load_pickle
from .pqxdh import HandshakeHeader, Party, associated_data

if TYPE_CHECKING:
    from .account import Account

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class DecryptResult:
    plaintext: bytes
    # True when a new session was created from a prekey message.
    new_session: bool


class Session:
    """One Double Ratchet session with one peer device."""

    __slots__ = (
        "associated_data",
        "base_key",
        "created_at",
        "is_initiator",
        "local",
        "local_identity",
        "pending",
        "ratchet",
        "remote",
        "remote_identity",
    )

    def __init__(
        self,
        *,
        ratchet: RatchetState,
        local_identity: PublicIdentity,
        remote_identity: PublicIdentity,
        local: Party,
        remote: Party,
        is_initiator: bool,
        base_key: bytes,
        created_at: int,
        pending: HandshakeHeader | None,
    ) -> None:
        self.ratchet = ratchet
        self.local_identity = local_identity
        self.remote_identity = remote_identity
        # Whose each device is, as bound into the associated data (spec 02 section 2.4).
        self.local = local
        self.remote = remote
        self.is_initiator = is_initiator
        self.base_key = base_key
        self.created_at = created_at
        # The handshake an initiator repeats until its first reply arrives.
        self.pending = pending
        if is_initiator:
            ad = associated_data(local_identity, remote_identity, local, remote)
        else:
            ad = associated_data(remote_identity, local_identity, remote, local)
        self.associated_data = ad

    @property
    def acknowledged(self) -> bool:
        """Whether the peer has answered (initiator) or we answered a handshake (responder)."""
        return self.pending is None

    def usable_for_sending(self, now: int, max_age: int = MAX_UNACKNOWLEDGED_SESSION_AGE) -> bool:
        return self.ratchet.can_send and (self.acknowledged or now - self.created_at <= max_age)

    def encrypt(self, plaintext: bytes) -> bytes:
        header, body = self.ratchet.encrypt(plaintext, self.associated_data)
        if self.pending is not None:
            return PreKeyMessage(self.pending, RatchetMessage(header, body)).encode()
        return encode_ratchet_message(header, body)

    def decrypt(
        self,
        message: RatchetMessage,
        *,
        rng: p.RandomSource = p.SYSTEM_RANDOM,
        max_skip: int = MAX_SKIP,
        max_skipped_keys: int = MAX_SKIPPED_KEYS,
    ) -> bytes:
        plaintext = self.ratchet.decrypt(
            message.header,
            message.body,
            self.associated_data,
            rng=rng,
            max_skip=max_skip,
            max_skipped_keys=max_skipped_keys,
        )
        self.pending = None
        return plaintext

    # ------------------------------------------------------------ serialization

    def to_wire(self) -> list[object]:
        pending = None
        if self.pending is not None:
            h = self.pending
            pending = [h.signed_prekey_id, h.one_time_prekey_id, h.kem_prekey_id, h.kem_ciphertext]
        return [
            self.local_identity.ed25519,
            self.remote_identity.ed25519,
            self.local.to_wire(),
            self.remote.to_wire(),
            self.is_initiator,
            self.base_key,
            self.created_at,
            pending,
            self.ratchet.to_wire(),
        ]

    @classmethod
    def from_wire(cls, value: object) -> Session:
        fields = Fields(value, what="Session", count=9)
        local = PublicIdentity.from_bytes(fields.bin(ED25519_KEY_SIZE))
        remote = PublicIdentity.from_bytes(fields.bin(ED25519_KEY_SIZE))
        local_party = Party.read(fields, "local")
        remote_party = Party.read(fields, "remote")
        is_initiator = fields.boolean()
        base_key = fields.bin(32)
        created_at = fields.uint(UINT64_MAX)
        pending = None
        if fields.peek() is None:
            fields.raw()
        else:
            nested = fields.nested(what="pending", count=4)
            pending = HandshakeHeader(
                local,
                base_key,
                nested.uint(),
                nested.optional_uint(),
                nested.optional_uint(),
                nested.optional_bin(MLKEM768_CIPHERTEXT_SIZE),
            )
        ratchet = RatchetState.from_wire(fields.nested(what="ratchet", count=10))
        fields.end()
        return cls(
            ratchet=ratchet,
            local_identity=local,
            remote_identity=remote,
            local=local_party,
            remote=remote_party,
            is_initiator=is_initiator,
            base_key=base_key,
            created_at=created_at,
            pending=pending,
        )

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        return (
            f"Session({role}, remote={self.remote} {self.remote_identity.ed25519.hex()[:16]}, "
            f"acknowledged={self.acknowledged}, {self.ratchet!r})"
        )


class SessionRecord:
    """All sessions with one peer device: the current one and previous ones."""

    __slots__ = ("current", "max_previous", "previous")

    def __init__(
        self,
        current: Session | None = None,
        previous: list[Session] | None = None,
        *,
        max_previous: int = MAX_PREVIOUS_SESSIONS,
    ) -> None:
        self.current = current
        self.previous: list[Session] = previous or []
        self.max_previous = max_previous

    @property
    def remote_identity(self) -> PublicIdentity | None:
        return None if self.current is None else self.current.remote_identity

    def sessions(self) -> list[Session]:
        return ([self.current] if self.current is not None else []) + self.previous

    def has_usable_session(self, now: int) -> bool:
        return self.current is not None and self.current.usable_for_sending(now)

    def install(self, session: Session) -> None:
        """Make ``session`` current; the old current one becomes the newest previous.

        Sessions with another peer (another identity key, or the key bound to
        another user) are dropped: this record is for one device of one user.
        """
        if self.current is not None:
            current = self.current
            if (current.remote_identity, current.remote) != (
                session.remote_identity,
                session.remote,
            ):
                self.previous = []
            else:
                self.previous.insert(0, self.current)
        self.current = session
        del self.previous[self.max_previous :]

    def _promote(self, session: Session) -> None:
        if session is not self.current:
            self.previous.remove(session)
            self.install(session)

    def encrypt(self, plaintext: bytes, *, now: int) -> bytes:
        """Encrypt for the peer with the current session."""
        if self.current is None or not self.current.usable_for_sending(now):
            raise InvalidState("no usable session: start one from a fresh prekey bundle")
        return self.current.encrypt(plaintext)

    def decrypt(
        self,
        data: bytes,
        account: Account,
        *,
        local: Party,
        remote: Party,
        now: int,
        rng: p.RandomSource = p.SYSTEM_RANDOM,
        trust_new_identity: bool = False,
        max_skip: int = MAX_SKIP,
        max_skipped_keys: int = MAX_SKIPPED_KEYS,
    ) -> DecryptResult:
        """Decrypt a message from this peer device (either type).

        ``remote`` is whose the peer device is, per the device list of its
        user, and ``local`` whose ours is: a prekey message creates a session
        bound to both (spec/02-pqxdh.md section 2.4). A prekey message from
        an identity other than the one this record holds raises
        UntrustedIdentity unless ``trust_new_identity`` (the app confirmed
        the change); then the old sessions are dropped.
        """
        message = decode_message(data)
        if isinstance(message, PreKeyMessage):
            known = self.remote_identity
            if known is not None and known != message.handshake.identity and not trust_new_identity:
                raise UntrustedIdentity("the peer's identity key changed")
            for session in self.sessions():
                if session.base_key == message.handshake.base_key:
                    return self._decrypt_with(
                        [session], message.message, rng, max_skip, max_skipped_keys
                    )
            session, plaintext = account.create_inbound_session(
                message,
                local=local,
                remote=remote,
                now=now,
                rng=rng,
                max_skip=max_skip,
                max_skipped_keys=max_skipped_keys,
            )
            self.install(session)
            return DecryptResult(plaintext, new_session=True)
        return self._decrypt_with(self.sessions(), message, rng, max_skip, max_skipped_keys)

    def _decrypt_with(
        self,
        sessions: list[Session],
        message: RatchetMessage,
        rng: p.RandomSource,
        max_skip: int,
        max_skipped_keys: int,
    ) -> DecryptResult:
        if not sessions:
            raise NoSession("no session with this device")
        first_error: ProtocolError | None = None
        for session in sessions:
            try:
                plaintext = session.decrypt(
                    message, rng=rng, max_skip=max_skip, max_skipped_keys=max_skipped_keys
                )
            except DuplicateMessage:
                raise
            except ProtocolError as exc:
                first_error = first_error or exc
                continue
            self._promote(session)
            return DecryptResult(plaintext, new_session=False)
        assert first_error is not None
        raise first_error

    # ------------------------------------------------------------ serialization

    def to_bytes(self) -> bytes:
        return pack(
            [
                STATE_VERSION,
                None if self.current is None else self.current.to_wire(),
                [s.to_wire() for s in self.previous],
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_previous: int = MAX_PREVIOUS_SESSIONS) -> SessionRecord:
        def read(fields: Fields) -> SessionRecord:
            current_wire = fields.raw()
            current = None if current_wire is None else Session.from_wire(current_wire)
            previous = [Session.from_wire(v) for v in fields.array(max_len=max_previous)]
            return cls(current, previous, max_previous=max_previous)

        return load_pickle(data, "SessionRecord", read)

    def __repr__(self) -> str:
        return f"SessionRecord(current={self.current!r}, previous={len(self.previous)})"
