"""One-to-one sessions with every device, and the messages sent through them.

Everything else a device sends one-to-one (sender keys, group changes,
retry and sync requests) goes through :meth:`Sessions.encrypt_for` too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from ..content import SentCopy, Text
from ..errors import InvalidArgument, InvalidState, UnauthorizedChange, UntrustedIdentity
from ..messages import PreKeyMessage, decode_message
from ..pqxdh import Party
from ..prekeys import PreKeyBundle
from ..session import SessionRecord
from .directory import DeviceListNeeded, Directory
from .events import Address, MessageReceived, MessageSentByOtherDevice, Undecryptable
from .records import RecordKey
from .sends import DirectSend, Outcome
from .state import CoreState


class MissingSessions(InvalidState):
    """Sending needs sessions with these devices first: fetch their bundles."""

    code = "MISSING_SESSIONS"

    def __init__(self, addresses: Iterable[Address]) -> None:
        self.addresses = tuple(sorted(addresses))
        super().__init__("no session with " + ", ".join(map(str, self.addresses)))


class Sessions:
    """Our session records, one per peer device (own other devices included)."""

    def __init__(self, state: CoreState, directory: Directory) -> None:
        self._state = state
        self._directory = directory

    def usable(self, address: Address, now: int) -> bool:
        record = self._state.sessions.get(address)
        return record is not None and record.has_usable_session(now)

    def devices_without_session(self, user_ids: Iterable[str], *, now: int) -> list[Address]:
        """Devices of these users (and our own other devices) we cannot encrypt to yet."""
        own = self._state.address
        missing = []
        for user_id in {*user_ids, own.user_id}:
            for address in self._directory.devices_of(user_id):
                if address != own and not self.usable(address, now):
                    missing.append(address)
        return sorted(missing)

    def process_bundle(self, data: bytes, *, now: int, post_quantum: bool = True) -> Address:
        """Start a session from a prekey bundle the relay handed out."""
        state = self._state
        bundle = PreKeyBundle.decode(data)
        address = Address(bundle.user_id, bundle.device_id)
        held = self._directory.device_list(bundle.user_id)
        entry = None if held is None else held.device(bundle.device_id)
        if entry is None:
            raise DeviceListNeeded(bundle.user_id)
        if entry.identity != bundle.identity.ed25519:
            raise UntrustedIdentity("the bundle's identity is not the one the device list names")
        assert held is not None
        session = state.account.create_outbound_session(
            bundle,
            local=state.party,
            remote=Party(address.user_id, address.device_id, held.user_identity),
            now=now,
            post_quantum=post_quantum,
            rng=state.rng,
        )
        state.sessions.setdefault(address, SessionRecord()).install(session)
        state.mark(RecordKey.session(address))
        return address

    def drop_session(self, address: Address) -> None:
        if self._state.sessions.pop(address, None) is not None:
            self._state.mark(RecordKey.session(address))
        # A device we re-establish a session with must be sent our sender keys again.
        self.unshare(address)

    def drop_sessions_of(self, user_id: str) -> None:
        for address in [a for a in self._state.sessions if a.user_id == user_id]:
            self.drop_session(address)

    def unshare(self, address: Address) -> None:
        """Forget that ``address`` holds our sender keys (it gets them again before our next)."""
        for group_id, outbound in self._state.outbound.items():
            if outbound.unshare(address):
                self._state.mark(RecordKey.outbound(group_id))

    def check_sessions(self, addresses: Iterable[Address], now: int) -> list[SessionRecord]:
        """Each address's record, or MissingSessions naming those without a usable session."""
        targets = list(addresses)
        records = [self._state.sessions.get(a) for a in targets]
        usable = [r for r in records if r is not None and r.has_usable_session(now)]
        if len(usable) != len(records):
            missing = [
                a
                for a, r in zip(targets, records, strict=True)
                if r is None or not r.has_usable_session(now)
            ]
            raise MissingSessions(missing)
        return usable

    def encrypt_for(
        self, addresses: Iterable[Address], plaintext: bytes, now: int
    ) -> list[DirectSend]:
        """Encrypt one plaintext for each address, grouped by user."""
        targets = list(addresses)
        return self.encrypt_with(targets, self.check_sessions(targets, now), plaintext, now)

    def encrypt_with(
        self, targets: list[Address], records: list[SessionRecord], plaintext: bytes, now: int
    ) -> list[DirectSend]:
        """:meth:`encrypt_for` given what :meth:`check_sessions` returned for ``targets``."""
        by_user: dict[str, list[tuple[int, bytes]]] = {}
        for address, record in zip(targets, records, strict=True):
            payload = record.encrypt(plaintext, now=now)
            self._state.mark(RecordKey.session(address))
            by_user.setdefault(address.user_id, []).append((address.device_id, payload))
        return [DirectSend(user, tuple(payloads), plaintext) for user, payloads in by_user.items()]

    def send_direct(
        self,
        to_user: str,
        body: bytes,
        *,
        now: int,
        message_id: bytes | None = None,
        sent_at: int | None = None,
    ) -> tuple[bytes, list[DirectSend]]:
        """Encrypt a one-to-one message for every device of ``to_user``, a copy for ours."""
        if to_user == self._state.user_id:
            raise InvalidArgument("send to yourself through your other devices' copies")
        recipients = self._directory.devices_of(to_user)
        own_others = self._directory.own_other_devices()
        self.check_sessions([*recipients, *own_others], now)
        message_id = message_id or self._state.new_message_id()
        sent_at = now if sent_at is None else sent_at
        sends = self.encrypt_for(recipients, Text(message_id, sent_at, body).encode(), now)
        copy = SentCopy(to_user, None, message_id, sent_at, body).encode()
        sends += self.encrypt_for(own_others, copy, now)
        return message_id, [replace(send, message_id=message_id) for send in sends]

    def resend_direct(self, send: DirectSend, *, now: int) -> DirectSend:
        """Encrypt a refused send's content again for the recipient's current devices."""
        own = self._state.address
        targets = [a for a in self._directory.devices_of(send.recipient_user) if a != own]
        (resent,) = self.encrypt_for(targets, send.content, now)
        return replace(resent, message_id=send.message_id)

    def decrypt(self, sender: Address, payload: bytes, now: int) -> bytes:
        """The plaintext of a one-to-one message from a listed device; its session moves on."""
        state = self._state
        message = decode_message(payload)
        entry = self._directory.device_list(sender.user_id)
        assert entry is not None
        listed = entry.device(sender.device_id)
        assert listed is not None
        if (
            isinstance(message, PreKeyMessage)
            and message.handshake.identity.ed25519 != listed.identity
        ):
            raise UntrustedIdentity("handshake identity is not the one the device list names")
        record = state.sessions.get(sender)
        candidate = SessionRecord() if record is None else record
        result = candidate.decrypt(
            payload,
            state.account,
            local=state.party,
            remote=Party(sender.user_id, sender.device_id, entry.user_identity),
            now=now,
            rng=state.rng,
        )
        state.sessions[sender] = candidate
        state.mark(RecordKey.session(sender))
        if result.new_session:
            state.mark(RecordKey.ACCOUNT)
            # The peer started over: whatever we shared before is gone on its side.
            self.unshare(sender)
        return result.plaintext

    def receive_text(self, sender: Address, content: Text) -> Outcome:
        return Outcome(
            events=(MessageReceived(sender, content.message_id, content.sent_at, content.body),)
        )

    def receive_copy(self, sender: Address, content: SentCopy) -> Outcome:
        """A message one of our other devices sent: only our own devices send these."""
        if sender.user_id != self._state.user_id or content.to_user is None:
            return Outcome(events=(Undecryptable(sender, UnauthorizedChange.code),))
        copy = MessageSentByOtherDevice(
            sender, content.to_user, content.message_id, content.sent_at, content.body
        )
        return Outcome(events=(copy,))
