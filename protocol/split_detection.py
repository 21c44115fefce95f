"""Split detection: noticing, from a group message, that its sender holds another group state.

Every group message carries its sender's group state, ``(epoch,
state_hash)``, inside the signed ciphertext (the ``GroupText``). As MLS's
epoch authenticator, it lets members notice that they hold different
states: a relay that split them into branches, or that withholds changes
from some of them. spec/04-sender-keys.md, section 4.9.

The group layer places a claim against the states a receiver holds
(:func:`hushchat.protocol.group.state_relation`, spec/12-groups.md section
12.9). What this module adds is what to report, and when:

* ``CURRENT``, ``ANCESTOR``: nothing (the sender is where we are, or behind).
* ``FORKED``, ``UNKNOWN``: a split, or a sender on a state we cannot know.
* ``AHEAD``: the relay orders a group's changes before any message that
  follows them, so a sender ahead of us means a change we lack. If we hold
  changes of the group we could not apply yet (they wait for the one before
  them), those explain it and the claim is kept, to judge again when our
  state moves; if not, the change was withheld from us, and we report it.

:class:`PeerClaims`, one per group, remembers per sender device the claim
that still matters: one kept to judge again, or the last one reported with
its relation, so that each sender's state is reported once per relation,
not at every message. It holds entries only for devices whose group
messages were accepted (current members' listed devices); its owner
forgets those of departed members and devices.

Pickle (canonical msgpack)::

    [STATE_VERSION, [[user_id str, device_id uint, epoch u64, state_hash bin32,
                      reported str | nil], ...]]      in address order

``reported`` is the relation reported for that claim (``"ahead"``,
``"forked"`` or ``"unknown"``), nil for a claim kept to judge again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .address import Address
from .consts import MAX_STATE_SIZE, STATE_VERSION
from .devices import read_user_id
from .encoding import UINT64_MAX, Fields, pack
from .errors import DecodeError
from .group import HASH_SIZE, StateRelation
from .pickles import load_pickle

# Relations that say nothing is wrong: the sender is where we are, or behind.
_HELD = frozenset({StateRelation.CURRENT, StateRelation.ANCESTOR})
_REPORTABLE = {
    r.value: r for r in (StateRelation.AHEAD, StateRelation.FORKED, StateRelation.UNKNOWN)
}


@dataclass(frozen=True, slots=True)
class StateClaim:
    """A group state as a message's sender says it holds it."""

    epoch: int
    state_hash: bytes


# Where a claim stands against the receiver's states (a Group's relation).
Relation = Callable[[StateClaim], StateRelation]


class PeerClaims:
    """One group's member devices' claims that still matter: to judge again, or reported."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        # sender -> (its claim, the relation it was reported as, or None: judge again)
        self._entries: dict[Address, tuple[StateClaim, StateRelation | None]] = {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    def observe(
        self, sender: Address, claim: StateClaim, relation: Relation, *, ahead_explained: bool
    ) -> StateRelation | None:
        """Take the claim of a message just accepted from ``sender``; the relation to report.

        ``ahead_explained``: the receiver holds changes of the group it could
        not apply yet. None when there is nothing (new) to report.
        """
        return self._judge(sender, claim, relation(claim), ahead_explained)

    def rejudge(
        self, relation: Relation, *, ahead_explained: bool
    ) -> list[tuple[Address, StateClaim, StateRelation]]:
        """Judge the kept claims again (the receiver's state or held changes moved).

        Returns the claims to report now: a kept one now ``FORKED`` or
        ``UNKNOWN``, or still ``AHEAD`` with nothing to explain it, or one
        reported before under another relation. Claims now ``CURRENT`` or
        ``ANCESTOR`` are forgotten.
        """
        report = []
        for sender, (claim, _) in list(self._entries.items()):
            reported = self._judge(sender, claim, relation(claim), ahead_explained)
            if reported is not None:
                report.append((sender, claim, reported))
        return report

    def _judge(
        self, sender: Address, claim: StateClaim, relation: StateRelation, ahead_explained: bool
    ) -> StateRelation | None:
        if relation in _HELD:
            self._entries.pop(sender, None)
            return None
        previous = self._entries.get(sender)
        if previous is not None and previous[0] == claim and previous[1] is relation:
            return None  # reported already
        if relation is StateRelation.AHEAD and ahead_explained:
            self._entries[sender] = (claim, None)
            return None  # a change we hold may bring us there: judge again then
        self._entries[sender] = (claim, relation)
        return relation

    def forget(self, which: Callable[[Address], bool]) -> bool:
        """Drop the claims of the senders ``which`` selects; whether any was dropped."""
        gone = [sender for sender in self._entries if which(sender)]
        for sender in gone:
            del self._entries[sender]
        return bool(gone)

    def to_bytes(self) -> bytes:
        entries = [
            [
                sender.user_id,
                sender.device_id,
                claim.epoch,
                claim.state_hash,
                None if reported is None else reported.value,
            ]
            for sender, (claim, reported) in sorted(self._entries.items())
        ]
        return pack([STATE_VERSION, entries])

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerClaims:
        def read(fields: Fields) -> PeerClaims:
            claims = cls()
            previous: Address | None = None
            for item in fields.array(max_len=MAX_STATE_SIZE):
                entry = Fields(item, what="claim", count=5)
                sender = Address(read_user_id(entry, stored=True), entry.uint())
                if previous is not None and not previous < sender:
                    raise DecodeError("peer claims: senders out of order")
                claim = StateClaim(entry.uint(UINT64_MAX), entry.bin(HASH_SIZE))
                reported = None
                if entry.peek() is not None:
                    name = entry.text(16)
                    if name not in _REPORTABLE:
                        raise DecodeError("peer claims: not a reported relation")
                    reported = _REPORTABLE[name]
                else:
                    entry.raw()
                claims._entries[sender] = (claim, reported)
                previous = sender
            return claims

        return load_pickle(data, "peer claims", read)

    def __repr__(self) -> str:
        return f"PeerClaims(senders={len(self._entries)})"
