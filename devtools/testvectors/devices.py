"""devices.json: signed device lists, which list may replace which, and whose a device key is."""

from __future__ import annotations

from hushchat.protocol.consts import (
    DEVICE_LIST_SIGNATURE_CONTEXT,
    DEVICE_PROOF_SIGNATURE_CONTEXT,
    MAX_DEVICES_PER_USER,
    PROTOCOL_VERSION,
)
from hushchat.protocol.devices import (
    DeviceEntry,
    DeviceList,
    SignedDeviceList,
    check_device_keys,
    check_update,
    device_changes,
    device_proof_message,
)
from hushchat.protocol.encoding import UINT64_MAX, pack, unpack
from hushchat.protocol.keys import IdentityKeyPair

from ._common import Checker, Json, case, h, note, seeded, unhex, vector_file

NAME = "devices"

NOTES = {
    "Valid": note("BASIC", "A validly signed list, every device with its proof."),
    "MaxDevices": note("EDGE_CASE", f"The most devices a list may hold ({MAX_DEVICES_PER_USER})."),
    "MaxCounter": note("EDGE_CASE", "The largest counter, 2^64 - 1."),
    "BadSignature": note("AUTH_BYPASS", "The signature does not verify."),
    "MissingContext": note(
        "AUTH_BYPASS", "Signed over the body alone, without the domain-separation prefix."
    ),
    "WrongSigner": note("AUTH_BYPASS", "Signed by a device identity instead of the user identity."),
    "SubstitutedIdentity": note(
        "AUTH_BYPASS", "The body names another user identity than the one that signed it."
    ),
    "TooManyDevices": note("DOS", f"More than {MAX_DEVICES_PER_USER} devices."),
    "NoProof": note(
        "AUTH_BYPASS",
        "A device listed without its proof of possession (an entry of two fields, or a list of "
        "protocol version 1, which had none).",
    ),
    "ForeignDevice": note(
        "AUTH_BYPASS",
        "Another user's device key listed as one's own (Mallory naming alice's device), with a "
        "proof the device did not make for this user: a relay restamping the sender would "
        "otherwise present alice's sessions as Mallory's.",
    ),
    "ForgedProof": note(
        "AUTH_BYPASS",
        "A device proof signed by a key other than the device's, or made for another device id.",
    ),
    "DuplicateDeviceKey": note(
        "AUTH_BYPASS",
        "One device key listed twice: under two ids of one list, or under two users.",
    ),
    "FirstList": note("BASIC", "The first list seen for a user is accepted as it is."),
    "AddDevice": note("BASIC", "A later list adds a device."),
    "RemoveDevice": note("BASIC", "A later list removes a device."),
    "ReplacedDevice": note(
        "BASIC", "A device id keeps its number but gets a new identity: removed, then added."
    ),
    "CounterGap": note("BASIC", "The counter grows by more than one (lists were missed)."),
    "Replay": note(
        "REPLAY", "A list with the same counter as the held one (a relay replaying it)."
    ),
    "Rollback": note("REPLAY", "An older list, e.g. one that still names a removed device."),
    "OtherUser": note("AUTH_BYPASS", "A validly signed list of another user."),
    "IdentityChange": note(
        "AUTH_BYPASS", "Signed by a new user identity; the app must ask the user first."
    ),
    "NoConflict": note("BASIC", "No device key of the new list is listed under another user."),
}


def _key(label: str) -> IdentityKeyPair:
    return IdentityKeyPair(seeded("devices/" + label).random_bytes(32))


USER = "dave"


def _entries(
    *ids: int, replaced: int | None = None, user: str = USER, signer: str = "user"
) -> tuple[DeviceEntry, ...]:
    """Devices ``ids`` (device ``replaced`` with a new key), each proving it is ``user``'s."""
    user_identity = _key(signer).public.ed25519
    return tuple(
        DeviceEntry.prove(
            _key(f"device {i}{' new' if i == replaced else ''}"), user, i, user_identity
        )
        for i in ids
    )


