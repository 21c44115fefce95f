"""Group encryption with Sender Keys: our outbound chain and a peer's inbound record.

As libsignal's ``group_cipher.rs``, as objects in the vodozemac style (the
caller persists them with ``to_bytes`` after each call; nothing here does
I/O). The chain and wire formats are in :mod:`hushchat.protocol.sender_keys`.

* :class:`OutboundSenderKey`, one per group on our device: one AES
  encryption and one Ed25519 signature per message, whatever the group's
  size. Its :meth:`~OutboundSenderKey.distribution_message` gives the chain
  at its *current* iteration, so a member who joins later cannot read
  earlier messages.
* :class:`SenderKeyRecord`, one per (group, sender device): the sender's
  chains we know, newest first, at most ``max_states`` of them, so messages
  sent just before a rotation still decrypt.
* :class:`SenderKeyStore`, one per device: its records, taken only for
  groups it holds from current members' devices, at most ``max_records``.

Every call that signs, verifies or learns a chain names the sender device
(``sender``), as libsignal's ``group_encrypt``, ``group_decrypt`` and
``process_sender_key_distribution_message`` take the sender's address: a
distribution must name that device (SenderMismatch otherwise), and each
message is signed over it (:func:`~hushchat.protocol.sender_keys.signed_bytes`),
so a chain cannot be used under another sender's name.

:meth:`SenderKeyRecord.decrypt` runs in libsignal's order: decode, find the
chain by ``chain_id`` (NoSenderKey), verify the signature (BadSignature)
before the chain is touched, find the message key (a past iteration uses a
stored skipped key or fails DuplicateMessage; a jump beyond
``max_forward_jump`` fails TooFarInFuture; otherwise up to
``max_message_keys`` skipped keys are kept, oldest evicted first), decrypt
(DecryptionFailed on bad padding), and only then change the record. Every
failure leaves the record byte-for-byte as it was.

Pickles
=======

Canonical msgpack arrays, ``STATE_VERSION`` first; loading refuses another
version (UnknownStateVersion) and anything malformed (StateError).

OutboundSenderKey::

    [STATE_VERSION, group_id bin16, chain_id uint, iteration uint,
     chain_key bin32, signing_seed bin32, created_at uint64]

SenderKeyRecord::

    [STATE_VERSION, group_id bin16, [chain, ...]]     chains newest first
    chain = [chain_id uint, signing_key bin32, iteration uint, chain_key bin32,
             [[iteration uint, seed bin32], ...]]       skipped keys, oldest first

A chain's ``iteration`` is the next one its chain key derives; skipped keys
hold ``seed_i`` (the message key is derived from it when used), with
strictly increasing iterations below the chain's.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import primitives as p
from .address import Address
from .consts import (
    ED25519_KEY_SIZE,
    GROUP_ID_SIZE,
    MAX_PLAINTEXT_SIZE,
    MAX_SENDER_KEY_FORWARD_JUMP,
    MAX_SENDER_KEY_ITERATION,
    MAX_SENDER_KEY_RECORDS,
    MAX_SENDER_KEY_STATES,
    MAX_SENDER_MESSAGE_KEYS,
    MAX_STATE_SIZE,
    SENDER_KEY_MAX_AGE,
    SENDER_KEY_MAX_MESSAGES,
    STATE_VERSION,
)
from .devices import check_user_id
from .encoding import UINT32_MAX, UINT64_MAX, Fields, pack
from .errors import (
    DecodeError,
    DuplicateMessage,
    InvalidArgument,
    InvalidState,
    NoSenderKey,
    NotAMember,
    SenderMismatch,
    StateError,
    TooFarInFuture,
    TooManySenderKeys,
    UnknownGroup,
)
from .pickles import load_pickle
from .sender_keys import (
    CHAIN_KEY_SIZE,
    SenderKeyDistributionMessage,
    SenderKeyMessage,
    decrypt_with_seed,
    encrypt_with_seed,
    message_seed,
    next_chain_key,
    signed_bytes,
)

# ------------------------------------------------------------------ sender


class OutboundSenderKey:
    """Our sending chain in one group.

    Make one with :meth:`create`; :meth:`encrypt` advances it, so persist it
    (:meth:`to_bytes`) after every message. Replace it with a new one when
    :meth:`needs_rotation` says so or the group's membership shrinks, and
    send the new :meth:`distribution_message` to every member device.
    """

    __slots__ = ("_chain_id", "_chain_key", "_created_at", "_group_id", "_iteration", "_signing")

    def __init__(
        self,
        *,
        group_id: bytes,
        chain_id: int,
        iteration: int,
        chain_key: bytes,
        signing_key: Ed25519PrivateKey,
        created_at: int,
    ) -> None:
        """Use :meth:`create` or :meth:`from_bytes`; this trusts its arguments."""
        self._group_id = group_id
        self._chain_id = chain_id
        self._iteration = iteration
        self._chain_key = chain_key
        self._signing = signing_key
        self._created_at = created_at

    @classmethod
    def create(
        cls, group_id: bytes, now: int, rng: p.RandomSource = p.SYSTEM_RANDOM
    ) -> OutboundSenderKey:
        """A fresh chain at iteration 0, created at time ``now`` (seconds).

        Draws from ``rng``, in this order: 4 bytes for the chain id (big-endian,
        shifted right by one bit as libsignal's 31-bit ids), 32 bytes of chain
        key, 32 bytes of Ed25519 signing-key seed.
        """
        _check_group_id(group_id)
        _check_time(now)
        chain_id = int.from_bytes(rng.random_bytes(4), "big") >> 1
        chain_key = rng.random_bytes(CHAIN_KEY_SIZE)
        signing_key = p.ed25519_generate(rng)
        return cls(
            group_id=group_id,
            chain_id=chain_id,
            iteration=0,
            chain_key=chain_key,
            signing_key=signing_key,
            created_at=now,
        )

    @property
    def group_id(self) -> bytes:
        return self._group_id

    @property
    def chain_id(self) -> int:
        return self._chain_id

    @property
    def iteration(self) -> int:
        """The iteration the next message will carry."""
        return self._iteration

    @property
    def messages_sent(self) -> int:
        """Messages encrypted with this key (a chain always starts at iteration 0)."""
        return self._iteration

    @property
    def created_at(self) -> int:
        return self._created_at

    @property
    def signing_key(self) -> bytes:
        """The chain's Ed25519 public key."""
        return p.ed25519_public_bytes(self._signing)

    def encrypt(self, plaintext: bytes, *, sender: Address) -> bytes:
        """Encrypt and sign one group message as ``sender`` (our device); the message bytes."""
        _check_sender(sender)
        if not isinstance(plaintext, bytes | bytearray | memoryview):
            raise InvalidArgument("plaintext must be bytes")
        plaintext = bytes(plaintext)
        if len(plaintext) > MAX_PLAINTEXT_SIZE:
            raise InvalidArgument(f"plaintext exceeds {MAX_PLAINTEXT_SIZE} bytes")
        if self._iteration > MAX_SENDER_KEY_ITERATION:
            raise InvalidState("sender chain is exhausted; create a new sender key")
        ciphertext = encrypt_with_seed(message_seed(self._chain_key), plaintext)
        body = SenderKeyMessage.encode_body(
            self._group_id, self._chain_id, self._iteration, ciphertext
        )
        signature = p.ed25519_sign(self._signing, signed_bytes(sender, body))
        self._chain_key = next_chain_key(self._chain_key)
        self._iteration += 1
        return body + signature

    def distribution(self, *, sender: Address) -> SenderKeyDistributionMessage:
        """The chain at its current iteration, naming ``sender`` (our device), as a value."""
        _check_sender(sender)
        return SenderKeyDistributionMessage(
            self._group_id,
            sender,
            self._chain_id,
            self._iteration,
            self._chain_key,
            self.signing_key,
        )

    def distribution_message(self, *, sender: Address) -> bytes:
        """The encoded SKDM for the current iteration (send it inside 1:1 sessions only)."""
        return self.distribution(sender=sender).encode()

    def needs_rotation(
        self,
        now: int,
        *,
        max_age: int = SENDER_KEY_MAX_AGE,
        max_messages: int = SENDER_KEY_MAX_MESSAGES,
    ) -> bool:
        """Whether this key is ``max_age`` seconds old or has sent ``max_messages``.

        ``max_messages`` is at most 2^32 - 1, so a spent chain (one that can
        no longer encrypt) always needs rotation.
        """
        _check_time(now)
        _check_limit("max_age", max_age)
        _check_limit("max_messages", max_messages)
        return now - self._created_at >= max_age or self._iteration >= max_messages

    def to_bytes(self) -> bytes:
        return pack(
            [
                STATE_VERSION,
                self._group_id,
                self._chain_id,
                self._iteration,
                self._chain_key,
                p.ed25519_private_bytes(self._signing),
                self._created_at,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> OutboundSenderKey:
        def read(fields: Fields) -> OutboundSenderKey:
            return cls(
                group_id=fields.bin(GROUP_ID_SIZE),
                chain_id=fields.uint(),
                iteration=fields.uint(),
                chain_key=fields.bin(CHAIN_KEY_SIZE),
                signing_key=p.ed25519_private_from_bytes(fields.bin(ED25519_KEY_SIZE)),
                created_at=fields.uint(UINT64_MAX),
            )

        return load_pickle(data, "outbound sender key", read)

    def __repr__(self) -> str:
        return (
            f"OutboundSenderKey(group_id={self._group_id.hex()}, chain_id={self._chain_id}, "
            f"iteration={self._iteration}, created_at={self._created_at})"
        )


# ------------------------------------------------------------------ receiver


@dataclass(frozen=True, slots=True)
class InboundChainInfo:
    """What a record holds for one sender chain, without its keys."""

    chain_id: int
    signing_key: bytes
    iteration: int
    skipped_keys: int


class _InboundChain:
    """One sender chain as a receiver holds it. Mutated only on commit."""

    __slots__ = ("chain_id", "chain_key", "iteration", "signing_key", "skipped")

    def __init__(
        self,
        chain_id: int,
        signing_key: bytes,
        iteration: int,
        chain_key: bytes,
        skipped: OrderedDict[int, bytes],
    ) -> None:
        self.chain_id = chain_id
        self.signing_key = signing_key
        self.iteration = iteration
        self.chain_key = chain_key
        # iteration -> seed, in insertion order, which is increasing iteration:
        # popitem(last=False) evicts the oldest in O(1).
        self.skipped = skipped

    def to_wire(self) -> list[object]:
        return [
            self.chain_id,
            self.signing_key,
            self.iteration,
            self.chain_key,
            [[iteration, seed] for iteration, seed in self.skipped.items()],
        ]

    @classmethod
    def read(cls, fields: Fields) -> _InboundChain:
        chain_id = fields.uint()
        signing_key = fields.bin(ED25519_KEY_SIZE)
        iteration = fields.uint()
        chain_key = fields.bin(CHAIN_KEY_SIZE)
        skipped: OrderedDict[int, bytes] = OrderedDict()
        previous = -1
        for item in fields.array(max_len=MAX_STATE_SIZE):
            pair = Fields(item, what="skipped key", count=2)
            skipped_iteration = pair.uint()
            if not previous < skipped_iteration < iteration:
                raise DecodeError("skipped keys must be increasing and below the chain")
            skipped[skipped_iteration] = pair.bin(CHAIN_KEY_SIZE)
            previous = skipped_iteration
        fields.end()
        return cls(chain_id, signing_key, iteration, chain_key, skipped)

    def info(self) -> InboundChainInfo:
        return InboundChainInfo(self.chain_id, self.signing_key, self.iteration, len(self.skipped))

    def already_has(self, skdm: SenderKeyDistributionMessage, max_forward_jump: int) -> bool:
        """Whether ``skdm`` describes this very chain, so the record need not change.

        An SKDM at an older iteration (same signing key) never rolls the chain
        back. One at a newer iteration must derive from our chain key within
        ``max_forward_jump`` steps; otherwise it is a different chain.
        """
        if skdm.signing_key != self.signing_key:
            return False
        if skdm.iteration < self.iteration:
            return True
        gap = skdm.iteration - self.iteration
        if gap > max_forward_jump:
            return False
        chain_key = self.chain_key
        for _ in range(gap):
            chain_key = next_chain_key(chain_key)
        return hmac.compare_digest(chain_key, skdm.chain_key)


class SenderKeyRecord:
    """A sender device's chains in one group, as a receiver holds them.

    Keep one per (group, sender device), pass that device as ``sender`` to
    every call, and persist the record (:meth:`to_bytes`) after every
    successful call. A failed call leaves it unchanged.
    """

    __slots__ = ("_chains", "_group_id")

    def __init__(self, group_id: bytes) -> None:
        """An empty record for ``group_id`` (16 bytes)."""
        _check_group_id(group_id)
        self._group_id = group_id
        self._chains: list[_InboundChain] = []

    @property
    def group_id(self) -> bytes:
        return self._group_id

    @property
    def chains(self) -> tuple[InboundChainInfo, ...]:
        """The chains held, newest first."""
        return tuple(chain.info() for chain in self._chains)

    def process_distribution(
        self,
        skdm: SenderKeyDistributionMessage | bytes,
        *,
        sender: Address,
        max_states: int = MAX_SENDER_KEY_STATES,
        max_forward_jump: int = MAX_SENDER_KEY_FORWARD_JUMP,
    ) -> None:
        """Learn a sender chain from an SKDM (bytes, or as decoded by the caller).

        ``sender`` is the device whose session delivered it. A new chain goes
        first; beyond ``max_states`` the oldest is dropped. An SKDM for a chain
        we hold changes nothing when it describes that chain (re-delivery, or
        an older or derivable newer iteration, same signing key); one with the
        same ``chain_id`` but another signing key or an inconsistent chain key
        replaces it. InvalidArgument if the SKDM is for another group (route
        by its ``group_id``); SenderMismatch if it names another sender than
        ``sender`` (a chain forwarded by a device that did not create it).
        """
        if isinstance(skdm, bytes | bytearray | memoryview):
            skdm = SenderKeyDistributionMessage.decode(bytes(skdm))
        elif not isinstance(skdm, SenderKeyDistributionMessage):
            raise InvalidArgument("expected a sender key distribution message")
        _check_sender(sender)
        _check_limit("max_states", max_states, minimum=1)
        _check_limit("max_forward_jump", max_forward_jump)
        if skdm.group_id != self._group_id:
            raise InvalidArgument("the distribution message is for another group")
        if skdm.sender != sender:
            raise SenderMismatch(f"a sender key of {skdm.sender} delivered by {sender}")
        for chain in self._chains:
            if chain.chain_id == skdm.chain_id and chain.already_has(skdm, max_forward_jump):
                return
        fresh = _InboundChain(
            skdm.chain_id, skdm.signing_key, skdm.iteration, skdm.chain_key, OrderedDict()
        )
        others = [chain for chain in self._chains if chain.chain_id != skdm.chain_id]
        self._chains = [fresh, *others][:max_states]

    def decrypt(
        self,
        message: bytes,
        *,
        sender: Address,
        max_forward_jump: int = MAX_SENDER_KEY_FORWARD_JUMP,
        max_message_keys: int = MAX_SENDER_MESSAGE_KEYS,
    ) -> bytes:
        """Verify and decrypt a SenderKeyMessage from ``sender``, this record's device.

        ``sender`` is the address the envelope was stamped with: the signature
        covers it, so a message restamped with another sender is BadSignature.
        """
        _check_sender(sender)
        _check_limit("max_forward_jump", max_forward_jump)
        _check_limit("max_message_keys", max_message_keys)
        parsed = SenderKeyMessage.decode(message)
        chain = self._chain_for(parsed)
        # Before anything depends on the claimed iteration (libsignal's order):
        # a forged message costs one verification and never advances a chain.
        p.ed25519_verify(chain.signing_key, parsed.signature, signed_bytes(sender, parsed.body))
        iteration = parsed.iteration
        if iteration < chain.iteration:
            seed = chain.skipped.get(iteration)
            if seed is None:
                raise DuplicateMessage(
                    f"chain {chain.chain_id}: no key for iteration {iteration} "
                    f"(already used or evicted; chain is at {chain.iteration})"
                )
            plaintext = decrypt_with_seed(seed, parsed.ciphertext)
            del chain.skipped[iteration]
            return plaintext
        if iteration - chain.iteration > max_forward_jump:
            raise TooFarInFuture(
                f"chain {chain.chain_id}: iteration {iteration} is more than "
                f"{max_forward_jump} past {chain.iteration}"
            )
        # Candidate: walk a local copy of the chain key; keep only the seeds
        # that would survive eviction anyway.
        chain_key = chain.chain_key
        keep_from = iteration - max_message_keys
        candidates: list[tuple[int, bytes]] = []
        for skipped_iteration in range(chain.iteration, iteration):
            if skipped_iteration >= keep_from:
                candidates.append((skipped_iteration, message_seed(chain_key)))
            chain_key = next_chain_key(chain_key)
        plaintext = decrypt_with_seed(message_seed(chain_key), parsed.ciphertext)
        # Commit.
        stored = chain.skipped
        stored.update(candidates)
        while len(stored) > max_message_keys:
            stored.popitem(last=False)
        chain.chain_key = next_chain_key(chain_key)
        chain.iteration = iteration + 1
        return plaintext

    def _chain_for(self, message: SenderKeyMessage) -> _InboundChain:
        if message.group_id != self._group_id:
            raise NoSenderKey("the message is for another group")
        for chain in self._chains:
            if chain.chain_id == message.chain_id:
                return chain
        raise NoSenderKey(f"no sender key for chain {message.chain_id}")

    def to_bytes(self) -> bytes:
        return pack([STATE_VERSION, self._group_id, [chain.to_wire() for chain in self._chains]])

    @classmethod
    def from_bytes(cls, data: bytes) -> SenderKeyRecord:
        def read(fields: Fields) -> SenderKeyRecord:
            record = cls(fields.bin(GROUP_ID_SIZE))
            record._chains = [
                _InboundChain.read(Fields(item, what="sender key record.chain", count=5))
                for item in fields.array(max_len=MAX_STATE_SIZE)
            ]
            if len({chain.chain_id for chain in record._chains}) != len(record._chains):
                raise StateError("sender key record: a chain id appears twice")
            return record

        return load_pickle(data, "sender key record", read)

    def __repr__(self) -> str:
        chains = ", ".join(f"{c.chain_id}@{c.iteration}" for c in self._chains)
        return f"SenderKeyRecord(group_id={self._group_id.hex()}, chains=[{chains}])"


# ------------------------------------------------------------------ a device's records


class SenderKeyStore(Mapping[tuple[bytes, Address], SenderKeyRecord]):
    """Every sender-key record one device keeps: one per (group, sender device), bounded.

    A read-only mapping from ``(group_id, sender)`` to the record. Records
    come only from :meth:`process_distribution`, which takes a distribution
    (spec/04-sender-keys.md, section 4.8) only for a group the device holds,
    from a listed device of a current member (the caller says which devices
    those are), naming that device as its sender, and only while the records
    stay within ``max_records``; nothing is evicted to make room. A refused
    distribution changes nothing. The caller drops records with
    :meth:`discard` when a member or device leaves, and persists each record
    it touched.
    """

    __slots__ = ("_records", "max_records")

    def __init__(self, *, max_records: int = MAX_SENDER_KEY_RECORDS) -> None:
        _check_limit("max_records", max_records)
        self.max_records = max_records
        self._records: dict[tuple[bytes, Address], SenderKeyRecord] = {}

    def __getitem__(self, key: tuple[bytes, Address]) -> SenderKeyRecord:
        return self._records[key]

    def __iter__(self) -> Iterator[tuple[bytes, Address]]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def process_distribution(
        self,
        skdm: SenderKeyDistributionMessage | bytes,
        *,
        sender: Address,
        group_devices: Container[Address] | None,
        max_states: int = MAX_SENDER_KEY_STATES,
        max_forward_jump: int = MAX_SENDER_KEY_FORWARD_JUMP,
    ) -> SenderKeyDistributionMessage:
        """Take an SKDM that ``sender``'s session delivered; the SKDM, decoded.

        ``group_devices`` are the listed devices of the current members of the
        SKDM's group (None: the group is not held). In this order, each
        refusal changing nothing: UnknownGroup, NotAMember (``sender`` is not
        one of them), SenderMismatch (the SKDM names another sender),
        TooManySenderKeys (a new record would exceed ``max_records``); then
        the record processes it (:meth:`SenderKeyRecord.process_distribution`).
        """
        if isinstance(skdm, bytes | bytearray | memoryview):
            skdm = SenderKeyDistributionMessage.decode(bytes(skdm))
        elif not isinstance(skdm, SenderKeyDistributionMessage):
            raise InvalidArgument("expected a sender key distribution message")
        _check_sender(sender)
        if group_devices is None:
            raise UnknownGroup("a sender key for a group this device does not hold")
        if sender not in group_devices:
            raise NotAMember(f"a sender key from {sender}, not a current member's device")
        if skdm.sender != sender:
            raise SenderMismatch(f"a sender key of {skdm.sender} delivered by {sender}")
        key = (skdm.group_id, sender)
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= self.max_records:
                raise TooManySenderKeys(f"already {len(self._records)} sender-key records")
            record = SenderKeyRecord(skdm.group_id)
            record.process_distribution(
                skdm, sender=sender, max_states=max_states, max_forward_jump=max_forward_jump
            )
            self._records[key] = record
        else:
            record.process_distribution(
                skdm, sender=sender, max_states=max_states, max_forward_jump=max_forward_jump
            )
        return skdm

    def restore(self, group_id: bytes, sender: Address, record: SenderKeyRecord) -> None:
        """Put back a stored record (loading); not counted against ``max_records``."""
        if record.group_id != group_id:
            raise InvalidArgument("the record is for another group")
        self._records[(group_id, sender)] = record

    def discard(self, which: Callable[[bytes, Address], bool]) -> list[tuple[bytes, Address]]:
        """Drop the records ``which(group_id, sender)`` selects; their keys."""
        dropped = [key for key in self._records if which(*key)]
        for key in dropped:
            del self._records[key]
        return dropped

    def __repr__(self) -> str:
        return f"SenderKeyStore(records={len(self._records)}, max_records={self.max_records})"


# ------------------------------------------------------------------ helpers


def _check_sender(sender: object) -> None:
    if isinstance(sender, Address):
        check_user_id(sender.user_id)
        device_id = sender.device_id
        if type(device_id) is int and 0 <= device_id <= UINT32_MAX:
            return
    raise InvalidArgument(
        f"a sender is an Address: a user id (check_user_id), a device id from 0 to {UINT32_MAX}"
    )


def _check_group_id(group_id: object) -> None:
    if not isinstance(group_id, bytes) or len(group_id) != GROUP_ID_SIZE:
        raise InvalidArgument(f"a group id is {GROUP_ID_SIZE} bytes")


def _check_time(now: object) -> None:
    if isinstance(now, bool) or not isinstance(now, int) or not 0 <= now <= UINT64_MAX:
        raise InvalidArgument("now must be a non-negative integer number of seconds")


def _check_limit(name: str, value: object, *, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= UINT32_MAX:
        raise InvalidArgument(f"{name} must be an integer from {minimum} to {UINT32_MAX}")
