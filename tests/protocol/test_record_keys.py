"""Record keys: one typed key per record, stored exactly as the tuple keys were before."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hushchat.protocol.client_core import Address, RecordKey, RecordKind
from hushchat.protocol.encoding import pack
from hushchat.protocol.errors import InvalidArgument, StateError

GROUP = b"\x0f" * 16
BOB = Address("bob", 2)

# Written by the tuple keys of the previous version (pack(list(key))), so that
# stores made before typed keys load unchanged; claims came later, in the same form.
STORED_BEFORE = [
    (RecordKey.META, "91a46d657461"),
    (RecordKey.ACCOUNT, "91a76163636f756e74"),
    (RecordKey.devices("bob"), "92a764657669636573a3626f62"),
    (RecordKey.pending_identity("bob"), "92b070656e64696e675f6964656e74697479a3626f62"),
    (RecordKey.session(BOB), "93a773657373696f6ea3626f6202"),
    (RecordKey.outbound(GROUP), "92a86f7574626f756e64c410" + "0f" * 16),
    (RecordKey.inbound(GROUP, BOB), "94a7696e626f756e64c410" + "0f" * 16 + "a3626f6202"),
    (RecordKey.group(GROUP), "92a567726f7570c410" + "0f" * 16),
    (RecordKey.claims(GROUP), "92a6636c61696d73c410" + "0f" * 16),
    (RecordKey.LEFT_GROUPS, "91ab6c6566745f67726f757073"),
    (RecordKey.HELD_CONTROLS, "91ad68656c645f636f6e74726f6c73"),
    # New with the candidate changes of group version 2: no older store holds one.
    (RecordKey.pending_change(GROUP), "92ae70656e64696e675f6368616e6765c410" + "0f" * 16),
    (RecordKey.PUBLISHED_PREKEYS, "91b17075626c69736865645f7072656b657973"),
    (RecordKey.REGISTERED_DEVICE_LIST, "91b6726567697374657265645f6465766963655f6c697374"),
    (RecordKey.SYNCED, "91a673796e636564"),
]


def test_every_kind_is_pinned() -> None:
    assert {key.kind for key, _ in STORED_BEFORE} == set(RecordKind)


@pytest.mark.parametrize(("key", "stored"), STORED_BEFORE, ids=lambda v: str(v)[:40])
def test_keys_encode_as_the_tuple_keys_did_and_decode_back(key: RecordKey, stored: str) -> None:
    assert key.encode().hex() == stored
    assert RecordKey.decode(bytes.fromhex(stored)) == key


@pytest.mark.parametrize(
    "fields",
    [
        ["sessions", "bob", 2],  # unknown kind
        ["session", "bob"],  # a part missing
        ["session", "bob", 2, 3],  # a part too many
        ["session", 2, "bob"],  # parts swapped
        ["group", b"\x0f" * 15],  # not a group id
        ["meta", "extra"],
        [1],
        [],
    ],
)
def test_malformed_stored_keys_are_state_errors(fields: list[object]) -> None:
    with pytest.raises(StateError):
        RecordKey.decode(pack(fields))


@given(st.binary(max_size=64))
def test_any_bytes_decode_to_a_key_or_a_state_error(data: bytes) -> None:
    try:
        key = RecordKey.decode(data)
    except StateError:
        return
    assert key.encode() == data


def test_a_key_must_name_what_its_kind_needs() -> None:
    with pytest.raises(InvalidArgument):
        RecordKey(RecordKind.SESSION)
    with pytest.raises(InvalidArgument):
        RecordKey(RecordKind.META, user_id="bob")
    with pytest.raises(InvalidArgument):
        RecordKey(RecordKind.INBOUND, group_id=GROUP)