def _signed(
    counter: int,
    *ids: int,
    replaced: int | None = None,
    user: str = USER,
    signer: str = "user",
) -> bytes:
    key = _key(signer)
    devices = _entries(*ids, replaced=replaced, user=user, signer=signer)
    return DeviceList(user, key.public.ed25519, counter, devices).sign(key).encode()


def _raw_signed(devices: list[list[object]], *, version: int = PROTOCOL_VERSION) -> bytes:
    """Dave's list at counter 4 with ``devices`` as given, validly signed by his user identity."""
    user = _key("user")
    body = pack([version, USER, user.public.ed25519, 4, devices])
    return pack([body, user.sign(DEVICE_LIST_SIGNATURE_CONTEXT + body)])


def _decoded(data: bytes) -> Json:
    dl = SignedDeviceList.decode(data).device_list
    return {
        "user_id": dl.user_id,
        "user_identity": h(dl.user_identity),
        "counter": dl.counter,
        "devices": [[d.device_id, h(d.identity), h(d.proof)] for d in dl.devices],
    }


def _list_case(comment: str, data: bytes, flags: tuple[str, ...]) -> Json:
    try:
        decoded: Json | None = _decoded(data)
        result, error = "valid", None
    except Exception as exc:  # the reference's verdict is what gets recorded
        decoded, result, error = None, "invalid", getattr(exc, "code", type(exc).__name__)
    return case(
        comment, result=result, error=error, flags=flags, signed_list=h(data), decoded=decoded
    )


def _update_case(comment: str, old: bytes | None, new: bytes, flags: tuple[str, ...]) -> Json:
    old_list = None if old is None else SignedDeviceList.decode(old).device_list
    new_list = SignedDeviceList.decode(new).device_list
    try:
        check_update(old_list, new_list)
    except Exception as exc:  # the reference's verdict is what gets recorded
        return case(
            comment,
            result="invalid",
            error=getattr(exc, "code", type(exc).__name__),
            flags=flags,
            old=None if old is None else h(old),
            new=h(new),
        )
    changes = device_changes(old_list, new_list)
    return case(
        comment,
        flags=flags,
        old=None if old is None else h(old),
        new=h(new),
        added=[[d.device_id, h(d.identity)] for d in changes.added],
        removed=[[d.device_id, h(d.identity)] for d in changes.removed],
    )


def _conflict_case(comment: str, held: list[bytes], new: bytes, flags: tuple[str, ...]) -> Json:
    held_lists = [SignedDeviceList.decode(data).device_list for data in held]
    new_list = SignedDeviceList.decode(new).device_list
    try:
        check_device_keys(new_list, held_lists)
    except Exception as exc:  # the reference's verdict is what gets recorded
        result, error = "invalid", getattr(exc, "code", type(exc).__name__)
    else:
        result, error = "valid", None
    return case(
        comment, result=result, error=error, flags=flags, held=[h(d) for d in held], new=h(new)
    )


def _resigned(data: bytes, signer: IdentityKeyPair, *, context: bytes) -> bytes:
    body = unpack(data, what="test")[0]
    return pack([body, signer.sign(context + body)])


