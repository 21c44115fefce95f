"""wire.json's structures inside the encryption: contents, group texts, group control."""

from __future__ import annotations

from typing import Any

from hushchat.protocol.consts import (
    GROUP_VERSION,
    MAX_GROUP_HISTORY,
    MAX_RECEIPT_MESSAGE_IDS,
    PROTOCOL_VERSION,
    SENDER_KEY_VERSION,
)
from hushchat.protocol.content import (
    DeliveryReceipt,
    GroupControl,
    GroupSync,
    GroupText,
    RetryRequest,
    SenderKey,
    SentCopy,
    SyncRequest,
    Text,
    decode_content,
)
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.group import (
    Action,
    ControlMessage,
    GroupState,
    RemoveMember,
    SetAdmin,
    Welcome,
)
from hushchat.protocol.keys import IdentityKeyPair

from . import group as group_vectors
from ._common import Json, h, seeded, unhex
from ._wire import Defect, Structure, replace, replace_all

SMALL_ORDER_EDWARDS = unhex("0100000000000000000000000000000000000000000000000000000000000000")


def _content_json(data: bytes) -> Json:
    c = decode_content(data)
    if isinstance(c, Text):
        return {"type": 1, "message_id": h(c.message_id), "sent_at": c.sent_at, "body": h(c.body)}
    if isinstance(c, SenderKey):
        return {"type": 2, "distribution": h(c.distribution)}
    if isinstance(c, GroupControl):
        snapshot = None if c.snapshot is None else h(c.snapshot)
        return {"type": 3, "control": h(c.control), "snapshot": snapshot}
    if isinstance(c, RetryRequest):
        return {"type": 4, "group_id": h(c.group_id), "chain_id": c.chain_id}
    if isinstance(c, SyncRequest):
        return {"type": 6}
    if isinstance(c, GroupSync):
        return {"type": 7, "states": [h(state) for state in c.states]}
    if isinstance(c, DeliveryReceipt):
        return {"type": 8, "message_ids": [h(i) for i in c.message_ids]}
    return {
        "type": 5,
        "to_kind": 1 if c.to_user is not None else 2,
        "to": c.to_user if c.to_user is not None else h(c.to_group or b""),
        "message_id": h(c.message_id),
        "sent_at": c.sent_at,
        "body": h(c.body),
    }


def _content_encode(d: Json) -> bytes:
    kind = d["type"]
    if kind == 1:
        return Text(unhex(d["message_id"]), d["sent_at"], unhex(d["body"])).encode()
    if kind == 2:
        return SenderKey(unhex(d["distribution"])).encode()
    if kind == 3:
        snapshot = None if d["snapshot"] is None else unhex(d["snapshot"])
        return GroupControl(unhex(d["control"]), snapshot).encode()
    if kind == 4:
        return RetryRequest(unhex(d["group_id"]), d["chain_id"]).encode()
    if kind == 6:
        return SyncRequest().encode()
    if kind == 7:
        return GroupSync(tuple(unhex(state) for state in d["states"])).encode()
    if kind == 8:
        return DeliveryReceipt(tuple(unhex(i) for i in d["message_ids"])).encode()
    to_user = d["to"] if d["to_kind"] == 1 else None
    to_group = unhex(d["to"]) if d["to_kind"] == 2 else None
    return SentCopy(
        to_user, to_group, unhex(d["message_id"]), d["sent_at"], unhex(d["body"])
    ).encode()


def _group_text_json(data: bytes) -> Json:
    t = GroupText.decode(data)
    return {
        "message_id": h(t.message_id),
        "sent_at": t.sent_at,
        "body": h(t.body),
        "epoch": t.epoch,
        "state_hash": h(t.state_hash),
    }


def _control_json(data: bytes) -> Json:
    m = ControlMessage.decode(data)
    return {
        "body": h(m.body),
        "signature": h(m.signature),
        "version": GROUP_VERSION,
        "group_id": h(m.group_id),
        "parent_epoch": m.parent_epoch,
        "parent_hash": h(m.parent_hash),
        "author_user_id": m.author_user_id,
        "author_device_id": m.author_device_id,
        **group_vectors.action_json(m.action),
        "change_id": h(m.change_id),
    }


def _snapshot_json(data: bytes) -> Json:
    s = GroupState.decode(data)
    return {
        "version": PROTOCOL_VERSION,
        "group_id": h(s.group_id),
        "epoch": s.epoch,
        "prev_hash": h(s.prev_hash),
        "change_id": h(s.change_id),
        "title": s.title,
        "members": [[m.user_id, h(m.user_identity), m.admin] for m in s.members],
        "state_hash": h(s.state_hash),
    }


