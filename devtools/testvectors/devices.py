"""devices.json: signed device lists, and which list may replace which."""

from __future__ import annotations

from hushchat.protocol.consts import DEVICE_LIST_SIGNATURE_CONTEXT, MAX_DEVICES_PER_USER
from hushchat.protocol.devices import (
    DeviceEntry,
    DeviceList,
    SignedDeviceList,
    check_update,
    device_changes,
)
from hushchat.protocol.encoding import UINT64_MAX, pack, unpack
from hushchat.protocol.keys import IdentityKeyPair

from ._common import Checker, Json, case, h, note, seeded, unhex, vector_file

NAME = "devices"

NOTES = {
    "Valid": note("BASIC", "A validly signed list."),
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
}


def _key(label: str) -> IdentityKeyPair:
    return IdentityKeyPair(seeded("devices/" + label).random_bytes(32))


USER = "dave"


def _entries(*ids: int, replaced: int | None = None) -> tuple[DeviceEntry, ...]:
    return tuple(
        DeviceEntry(i, _key(f"device {i}{' new' if i == replaced else ''}").public.ed25519)
        for i in ids
    )


def _signed(
    counter: int,
    devices: tuple[DeviceEntry, ...],
    *,
    user: str = USER,
    signer: str = "user",
) -> bytes:
    key = _key(signer)
    return DeviceList(user, key.public.ed25519, counter, devices).sign(key).encode()


def _decoded(data: bytes) -> Json:
    dl = SignedDeviceList.decode(data).device_list
    return {
        "user_id": dl.user_id,
        "user_identity": h(dl.user_identity),
        "counter": dl.counter,
        "devices": [[d.device_id, h(d.identity)] for d in dl.devices],
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


def _resigned(data: bytes, signer: IdentityKeyPair, *, context: bytes) -> bytes:
    body = unpack(data, what="test")[0]
    return pack([body, signer.sign(context + body)])


def generate() -> Json:
    user = _key("user")
    base = _signed(4, _entries(1, 2))
    body = unpack(unpack(base, what="test")[0], what="test")
    substituted = list(body)
    substituted[2] = _key("other user").public.ed25519
    substituted_body = pack(substituted)
    nine_body = pack([*body[:4], [[e.device_id, e.identity] for e in _entries(*range(1, 10))]])
    lists = [
        _list_case("two devices", base, ("Valid",)),
        _list_case(
            f"{MAX_DEVICES_PER_USER} devices",
            _signed(0, _entries(*range(1, MAX_DEVICES_PER_USER + 1))),
            ("Valid", "MaxDevices"),
        ),
        _list_case("counter 2^64 - 1", _signed(UINT64_MAX, _entries(1)), ("Valid", "MaxCounter")),
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
        _list_case(
            f"{MAX_DEVICES_PER_USER + 1} devices",
            pack([nine_body, user.sign(DEVICE_LIST_SIGNATURE_CONTEXT + nine_body)]),
            ("TooManyDevices",),
        ),
    ]
    updates = [
        _update_case("first list", None, base, ("FirstList",)),
        _update_case("device 3 added", base, _signed(5, _entries(1, 2, 3)), ("AddDevice",)),
        _update_case("device 1 removed", base, _signed(5, _entries(2)), ("RemoveDevice",)),
        _update_case(
            "device 2 replaced by a new identity",
            base,
            _signed(5, _entries(1, 2, replaced=2)),
            ("ReplacedDevice",),
        ),
        _update_case("counter 4 to 9", base, _signed(9, _entries(1, 2, 3)), ("CounterGap",)),
        _update_case("same counter, other devices", base, _signed(4, _entries(1)), ("Replay",)),
        _update_case("the same list again", base, base, ("Replay",)),
        _update_case(
            "older list naming a removed device", base, _signed(3, _entries(1, 2, 3)), ("Rollback",)
        ),
        _update_case(
            "list of another user", base, _signed(5, _entries(1, 2), user="erin"), ("OtherUser",)
        ),
        _update_case(
            "list signed by a new user identity",
            base,
            _signed(5, _entries(1, 2), signer="new user"),
            ("IdentityChange",),
        ),
    ]
    return vector_file(
        NAME,
        description=(
            "Signed device lists: decoding with signature verification, and the rules for "
            "replacing a held list (same user and identity, strictly larger counter)."
        ),
        spec=["11-devices.md"],
        notes=NOTES,
        groups=[
            {
                "type": "SignedDeviceList",
                "signatureContext": h(DEVICE_LIST_SIGNATURE_CONTEXT),
                "maxDevices": MAX_DEVICES_PER_USER,
                "tests": lists,
            },
            {"type": "DeviceListUpdate", "tests": updates},
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
