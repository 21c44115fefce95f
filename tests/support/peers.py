"""One device of a one-to-one conversation, for the session tests: an account and its record."""

from __future__ import annotations

from typing import Any

import pytest

from hushchat.protocol.account import Account
from hushchat.protocol.primitives import SeededRandom
from hushchat.protocol.session import DecryptResult, SessionRecord
from tests.support.clock import NOW


class Peer:
    """One device in a one-to-one conversation: its account and its record of the other."""

    def __init__(self, account: Account, rng: SeededRandom) -> None:
        self.account = account
        self.record = SessionRecord()
        self.rng = rng

    def encrypt(self, plaintext: bytes, *, now: int = NOW) -> bytes:
        return self.record.encrypt(plaintext, now=now)

    def decrypt(self, data: bytes, *, now: int = NOW, **kwargs: Any) -> DecryptResult:
        return self.record.decrypt(data, self.account, now=now, rng=self.rng, **kwargs)

    def state(self) -> bytes:
        """Everything a decrypt may change, serialized (for before/after comparisons)."""
        return self.record.to_bytes() + self.account.to_bytes()

    def assert_refused(self, data: bytes, error: type[Exception], **kwargs: Any) -> None:
        """``data`` raises ``error`` and leaves the record and account byte-identical."""
        before = self.state()
        with pytest.raises(error):
            self.decrypt(data, **kwargs)
        assert self.state() == before