def _lists() -> list[Json]:
    user = _key("user")
    base = _signed(4, 1, 2)
    body = unpack(unpack(base, what="test")[0], what="test")
    substituted = list(body)
    substituted[2] = _key("other user").public.ed25519
    substituted_body = pack(substituted)
    nine = [list(e.to_wire()) for e in _entries(*range(1, MAX_DEVICES_PER_USER + 2))]
    device_1 = list(_entries(1)[0].to_wire())
    alice_device = _key("alice's device")
    alice_identity = _key("alice").public.ed25519
    alice_proof = DeviceEntry.prove(alice_device, "alice", 1, alice_identity).proof
    dave_identity = user.public.ed25519
    return [
        _list_case("two devices", base, ("Valid",)),
        _list_case(
            f"{MAX_DEVICES_PER_USER} devices",
            _signed(0, *range(1, MAX_DEVICES_PER_USER + 1)),
            ("Valid", "MaxDevices"),
        ),
        _list_case("counter 2^64 - 1", _signed(UINT64_MAX, 1), ("Valid", "MaxCounter")),
        _list_case(
            "last signature byte flipped",
            base[:-1] + bytes([base[-1] ^ 1]),
            ("BadSignature",),
        ),
        _list_case(
            "signed without the context prefix",
            _resigned(base, user, context=b""),
            ("MissingContext",),
        ),
        _list_case(
            "signed by device 1 instead of the user identity",
            _resigned(base, _key("device 1"), context=DEVICE_LIST_SIGNATURE_CONTEXT),
            ("WrongSigner",),
        ),
        _list_case(
            "body names another user identity, signed by the real one",
            pack([substituted_body, user.sign(DEVICE_LIST_SIGNATURE_CONTEXT + substituted_body)]),
            ("SubstitutedIdentity",),
        ),
        _list_case(f"{MAX_DEVICES_PER_USER + 1} devices", _raw_signed(nine), ("TooManyDevices",)),
        _list_case(
            "a list of protocol version 1: devices without proofs",
            _raw_signed([device_1[:2]], version=1),
            ("NoProof",),
        ),
        _list_case("device 1 listed without its proof", _raw_signed([device_1[:2]]), ("NoProof",)),
        _list_case(
            "device 2 is alice's device key, its proof signed by dave's user identity",
            _raw_signed(
                [
                    device_1,
                    [
                        2,
                        alice_device.public.ed25519,
                        user.sign(device_proof_message(USER, 2, dave_identity)),
                    ],
                ]
            ),
            ("ForeignDevice", "ForgedProof"),
        ),
        _list_case(
            "device 2 is alice's device key, with its real proof copied from alice's list",
            _raw_signed([device_1, [2, alice_device.public.ed25519, alice_proof]]),
            ("ForeignDevice",),
        ),
        _list_case(
            "device 2's proof was made for device id 3",
            _raw_signed(
                [
                    device_1,
                    [
                        2,
                        _key("device 2").public.ed25519,
                        DeviceEntry.prove(_key("device 2"), USER, 3, dave_identity).proof,
                    ],
                ]
            ),
            ("ForgedProof",),
        ),
        _list_case(
            "device 2's proof names another user identity",
            _raw_signed(
                [
                    device_1,
                    [
                        2,
                        _key("device 2").public.ed25519,
                        DeviceEntry.prove(_key("device 2"), USER, 2, alice_identity).proof,
                    ],
                ]
            ),
            ("ForeignDevice",),
        ),
        _list_case(
            "device 2's proof signed without the context prefix",
            _raw_signed(
                [
                    device_1,
                    [
                        2,
                        _key("device 2").public.ed25519,
                        _key("device 2").sign(
                            device_proof_message(USER, 2, dave_identity)[
                                len(DEVICE_PROOF_SIGNATURE_CONTEXT) :
                            ]
                        ),
                    ],
                ]
            ),
            ("ForgedProof", "MissingContext"),
        ),
        _list_case(
            "one device key under ids 1 and 2, each with a valid proof",
            _raw_signed(
                [
                    device_1,
                    list(DeviceEntry.prove(_key("device 1"), USER, 2, dave_identity).to_wire()),
                ]
            ),
            ("DuplicateDeviceKey",),
        ),
    ]


