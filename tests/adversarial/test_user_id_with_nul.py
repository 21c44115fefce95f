"""A hostile peer names a user id containing U+0000.

A C program that reads strings up to their NUL shows and compares
"alice\\x00evil" as "alice" (as X.509 names "paypal.com\\x00.evil.com" once
fooled browsers), and PostgreSQL text cannot hold the character at all. So no
decoder accepts such a user id from a peer (MALFORMED) and no API takes one
from the app (INVALID_ARGUMENT); what this device stored before the rule
still loads (spec/11-devices.md section 11.1).
"""

from __future__ import annotations

from typing import Any

import pytest

from hushchat.protocol.account import Account
from hushchat.protocol.address import Address
from hushchat.protocol.client_core import ClientCore
from hushchat.protocol.client_core.records import RecordKey
from hushchat.protocol.consts import GROUP_ID_SIZE, GROUP_VERSION, PROTOCOL_VERSION, STATE_VERSION
from hushchat.protocol.content import CONTENT_SENT_COPY, SENT_TO_USER, decode_content
from hushchat.protocol.devices import SignedDeviceList
from hushchat.protocol.encoding import Fields, pack, unpack
from hushchat.protocol.errors import DecodeError
from hushchat.protocol.group import (
    GENESIS_PARENT_HASH,
    HASH_SIZE,
    ActionCode,
    ControlMessage,
    Group,
    GroupState,
)
from hushchat.protocol.group_cipher import OutboundSenderKey
from hushchat.protocol.pqxdh import Party
from hushchat.protocol.prekeys import PreKeyBundle
from hushchat.protocol.sender_keys import SenderKeyDistributionMessage
from tests.support.users import keypair, signed_list_naming

NUL_ID = "alice\x00evil"
BOB = keypair("user:bob").public.ed25519


def refused_as_malformed(decode: Any, data: bytes) -> None:
    with pytest.raises(DecodeError) as refused:
        decode(data)
    assert refused.value.code == "MALFORMED"


def test_a_bundle_naming_it_is_malformed() -> None:
    bundle = Account.create(now=0, one_time_prekeys=1).bundle("alice", 1)
    fields = unpack(bundle.encode(), what="test")
    fields[1] = NUL_ID
    refused_as_malformed(PreKeyBundle.decode, pack(fields))


def test_a_device_list_naming_it_is_malformed_but_a_stored_one_loads() -> None:
    refused_as_malformed(SignedDeviceList.decode, signed_list_naming(NUL_ID))
    stored = SignedDeviceList.decode(signed_list_naming(NUL_ID), stored=True)
    assert stored.device_list.user_id == NUL_ID


def test_a_sender_key_distribution_naming_it_is_malformed() -> None:
    outbound = OutboundSenderKey.create(bytes(GROUP_ID_SIZE), now=0)
    fields = unpack(outbound.distribution_message(sender=Address("alice", 1)), what="test")
    assert fields[2] == "alice"
    fields[2] = NUL_ID
    refused_as_malformed(SenderKeyDistributionMessage.decode, pack(fields))


def test_a_sent_copy_to_it_is_malformed() -> None:
    copy = pack([CONTENT_SENT_COPY, SENT_TO_USER, NUL_ID, bytes(16), 0, b"hi"])
    refused_as_malformed(decode_content, copy)


def control_message(author: str, code: int, args: list[Any]) -> bytes:
    body = pack(
        [GROUP_VERSION, bytes(GROUP_ID_SIZE), 0, GENESIS_PARENT_HASH, author, 1, code, args]
    )
    return pack([body, bytes(64)])


@pytest.mark.parametrize(
    ("author", "code", "args"),
    [
        (NUL_ID, ActionCode.SET_TITLE, ["t"]),
        ("bob", ActionCode.CREATE, ["t", [[NUL_ID, BOB]], None]),
        ("bob", ActionCode.ADD_MEMBER, [NUL_ID, BOB]),
        ("bob", ActionCode.REMOVE_MEMBER, [NUL_ID]),
        ("bob", ActionCode.SET_ADMIN, [NUL_ID, True]),
    ],
    ids=["author", "create", "add", "remove", "set_admin"],
)
def test_a_group_change_naming_it_is_malformed(author: str, code: int, args: list[Any]) -> None:
    refused_as_malformed(ControlMessage.decode, control_message(author, code, args))
    # A pending change this device stored before the rule still loads.
    stored = ControlMessage.decode(control_message(author, code, args), stored=True)
    assert stored.group_id == bytes(GROUP_ID_SIZE)


def group_state(*members: str) -> bytes:
    entries = [[user_id, BOB, True] for user_id in sorted(members)]
    return pack(
        [
            PROTOCOL_VERSION,
            bytes(GROUP_ID_SIZE),
            0,
            GENESIS_PARENT_HASH,
            bytes(HASH_SIZE),
            "t",
            entries,
        ]
    )


def test_a_group_state_naming_it_is_malformed_but_a_stored_group_loads() -> None:
    refused_as_malformed(GroupState.decode, group_state("bob", NUL_ID))
    group = Group.from_bytes(pack([STATE_VERSION, [group_state("bob", NUL_ID)]]))
    assert NUL_ID in group.current.user_ids


def test_a_stored_session_with_it_loads() -> None:
    party = Party.read(Fields([[NUL_ID, 1, BOB]], what="test"), "remote")
    assert party.user_id == NUL_ID


def test_a_device_that_stored_its_list_and_group_before_the_rule_still_loads() -> None:
    """Records written before U+0000 was refused: the device opens with them, not StateError."""
    alice = ClientCore.create_primary("alice", 1, now=0)
    records = {key: data for key, data in alice.take_changes().items() if data is not None}
    records[RecordKey.devices(NUL_ID)] = signed_list_naming(NUL_ID)
    records[RecordKey.group(bytes(GROUP_ID_SIZE))] = pack(
        [STATE_VERSION, [group_state("alice", NUL_ID)]]
    )
    loaded = ClientCore.load(records.items())
    assert loaded.user_id == "alice"