def _snapshot_encode(d: Json) -> bytes:
    members = [[u, unhex(i), a] for u, i, a in d["members"]]
    raw = [
        d["version"],
        unhex(d["group_id"]),
        d["epoch"],
        unhex(d["prev_hash"]),
        unhex(d["change_id"]),
        d["title"],
        members,
    ]
    return GroupState.decode(pack(raw)).encode()


def _welcome_json(data: bytes) -> Json:
    w = Welcome.decode(data)
    return {
        "version": GROUP_VERSION,
        "message": h(w.message.encode()),
        "history": [h(s.encode()) for s in w.history],
    }


STRUCTURES = {
    s.name: s
    for s in (
        Structure("Content", _content_json, _content_encode, version_index=0, bin_index=1),
        Structure(
            "GroupText",
            _group_text_json,
            lambda d: GroupText(
                unhex(d["message_id"]),
                d["sent_at"],
                unhex(d["body"]),
                d["epoch"],
                unhex(d["state_hash"]),
            ).encode(),
            version_index=-1,
            bin_index=0,
        ),
        Structure(
            "ControlMessage",
            _control_json,
            lambda d: pack([unhex(d["body"]), unhex(d["signature"])]),
            version_index=-1,
            bin_index=0,
            fixed_bin=False,
        ),
        Structure("GroupSnapshot", _snapshot_json, _snapshot_encode, version_index=0, bin_index=1),
        Structure(
            "Welcome",
            _welcome_json,
            lambda d: pack([d["version"], unhex(d["message"]), [unhex(s) for s in d["history"]]]),
            version_index=0,
            bin_index=1,
            fixed_bin=False,
        ),
    )
}


# ------------------------------------------------------------------ samples


def _welcome_and_parts() -> tuple[bytes, bytes, bytes]:
    """(a welcome for an add, its control message, the add's parent snapshot)."""
    add, welcome = group_vectors.sample_welcome()
    return welcome.encode(), add.encode(), welcome.history[-1].encode()


def _signed_control(add: bytes, action: Action) -> bytes:
    """A control message with the header of the sample add and another action, signed."""
    m = ControlMessage.decode(add)
    device = IdentityKeyPair(seeded("wire/control").random_bytes(32))
    return ControlMessage.sign(
        device,
        group_id=m.group_id,
        parent_epoch=m.parent_epoch,
        parent_hash=m.parent_hash,
        author_user_id=m.author_user_id,
        author_device_id=m.author_device_id,
        action=action,
    ).encode()


def samples() -> dict[str, list[tuple[str, bytes]]]:
    """Valid encodings of each structure, by name."""
    rng = seeded("wire/content")
    message_id, group_id = rng.random_bytes(16), rng.random_bytes(16)
    welcome, control, snapshot = _welcome_and_parts()
    skdm = pack(
        [SENDER_KEY_VERSION, group_id, "alice", 1, 5, 0, rng.random_bytes(32), rng.random_bytes(32)]
    )
    state_hash = rng.random_bytes(32)
    return {
        "Content": [
            ("Text", Text(message_id, 1_700_000_000, b"hello").encode()),
            ("SenderKey", SenderKey(skdm).encode()),
            ("GroupControl with a welcome", GroupControl(control, welcome).encode()),
            ("GroupControl without a welcome", GroupControl(control, None).encode()),
            ("RetryRequest naming a chain", RetryRequest(group_id, 7).encode()),
            ("RetryRequest without a chain", RetryRequest(group_id, None).encode()),
            ("SentCopy to a user", SentCopy("bob", None, message_id, 5, b"hi").encode()),
            ("SentCopy to a group", SentCopy(None, group_id, message_id, 5, b"hi").encode()),
            ("SyncRequest", SyncRequest().encode()),
            ("GroupSync of one state", GroupSync((snapshot,)).encode()),
            (
                f"GroupSync of {MAX_GROUP_HISTORY + 1} states, the most it may hold",
                GroupSync((snapshot,) * (MAX_GROUP_HISTORY + 1)).encode(),
            ),
            (
                "Text whose body is not UTF-8: the body is opaque bytes",
                Text(message_id, 1_700_000_000, b"\xff\xfe\x00hi").encode(),
            ),
            ("DeliveryReceipt of one message", DeliveryReceipt((message_id,)).encode()),
            (
                f"DeliveryReceipt of {MAX_RECEIPT_MESSAGE_IDS} messages, the most it may name",
                DeliveryReceipt(
                    tuple(rng.random_bytes(16) for _ in range(MAX_RECEIPT_MESSAGE_IDS))
                ).encode(),
            ),
        ],
        "GroupText": [
            (
                "group text of a sender at epoch 3",
                GroupText(message_id, 1_700_000_000, b"hi all", 3, state_hash).encode(),
            )
        ],
        "ControlMessage": [
            ("add_member", control),
            (
                "remove_member of a one-byte user id, the shortest",
                _signed_control(control, RemoveMember("d")),
            ),
            (
                "set_admin of a one-byte user id, the shortest",
                _signed_control(control, SetAdmin("d", True)),
            ),
        ],
        "GroupSnapshot": [("the parent of an add", snapshot)],
        "Welcome": [("welcome for an add", welcome)],
    }