def _updates() -> list[Json]:
    base = _signed(4, 1, 2)
    return [
        _update_case("first list", None, base, ("FirstList",)),
        _update_case("device 3 added", base, _signed(5, 1, 2, 3), ("AddDevice",)),
        _update_case("device 1 removed", base, _signed(5, 2), ("RemoveDevice",)),
        _update_case(
            "device 2 replaced by a new identity",
            base,
            _signed(5, 1, 2, replaced=2),
            ("ReplacedDevice",),
        ),
        _update_case("counter 4 to 9", base, _signed(9, 1, 2, 3), ("CounterGap",)),
        _update_case("same counter, other devices", base, _signed(4, 1), ("Replay",)),
        _update_case("the same list again", base, base, ("Replay",)),
        _update_case(
            "older list naming a removed device", base, _signed(3, 1, 2, 3), ("Rollback",)
        ),
        _update_case("list of another user", base, _signed(5, 1, 2, user="erin"), ("OtherUser",)),
        _update_case(
            "list signed by a new user identity",
            base,
            _signed(5, 1, 2, signer="new user"),
            ("IdentityChange",),
        ),
    ]


def _conflicts() -> list[Json]:
    dave = _signed(4, 1, 2)
    # Erin's list names device keys 5 and 6, or dave's device 2 key (its proof made
    # for erin: the device agreed to two users).
    erin = _signed(0, 5, 6, user="erin", signer="erin")
    erin_key = _key("erin")
    shared = DeviceEntry.prove(_key("device 2"), "erin", 7, erin_key.public.ed25519)
    erin_with_daves = (
        DeviceList("erin", erin_key.public.ed25519, 1, (shared,)).sign(erin_key).encode()
    )
    return [
        _conflict_case("erin's keys are her own", [dave], erin, ("NoConflict",)),
        _conflict_case(
            "dave's next list, holding his previous one",
            [dave],
            _signed(5, 1, 2, 3),
            ("NoConflict",),
        ),
        _conflict_case(
            "erin's list names dave's device 2 key",
            [dave, erin],
            erin_with_daves,
            ("DuplicateDeviceKey",),
        ),
        _conflict_case(
            "dave's list names a key held under erin",
            [erin_with_daves],
            dave,
            ("DuplicateDeviceKey",),
        ),
    ]


def generate() -> Json:
    return vector_file(
        NAME,
        description=(
            "Signed device lists: decoding with verification of the list signature and of every "
            "device's proof of possession, the rules for replacing a held list (same user and "
            "identity, strictly larger counter), and that a device key belongs to one user."
        ),
        spec=["11-devices.md"],
        notes=NOTES,
        groups=[
            {
                "type": "SignedDeviceList",
                "signatureContext": h(DEVICE_LIST_SIGNATURE_CONTEXT),
                "proofContext": h(DEVICE_PROOF_SIGNATURE_CONTEXT),
                "maxDevices": MAX_DEVICES_PER_USER,
                "tests": _lists(),
            },
            {"type": "DeviceListUpdate", "tests": _updates()},
            {"type": "DeviceKeyConflict", "tests": _conflicts()},
        ],
    )


def verify_test(group: Json, test: Json) -> list[str]:
    c = Checker()
    if group["type"] == "SignedDeviceList":
        data = unhex(test["signed_list"])
        decoded = c.outcome("decode", test, lambda: _decoded(data))
        if decoded is not None:
            c.equal("decoded", test["decoded"], decoded)
            c.equal("re-encoded", test["signed_list"], h(SignedDeviceList.decode(data).encode()))
    elif group["type"] == "DeviceKeyConflict":
        held = [SignedDeviceList.decode(unhex(d)).device_list for d in test["held"]]
        new_list = SignedDeviceList.decode(unhex(test["new"])).device_list
        c.outcome("check_device_keys", test, lambda: check_device_keys(new_list, held))
    elif group["type"] == "DeviceListUpdate":
        old = None
        if test["old"] is not None:
            old = SignedDeviceList.decode(unhex(test["old"])).device_list
        new = SignedDeviceList.decode(unhex(test["new"])).device_list
        c.outcome("check_update", test, lambda: check_update(old, new))
        if test["result"] == "valid":
            changes = device_changes(old, new)
            c.equal("added", test["added"], [[d.device_id, h(d.identity)] for d in changes.added])
            c.equal(
                "removed", test["removed"], [[d.device_id, h(d.identity)] for d in changes.removed]
            )
    else:
        c.fail(f"unknown test group type {group['type']}")
    return c.failures
