"""One device of a one-to-one conversation, for the session tests: an account and its record."""

from __future__ import annotations

import hashlib
from typing import Any, TypedDict

import pytest

from hushchat.protocol.account import Account
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.pqxdh import Party
from hushchat.protocol.primitives import SeededRandom
from hushchat.protocol.session import DecryptResult, SessionRecord
from tests.support.clock import NOW


def party(user_id: str, device_id: int = 1) -> Party:
    """Device ``device_id`` of ``user_id``, whose user identity is fixed by the user id."""
    seed = hashlib.sha256(b"user identity of " + user_id.encode()).digest()
    return Party(user_id, device_id, IdentityKeyPair(seed).public.ed25519)


class Parties(TypedDict):
    """Whose each device of a session is: the keyword arguments ``local`` and ``remote``."""

    local: Party
    remote: Party


class Peer:
    """One device in a one-to-one conversation: its account and its record of the other.

    ``me`` and ``peer`` name the users of the two devices (device 1 each):
    what every session between them binds.
    """

    def __init__(self, account: Account, rng: SeededRandom, *, me: str, peer: str) -> None:
        self.account = account
        self.record = SessionRecord()
        self.rng = rng
        self.local, self.remote = party(me), party(peer)

    @property
    def parties(self) -> Parties:
        """``local`` and ``remote`` for SessionRecord.decrypt with another record of ours."""
        return Parties(local=self.local, remote=self.remote)

    def start(self, bundle: Any, **kwargs: Any) -> None:
        """Install a new session from the peer's bundle (an Account.bundle or its bytes)."""
        kwargs.setdefault("now", NOW)
        kwargs.setdefault("rng", self.rng)
        session = self.account.create_outbound_session(
            bundle, local=self.local, remote=self.remote, **kwargs
        )
        self.record.install(session)

    def encrypt(self, plaintext: bytes, *, now: int = NOW) -> bytes:
        return self.record.encrypt(plaintext, now=now)

    def decrypt(self, data: bytes, *, now: int = NOW, **kwargs: Any) -> DecryptResult:
        return self.record.decrypt(
            data,
            self.account,
            local=self.local,
            remote=self.remote,
            now=now,
            rng=self.rng,
            **kwargs,
        )

    def state(self) -> bytes:
        """Everything a decrypt may change, serialized (for before/after comparisons)."""
        return self.record.to_bytes() + self.account.to_bytes()

    def assert_refused(self, data: bytes, error: type[Exception], **kwargs: Any) -> None:
        """``data`` raises ``error`` and leaves the record and account byte-identical."""
        before = self.state()
        with pytest.raises(error):
            self.decrypt(data, **kwargs)
        assert self.state() == before