# ------------------------------------------------------------------ specific defects


def specific_defects(name: str, sample: bytes) -> list[Defect]:
    s = STRUCTURES[name]
    fields = unpack(sample, what="test")
    if name == "Content":
        if fields[0] == 5 and fields[1] == 1:
            return [
                ("SentCopy to_kind 3", "UnknownType", replace(sample, s, 1, 3)),
                ("SentCopy to a user id of 65 bytes", "WrongSize", replace(sample, s, 2, "u" * 65)),
                ("SentCopy to the empty user id", "WrongSize", replace(sample, s, 2, "")),
                (
                    "SentCopy to a user id containing U+0000",
                    "NulUserId",
                    replace(sample, s, 2, "bob\x00evil"),
                ),
            ]
        if fields[0] == 1:
            return [("content type 9", "UnknownType", replace(sample, s, 0, 9))]
        if fields[0] == 8 and len(fields[1]) == 1:
            message_id = fields[1][0]
            return [
                ("DeliveryReceipt of no message", "WrongSize", replace(sample, s, 1, [])),
                (
                    f"DeliveryReceipt of {MAX_RECEIPT_MESSAGE_IDS + 1} messages",
                    "WrongSize",
                    replace(sample, s, 1, [message_id] * (MAX_RECEIPT_MESSAGE_IDS + 1)),
                ),
                (
                    "DeliveryReceipt naming a message id of 15 bytes",
                    "WrongSize",
                    replace(sample, s, 1, [message_id[:15]]),
                ),
                (
                    "DeliveryReceipt naming a message id that is a string",
                    "WrongType",
                    replace(sample, s, 1, ["x" * 16]),
                ),
            ]
        if fields[0] == 7:
            state = fields[1][0]
            return [
                ("GroupSync of no state", "WrongSize", replace(sample, s, 1, [])),
                (
                    f"GroupSync of {MAX_GROUP_HISTORY + 2} states",
                    "WrongSize",
                    replace(sample, s, 1, [state] * (MAX_GROUP_HISTORY + 2)),
                ),
            ]
        return []
    if name == "GroupText":
        return [
            ("sent_at is true", "WrongType", replace(sample, s, 1, True)),
            ("epoch -1", "NegativeInteger", replace(sample, s, 3, -1)),
            ("state hash of 31 bytes", "WrongSize", replace(sample, s, 4, fields[4][:31])),
            ("three fields, no group state (versions 1 and 2)", "MissingField", pack(fields[:3])),
        ]
    if name == "ControlMessage":
        return _control_defects(sample)
    if name == "GroupSnapshot":
        members = fields[6]
        no_admin = [[u, i, False] for u, i, _ in members]
        return [
            (
                f"version {PROTOCOL_VERSION + 1}",
                "UnknownVersion",
                replace(sample, s, 0, PROTOCOL_VERSION + 1),
            ),
            ("members in decreasing order", "Order", replace(sample, s, 6, members[::-1])),
            ("no admin", "Inconsistent", replace(sample, s, 6, no_admin)),
            ("epoch 0 with a parent hash", "Inconsistent", replace(sample, s, 2, 0)),
            (
                "member identity of small order",
                "InvalidKey",
                replace(sample, s, 6, [[members[0][0], SMALL_ORDER_EDWARDS, True]]),
            ),
            ("title of 257 bytes", "WrongSize", replace(sample, s, 5, "t" * 257)),
            (
                "member user id containing U+0000",
                "NulUserId",
                replace(sample, s, 6, [["alice\x00evil", members[0][1], True]]),
            ),
            (
                f"version {PROTOCOL_VERSION + 1} and one extra field: the element count is checked "
                "first (MALFORMED)",
                "CheckOrder",
                replace_all(sample, s, {0: PROTOCOL_VERSION + 1}, extra=True),
                "MALFORMED",
            ),
        ]
    if name == "Welcome":
        control = unpack(fields[1], what="test")
        control_v3 = pack(
            [pack([GROUP_VERSION + 1, *unpack(control[0], what="test")[1:]]), control[1]]
        )
        too_long = [fields[2][-1]] * (MAX_GROUP_HISTORY + 2)
        return [
            (
                "version 3 and 18 history states: the version is checked first (UNKNOWN_VERSION)",
                "CheckOrder",
                replace_all(sample, s, {0: GROUP_VERSION + 1, 2: too_long}),
                "UNKNOWN_VERSION",
            ),
            (
                "a control message of version 3 and 18 history states: the message is decoded "
                "at its field, before the history is read (UNKNOWN_VERSION)",
                "CheckOrder",
                replace_all(sample, s, {1: control_v3, 2: too_long}),
                "UNKNOWN_VERSION",
            ),
            ("version 1 (the fork rule)", "UnknownVersion", replace(sample, s, 0, 1)),
            ("version 3", "UnknownVersion", replace(sample, s, 0, GROUP_VERSION + 1)),
            ("a history entry that is not bytes", "WrongType", replace(sample, s, 2, [1])),
            (
                "18 history states",
                "WrongSize",
                replace(sample, s, 2, [fields[2][-1]] * 18),
            ),
        ]
    raise AssertionError(name)


def _control_defects(sample: bytes) -> list[Defect]:
    """Body defects (the signature is not checked by the decoder, so it stays)."""
    body, signature = unpack(sample, what="test")
    fields: list[Any] = unpack(body, what="test")

    def variant(index: int, value: Any) -> bytes:
        changed = list(fields)
        changed[index] = value
        return pack([pack(changed), signature])

    def changed(changes: dict[int, Any], new_signature: bytes = signature) -> bytes:
        body_fields = list(fields)
        for index, value in changes.items():
            body_fields[index] = value
        return pack([pack(body_fields), new_signature])

    create = list(fields)
    create[6:8] = [0, ["title", [], None]]
    create_on_parent = pack([pack(create), signature])
    reinit = list(fields)
    reinit[2:4] = [0, bytes(32)]
    reinit[6:8] = [0, ["title", [], [bytes(15), 0, bytes(32)]]]
    short_replaces = pack([pack(reinit), signature])
    small_order_add = [fields[7][0], SMALL_ORDER_EDWARDS]
    return [
        (
            "remove_member of an empty user id (checked once the arguments are read)",
            "WrongSize",
            changed({6: 2, 7: [""]}),
        ),
        ("set_admin of an empty user id", "WrongSize", changed({6: 4, 7: ["", True]})),
        (
            "remove_member of a user id containing U+0000",
            "NulUserId",
            changed({6: 2, 7: ["b\x00"]}),
        ),
        (
            "set_admin of a user id containing U+0000",
            "NulUserId",
            changed({6: 4, 7: ["b\x00", True]}),
        ),
        (
            "add_member of a user id containing U+0000",
            "NulUserId",
            changed({6: 1, 7: ["bob\x00evil", IdentityKeyPair(bytes(32)).public.ed25519]}),
        ),
        ("author user id containing U+0000", "NulUserId", variant(4, "alice\x00evil")),
        (
            "signature of 63 bytes and body version 3: the outer array, the signature's size "
            "included, is read before the body is decoded (MALFORMED)",
            "CheckOrder",
            changed({0: GROUP_VERSION + 1}, bytes(63)),
            "MALFORMED",
        ),
        (
            "empty author user id and an add_member identity of small order: the author id's "
            "minimum length is checked last (INVALID_KEY)",
            "CheckOrder",
            changed({4: "", 7: small_order_add}),
            "INVALID_KEY",
        ),
        (
            "author user id of 65 bytes and an add_member identity of small order: the "
            "maximum length is checked at the field (MALFORMED)",
            "CheckOrder",
            changed({4: "a" * 65, 7: small_order_add}),
            "MALFORMED",
        ),
        (
            "an add_member identity of small order and an empty added user id: the identity "
            "is checked first (INVALID_KEY)",
            "CheckOrder",
            changed({7: ["", SMALL_ORDER_EDWARDS]}),
            "INVALID_KEY",
        ),
        ("body version 1 (the fork rule)", "UnknownVersion", variant(0, 1)),
        ("body version 3", "UnknownVersion", variant(0, GROUP_VERSION + 1)),
        ("unknown action 6", "UnknownType", variant(6, 6)),
        ("add_member args missing the identity", "MissingField", variant(7, fields[7][:1])),
        (
            "add_member identity of small order",
            "InvalidKey",
            variant(7, [fields[7][0], SMALL_ORDER_EDWARDS]),
        ),
        ("empty author user id", "WrongSize", variant(4, "")),
        ("create on a parent that is not the zero state", "Inconsistent", create_on_parent),
        ("create replacing a group id of 15 bytes", "WrongSize", short_replaces),
    ]
