"""wire.json: every decoder, on valid encodings and on malformed ones.

One test group per structure (``structure`` names it, as in
spec/06-wire-format.md). A valid test gives the input and its decoded fields
(``decoded``); re-encoding them must give the input back. An invalid test
gives an input with one defect and the error the decoder must raise, or,
flagged CheckOrder, two defects: the spec's order of checks says which
error wins, and the generator refuses to write the test if the decoder
disagrees. The group ``Value`` runs the structure-free steps (size, parse,
depth, canonicality) at their limits. Only
the decoding is tested here: signatures and keys in use are the business of
the other files (a SignedDeviceList's signature is checked by its decoder,
so its samples are validly signed).
"""

from __future__ import annotations

from typing import Any

from hushchat.protocol.address import Address
from hushchat.protocol.consts import (
    DEVICE_LIST_SIGNATURE_CONTEXT,
    MAX_MESSAGE_SIZE,
    MAX_NESTING_DEPTH,
    PROTOCOL_VERSION,
    SENDER_KEY_VERSION,
)
from hushchat.protocol.devices import DeviceEntry, DeviceList, SignedDeviceList
from hushchat.protocol.double_ratchet import Header
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.errors import ProtocolError
from hushchat.protocol.group_cipher import OutboundSenderKey
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.messages import PreKeyMessage, RatchetMessage, decode_message
from hushchat.protocol.prekeys import PreKeyBundle
from hushchat.protocol.sender_keys import SenderKeyDistributionMessage, SenderKeyMessage

from . import handshake, wire_group
from ._common import (
    Checker,
    Json,
    case,
    h,
    large,
    note,
    opt_h,
    seeded,
    unhex,
    unhex_any,
    vector_file,
)
from ._wire import (
    Defect,
    Structure,
    defect_parts,
    error_of,
    generic_defects,
    replace,
    replace_all,
    split,
)

NAME = "wire"
SMALL_ORDER_EDWARDS = unhex("0100000000000000000000000000000000000000000000000000000000000000")
NON_CANONICAL_U = unhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f")

NOTES = {
    "Valid": note("BASIC", "A valid encoding and its decoded fields."),
    "Empty": note("BASIC", "Zero bytes."),
    "Truncated": note("BASIC", "The last byte is missing."),
    "TrailingBytes": note("BASIC", "One byte follows the value."),
    "NonCanonicalArray": note(
        "CAN_OF_WORMS", "The array length uses array 16 where fixarray fits."
    ),
    "NonCanonicalInteger": note("CAN_OF_WORMS", "An integer uses uint 8 where a fixint fits."),
    "NonCanonicalBin": note("CAN_OF_WORMS", "A byte string uses bin 16 where bin 8 fits."),
    "UnknownVersion": note(
        "BASIC",
        f"The version field is {PROTOCOL_VERSION + 1}; for the sender-key structures "
        f"{SENDER_KEY_VERSION + 1}, or 1 or 2, whose chains were not bound to their sender.",
    ),
    "UnknownType": note("BASIC", "The message type is neither 1 nor 2."),
    "ExtraField": note("BASIC", "One field too many."),
    "MissingField": note("BASIC", "The last field is missing."),
    "WrongType": note("BASIC", "A byte-string field holds a UTF-8 string of the same length."),
    "Float": note("BASIC", "A field holds a float (no float is valid anywhere)."),
    "Map": note("BASIC", "A map instead of the array (no map is valid anywhere)."),
    "Extension": note("BASIC", "A field holds an extension type (none is valid anywhere)."),
    "TooDeep": note("DOS", f"A field holds arrays nested deeper than {MAX_NESTING_DEPTH}."),
    "WrongSize": note("BASIC", "A fixed-size byte string is one byte short."),
    "NulUserId": note(
        "AUTH_BYPASS",
        "A user id containing U+0000: C strings would read it as a shorter id (MALFORMED).",
    ),
    "NegativeInteger": note("BASIC", "An unsigned field holds -1."),
    "IntegerTooLarge": note("BASIC", "A u32 field holds 2^32."),
    "InvalidKey": note("CONFIDENTIALITY", "A key of small order or not canonically encoded."),
    "Inconsistent": note(
        "BASIC", "Fields that go together do not (e.g. a KEM id without ciphertext)."
    ),
    "TooShort": note("BASIC", "Too short to hold a signature and a body."),
    "BadCiphertextLength": note(
        "BASIC", "A ciphertext length that is not a positive multiple of 16."
    ),
    "Order": note("CAN_OF_WORMS", "Entries out of their required order (a second encoding)."),
    "AtLimit": note(
        "EDGE_CASE", "A size, count or depth exactly at its limit (valid; one more is not)."
    ),
    "TooLarge": note("DOS", "One byte more than MAX_MESSAGE_SIZE."),
    "CheckOrder": note(
        "EDGE_CASE",
        "Two defects: the check that comes first (spec/00-conventions.md section 0.2, then the "
        "field order of spec/06-wire-format.md) decides the error; the comment says which.",
    ),
    "DuplicateDeviceKey": note(
        "AUTH_BYPASS",
        "One device key under two device ids of a list (a key belongs to one device).",
    ),
    "ForgedProof": note(
        "AUTH_BYPASS",
        "A device's proof of possession that its key did not make for this user and device id.",
    ),
}


# ------------------------------------------------------------------ structures


def _bundle_json(data: bytes) -> Json:
    b = PreKeyBundle.decode(data)
    opk, kem = b.one_time_prekey, b.kem_prekey
    return {
        "version": PROTOCOL_VERSION,
        "user_id": b.user_id,
        "device_id": b.device_id,
        "identity": h(b.identity.ed25519),
        "signed_prekey": {
            "id": b.signed_prekey.key_id,
            "public": h(b.signed_prekey.public),
            "signature": h(b.signed_prekey.signature),
        },
        "one_time_prekey": None if opk is None else {"id": opk.key_id, "public": h(opk.public)},
        "kem_prekey": None
        if kem is None
        else {"id": kem.key_id, "public": h(kem.public), "signature": h(kem.signature)},
        "kem_is_last_resort": b.kem_is_last_resort,
    }


def _message_json(data: bytes) -> Json:
    m = decode_message(data)
    if isinstance(m, RatchetMessage):
        return {"type": 1, "header": h(m.header), "body": h(m.body)}
    hs = m.handshake
    return {
        "type": 2,
        "identity": h(hs.identity.ed25519),
        "base_key": h(hs.base_key),
        "signed_prekey_id": hs.signed_prekey_id,
        "one_time_prekey_id": hs.one_time_prekey_id,
        "kem_prekey_id": hs.kem_prekey_id,
        "kem_ciphertext": opt_h(hs.kem_ciphertext),
        "header": h(m.message.header),
        "body": h(m.message.body),
    }


def _message_encode(d: Json) -> bytes:
    if d["type"] == 1:
        return RatchetMessage(unhex(d["header"]), unhex(d["body"])).encode()
    decoded = decode_message(_raw_prekey(d))
    assert isinstance(decoded, PreKeyMessage)
    return decoded.encode()


def _raw_prekey(d: Json) -> bytes:
    return pack(
        [
            2,
            unhex(d["identity"]),
            unhex(d["base_key"]),
            d["signed_prekey_id"],
            d["one_time_prekey_id"],
            d["kem_prekey_id"],
            None if d["kem_ciphertext"] is None else unhex(d["kem_ciphertext"]),
            unhex(d["header"]),
            unhex(d["body"]),
        ]
    )


def _header_json(data: bytes) -> Json:
    header = Header.decode(data)
    return {
        "version": PROTOCOL_VERSION,
        "ratchet_key": h(header.ratchet_key),
        "previous_chain_length": header.previous_chain_length,
        "message_number": header.message_number,
    }


def _device_list_json(data: bytes) -> Json:
    signed = SignedDeviceList.decode(data)
    dl = signed.device_list
    return {
        "body": h(signed.body),
        "signature": h(signed.signature),
        "version": PROTOCOL_VERSION,
        "user_id": dl.user_id,
        "user_identity": h(dl.user_identity),
        "counter": dl.counter,
        "devices": [[d.device_id, h(d.identity), h(d.proof)] for d in dl.devices],
    }


def _skdm_json(data: bytes) -> Json:
    m = SenderKeyDistributionMessage.decode(data)
    return {
        "version": SENDER_KEY_VERSION,
        "group_id": h(m.group_id),
        "sender_user_id": m.sender.user_id,
        "sender_device_id": m.sender.device_id,
        "chain_id": m.chain_id,
        "iteration": m.iteration,
        "chain_key": h(m.chain_key),
        "signing_key": h(m.signing_key),
    }


def _skm_json(data: bytes) -> Json:
    m = SenderKeyMessage.decode(data)
    return {
        "version": SENDER_KEY_VERSION,
        "group_id": h(m.group_id),
        "chain_id": m.chain_id,
        "iteration": m.iteration,
        "ciphertext": h(m.ciphertext),
        "signature": h(m.signature),
    }


STRUCTURES = {
    s.name: s
    for s in (
        Structure(
            "PreKeyBundle",
            _bundle_json,
            lambda d: PreKeyBundle.decode(_repack_bundle(d)).encode(),
            version_index=0,
            bin_index=3,
        ),
        Structure(
            "Message", _message_json, _message_encode, version_index=0, bin_index=1, fixed_bin=False
        ),
        Structure(
            "RatchetHeader",
            _header_json,
            lambda d: Header(
                unhex(d["ratchet_key"]), d["previous_chain_length"], d["message_number"]
            ).encode(),
            version_index=0,
            bin_index=1,
        ),
        Structure(
            "SignedDeviceList",
            _device_list_json,
            lambda d: pack([unhex(d["body"]), unhex(d["signature"])]),
            version_index=-1,
            bin_index=0,
            fixed_bin=False,
        ),
        Structure(
            "SenderKeyDistributionMessage",
            _skdm_json,
            lambda d: SenderKeyDistributionMessage(
                unhex(d["group_id"]),
                Address(d["sender_user_id"], d["sender_device_id"]),
                d["chain_id"],
                d["iteration"],
                unhex(d["chain_key"]),
                unhex(d["signing_key"]),
            ).encode(),
            version_index=0,
            bin_index=1,
        ),
        Structure(
            "SenderKeyMessage",
            _skm_json,
            lambda d: (
                SenderKeyMessage.encode_body(
                    unhex(d["group_id"]), d["chain_id"], d["iteration"], unhex(d["ciphertext"])
                )
                + unhex(d["signature"])
            ),
            version_index=0,
            bin_index=1,
            signed_suffix=True,
        ),
    )
}


STRUCTURES.update(wire_group.STRUCTURES)


def _repack_bundle(d: Json) -> bytes:
    spk, opk, kem = d["signed_prekey"], d["one_time_prekey"], d["kem_prekey"]
    return pack(
        [
            d["version"],
            d["user_id"],
            d["device_id"],
            unhex(d["identity"]),
            [spk["id"], unhex(spk["public"]), unhex(spk["signature"])],
            None if opk is None else [opk["id"], unhex(opk["public"])],
            None if kem is None else [kem["id"], unhex(kem["public"]), unhex(kem["signature"])],
            d["kem_is_last_resort"],
        ]
    )


# ------------------------------------------------------------------ samples


def _device_list_samples() -> list[tuple[str, bytes]]:
    rng = seeded("wire/devices")
    user = IdentityKeyPair(rng.random_bytes(32))
    devices = [
        DeviceEntry.prove(IdentityKeyPair(rng.random_bytes(32)), "carol", i, user.public.ed25519)
        for i in (1, 7)
    ]
    signed = DeviceList("carol", user.public.ed25519, 3, tuple(devices)).sign(user)
    return [("two devices, counter 3", signed.encode())]


def _sender_key_samples() -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    rng = seeded("wire/sender-key")
    key = OutboundSenderKey.create(rng.random_bytes(16), 0, rng)
    sender = Address("alice", 1)
    skdm = key.distribution_message(sender=sender)
    message = key.encrypt(b"group hello", sender=sender)
    return [("SKDM at iteration 0", skdm)], [("message at iteration 0", message)]


def _ratchet_samples() -> list[tuple[str, bytes]]:
    rng = seeded("wire/header")
    key = IdentityKeyPair(rng.random_bytes(32)).public.x25519
    return [
        ("header PN 0, N 0", Header(key, 0, 0).encode()),
        ("header PN 300, N 70000", Header(key, 300, 70000).encode()),
    ]


# ------------------------------------------------------------------ defects


def _specific_defects(name: str, sample: bytes) -> list[Defect]:
    s = STRUCTURES[name]
    version = (
        f"version {PROTOCOL_VERSION + 1}",
        "UnknownVersion",
        replace(sample, s, 0, PROTOCOL_VERSION + 1),
    )
    if name == "PreKeyBundle":
        fields = unpack(sample, what="test")
        spk = list(fields[4])
        spk[1] = NON_CANONICAL_U
        without_kem: list[Defect] = []
        if fields[6] is None:
            without_kem = [
                ("no KEM prekey but last resort", "Inconsistent", replace(sample, s, 7, True)),
                (
                    "identity of small order and last resort without a KEM prekey: fields "
                    "are checked before the rules between them (INVALID_KEY)",
                    "CheckOrder",
                    replace_all(sample, s, {3: SMALL_ORDER_EDWARDS, 7: True}),
                    "INVALID_KEY",
                ),
            ]
        return [
            version,
            ("identity of small order", "InvalidKey", replace(sample, s, 3, SMALL_ORDER_EDWARDS)),
            ("signed prekey u = p", "InvalidKey", replace(sample, s, 4, spk)),
            ("device id 2^32", "IntegerTooLarge", replace(sample, s, 2, 2**32)),
            ("user id of 65 bytes", "WrongSize", replace(sample, s, 1, "u" * 65)),
            ("empty user id", "WrongSize", replace(sample, s, 1, "")),
            ("user id containing U+0000", "NulUserId", replace(sample, s, 1, "bob\x00evil")),
            *without_kem,
            (
                "empty user id and identity of small order: field 1 is checked before "
                "field 3 (MALFORMED)",
                "CheckOrder",
                replace_all(sample, s, {1: "", 3: SMALL_ORDER_EDWARDS}),
                "MALFORMED",
            ),
            (
                f"version {PROTOCOL_VERSION + 1} and one extra field: the element count is checked "
                "first (MALFORMED)",
                "CheckOrder",
                replace_all(sample, s, {0: PROTOCOL_VERSION + 1}, extra=True),
                "MALFORMED",
            ),
        ]
    if name == "Message":
        fields = unpack(sample, what="test")
        if fields[0] == 1:
            return [
                ("message type 3", "UnknownType", replace(sample, s, 0, 3)),
                ("header of 129 bytes", "WrongSize", replace(sample, s, 1, bytes(129))),
            ]
        return [
            ("identity of small order", "InvalidKey", replace(sample, s, 1, SMALL_ORDER_EDWARDS)),
            ("base key u = p", "InvalidKey", replace(sample, s, 2, NON_CANONICAL_U)),
            (
                "KEM prekey id without ciphertext",
                "Inconsistent",
                replace(sample, s, 6, None) if fields[5] is not None else replace(sample, s, 5, 5),
            ),
            ("signed prekey id 2^32", "IntegerTooLarge", replace(sample, s, 3, 2**32)),
            (
                "identity of small order and signed prekey id 2^32: field 1 is checked before "
                "field 3 (INVALID_KEY)",
                "CheckOrder",
                replace_all(sample, s, {1: SMALL_ORDER_EDWARDS, 3: 2**32}),
                "INVALID_KEY",
            ),
            (
                "base key u = p and a KEM prekey id without ciphertext: field 2 is checked "
                "before the rule between fields 5 and 6 (INVALID_KEY)",
                "CheckOrder",
                replace_all(
                    sample,
                    s,
                    {2: NON_CANONICAL_U, 5: 5, 6: None}
                    if fields[5] is None
                    else {2: NON_CANONICAL_U, 6: None},
                ),
                "INVALID_KEY",
            ),
        ]
    if name == "RatchetHeader":
        return [
            version,
            ("ratchet key u = p", "InvalidKey", replace(sample, s, 1, NON_CANONICAL_U)),
            ("N = 2^32", "IntegerTooLarge", replace(sample, s, 3, 2**32)),
            (
                f"version {PROTOCOL_VERSION + 1} and ratchet key u = p: the version is checked "
                "first (UNKNOWN_VERSION)",
                "CheckOrder",
                replace_all(sample, s, {0: PROTOCOL_VERSION + 1, 1: NON_CANONICAL_U}),
                "UNKNOWN_VERSION",
            ),
            (
                "ratchet key u = p and N = 2^32: field 1 is checked before field 3 (INVALID_KEY)",
                "CheckOrder",
                replace_all(sample, s, {1: NON_CANONICAL_U, 3: 2**32}),
                "INVALID_KEY",
            ),
        ]
    if name == "SignedDeviceList":
        return _device_list_defects(sample)
    if name in ("SenderKeyDistributionMessage", "SenderKeyMessage"):
        # The sender-key structures have their own version (spec 6.1): the next
        # one, and the one before, whose chains were not bound to their sender.
        version = (
            f"version {SENDER_KEY_VERSION + 1}",
            "UnknownVersion",
            replace(sample, s, 0, SENDER_KEY_VERSION + 1),
        )
    if name == "SenderKeyDistributionMessage":
        fields = unpack(sample, what="test")
        unbound = pack([SENDER_KEY_VERSION - 1, fields[1], *fields[4:]])
        return [
            version,
            (
                f"version {SENDER_KEY_VERSION - 1}, six fields (no sender)",
                "UnknownVersion",
                unbound,
            ),
            (
                "signing key of small order",
                "InvalidKey",
                replace(sample, s, 7, SMALL_ORDER_EDWARDS),
            ),
            ("chain id 2^32", "IntegerTooLarge", replace(sample, s, 4, 2**32)),
            ("empty sender user id", "WrongSize", replace(sample, s, 2, "")),
            ("sender user id of 65 bytes", "WrongSize", replace(sample, s, 2, "u" * 65)),
            (
                "sender user id containing U+0000",
                "NulUserId",
                replace(sample, s, 2, "alice\x00evil"),
            ),
            ("sender user id as bin", "WrongType", replace(sample, s, 2, b"alice")),
            ("sender device id 2^32", "IntegerTooLarge", replace(sample, s, 3, 2**32)),
            (
                f"version {SENDER_KEY_VERSION + 1} and one extra field: the version is read "
                "before the element count (UNKNOWN_VERSION)",
                "CheckOrder",
                replace_all(sample, s, {0: SENDER_KEY_VERSION + 1}, extra=True),
                "UNKNOWN_VERSION",
            ),
            (
                "signing key of small order and one extra field: the element count is checked "
                "before the key (MALFORMED)",
                "CheckOrder",
                replace_all(sample, s, {7: SMALL_ORDER_EDWARDS}, extra=True),
                "MALFORMED",
            ),
            (
                "empty sender user id and signing key of small order: the fields are checked "
                "before the key (MALFORMED)",
                "CheckOrder",
                replace_all(sample, s, {2: "", 7: SMALL_ORDER_EDWARDS}),
                "MALFORMED",
            ),
        ]
    if name == "SenderKeyMessage":
        fields, signature = split(sample, True)
        return [
            version,
            (
                f"version {SENDER_KEY_VERSION - 1} (not bound to its sender)",
                "UnknownVersion",
                replace(sample, s, 0, SENDER_KEY_VERSION - 1),
            ),
            (
                "iteration 2^32 - 1 (beyond the last)",
                "IntegerTooLarge",
                replace(sample, s, 3, 2**32 - 1),
            ),
            ("ciphertext of 15 bytes", "BadCiphertextLength", replace(sample, s, 4, bytes(15))),
            ("ciphertext empty", "BadCiphertextLength", replace(sample, s, 4, b"")),
            ("only a signature", "TooShort", signature),
            (
                f"version {SENDER_KEY_VERSION + 1} and one extra field: the version is read "
                "before the element count (UNKNOWN_VERSION)",
                "CheckOrder",
                replace_all(sample, s, {0: SENDER_KEY_VERSION + 1}, extra=True),
                "UNKNOWN_VERSION",
            ),
        ]
    return wire_group.specific_defects(name, sample)


def _device_list_defects(sample: bytes) -> list[Defect]:
    """Body defects, each validly signed so the body decoder is what refuses them."""
    rng = seeded("wire/devices")
    user = IdentityKeyPair(rng.random_bytes(32))
    body = unpack(unpack(sample, what="test")[0], what="test")

    def signed(new_body: list[Any]) -> bytes:
        raw = pack(new_body)
        return pack([raw, user.sign(DEVICE_LIST_SIGNATURE_CONTEXT + raw)])

    def variant(index: int, value: Any) -> bytes:
        changed = list(body)
        changed[index] = value
        return signed(changed)

    devices = body[4]
    return [
        (
            f"body version {PROTOCOL_VERSION + 1}",
            "UnknownVersion",
            variant(0, PROTOCOL_VERSION + 1),
        ),
        ("devices in decreasing id order", "Order", variant(4, list(reversed(devices)))),
        ("the same device id twice", "Order", variant(4, [devices[0], devices[0]])),
        ("no devices", "WrongSize", variant(4, [])),
        ("empty user id", "WrongSize", variant(1, "")),
        ("user id containing U+0000", "NulUserId", variant(1, "dave\x00evil")),
        (
            "device identity of small order",
            "InvalidKey",
            variant(4, [[devices[0][0], SMALL_ORDER_EDWARDS, devices[0][2]]]),
        ),
        ("a device entry without its proof", "MissingField", variant(4, [devices[0][:2]])),
        (
            "a device proof one byte short",
            "WrongSize",
            variant(4, [[*devices[0][:2], devices[0][2][:-1]]]),
        ),
        (
            "the same device key under two ids",
            "DuplicateDeviceKey",
            variant(4, [devices[0], [devices[1][0], *devices[0][1:]]]),
        ),
        (
            f"signature of 63 bytes and body version {PROTOCOL_VERSION + 1}: the outer array, the "
            "signature's size included, is read before the body is decoded (MALFORMED)",
            "CheckOrder",
            pack([pack([PROTOCOL_VERSION + 1, *body[1:]]), bytes(63)]),
            "MALFORMED",
        ),
        (
            f"body version {PROTOCOL_VERSION + 1} and a signature that does not verify: the body "
            "is decoded before the signature is verified (UNKNOWN_VERSION)",
            "CheckOrder",
            _flip_signature(variant(0, PROTOCOL_VERSION + 1)),
            "UNKNOWN_VERSION",
        ),
        (
            "devices in decreasing id order and a signature that does not verify: the body's "
            "rules come before the signature (MALFORMED)",
            "CheckOrder",
            _flip_signature(variant(4, list(reversed(devices)))),
            "MALFORMED",
        ),
        (
            f"body with one extra field and version {PROTOCOL_VERSION + 1}: the body's element "
            "count is checked first (MALFORMED)",
            "CheckOrder",
            signed([PROTOCOL_VERSION + 1, *body[1:], None]),
            "MALFORMED",
        ),
        (
            "empty user id and user identity of small order: field 1 is checked before field 2 "
            "(MALFORMED)",
            "CheckOrder",
            signed([body[0], "", SMALL_ORDER_EDWARDS, *body[3:]]),
            "MALFORMED",
        ),
        (
            "user identity of small order and a counter that is a bool: field 2 is checked "
            "before field 3 (INVALID_KEY)",
            "CheckOrder",
            signed([*body[:2], SMALL_ORDER_EDWARDS, True, body[4]]),
            "INVALID_KEY",
        ),
        (
            "device identity of small order and devices in decreasing id order: every entry "
            "is checked before the order of the entries (INVALID_KEY)",
            "CheckOrder",
            variant(4, [devices[1], [devices[0][0], SMALL_ORDER_EDWARDS, devices[0][2]]]),
            "INVALID_KEY",
        ),
        (
            "the same device key under two ids and a signature that does not verify: the "
            "body's rules come before the signature (DUPLICATE_DEVICE_KEY)",
            "CheckOrder",
            _flip_signature(variant(4, [devices[0], [devices[1][0], *devices[0][1:]]])),
            "DUPLICATE_DEVICE_KEY",
        ),
        (
            "a device proof that does not verify and a list signature that does not verify: "
            "the list signature is checked first (BAD_SIGNATURE)",
            "CheckOrder",
            _flip_signature(variant(4, [devices[0], [*devices[1][:2], devices[0][2]]])),
            "BAD_SIGNATURE",
        ),
        (
            "device 7's proof is device 1's: the proofs are checked after the list signature "
            "(BAD_DEVICE_PROOF)",
            "ForgedProof",
            variant(4, [devices[0], [*devices[1][:2], devices[0][2]]]),
        ),
    ]


def _flip_signature(signed_list: bytes) -> bytes:
    body, signature = unpack(signed_list, what="test")
    return pack([body, signature[:-1] + bytes([signature[-1] ^ 1])])


def _group(name: str, samples: list[tuple[str, bytes]]) -> Json:
    structure = STRUCTURES[name]
    tests = [
        case(comment, flags=("Valid",), input=h(data), decoded=structure.decode(data))
        for comment, data in samples
    ]
    defects = generic_defects(structure, samples[0][1])
    for _, data in samples:
        defects += _specific_defects(name, data)
    seen: set[str] = set()
    for defect in defects:
        comment, flag, data, expected = defect_parts(defect)
        if comment in seen:  # samples of one structure share their specific defects
            continue
        seen.add(comment)
        error = error_of(structure, data)
        if error is None:
            raise AssertionError(f"{name}: {comment}: the decoder accepted it")
        if expected is not None and error != expected:
            raise AssertionError(f"{name}: {comment}: {error}, not {expected}")
        tests.append(case(comment, result="invalid", error=error, flags=(flag,), input=h(data)))
    return {"type": "Decode", "structure": name, "tests": tests}


# ------------------------------------------------------------------ steps 1 to 4 alone


def _value_tests() -> list[Json]:
    """Spec 00 section 0.2 steps 1 to 4 on their own: size, parse, depth, canonicality."""
    depth = MAX_NESTING_DEPTH
    non_canonical_one = b"\xcc\x01"

    def filled(head: bytes, length: int) -> bytes:
        # ``head`` ends with a bin 32 header; the length makes the value span the whole input.
        size = length - len(head) - 5
        return head + b"\xc6" + size.to_bytes(4, "big") + bytes(size)

    cases: list[Defect] = [
        (
            "a nil inside 32 arrays: depth 32, the deepest allowed",
            "AtLimit",
            b"\x91" * depth + b"\xc0",
        ),
        (
            "a nil inside 33 arrays: depth 33",
            "TooDeep",
            b"\x91" * (depth + 1) + b"\xc0",
            "MALFORMED",
        ),
        (
            "a nil at depth 32 beside a non-canonical integer: the depth is allowed, "
            "canonicality decides (NON_CANONICAL)",
            "CheckOrder",
            b"\x92" + b"\x91" * (depth - 1) + b"\xc0" + non_canonical_one,
            "NON_CANONICAL",
        ),
        (
            "a nil at depth 33 beside a non-canonical integer: the depth is checked before "
            "canonicality (MALFORMED)",
            "CheckOrder",
            b"\x92" + b"\x91" * depth + b"\xc0" + non_canonical_one,
            "MALFORMED",
        ),
        (
            "a non-canonical integer followed by a byte: the input is parsed whole before "
            "canonicality is checked (MALFORMED)",
            "CheckOrder",
            non_canonical_one + b"\x00",
            "MALFORMED",
        ),
        (
            f"a byte string of exactly MAX_MESSAGE_SIZE ({MAX_MESSAGE_SIZE}) bytes in all",
            "AtLimit",
            filled(b"", MAX_MESSAGE_SIZE),
        ),
        (
            "a byte string of MAX_MESSAGE_SIZE + 1 bytes in all",
            "TooLarge",
            filled(b"", MAX_MESSAGE_SIZE + 1),
            "MALFORMED",
        ),
        (
            "MAX_MESSAGE_SIZE bytes, an array 16 holding one byte string: the size is allowed, "
            "canonicality decides (NON_CANONICAL)",
            "CheckOrder",
            filled(b"\xdc\x00\x01", MAX_MESSAGE_SIZE),
            "NON_CANONICAL",
        ),
        (
            "MAX_MESSAGE_SIZE + 1 bytes, an array 16 holding one byte string: the size is "
            "checked first (MALFORMED)",
            "CheckOrder",
            filled(b"\xdc\x00\x01", MAX_MESSAGE_SIZE + 1),
            "MALFORMED",
        ),
    ]
    tests = []
    for defect in cases:
        comment, flag, data, expected = defect_parts(defect)
        error = _value_error(data)
        if error != expected:
            raise AssertionError(f"Value: {comment}: {error}")
        # Inputs too large to list are a prefix and a length (vectors/README.md).
        shown: Json | str = h(data)
        if len(data) > 1024:
            shown = large(data[: len(data.rstrip(b"\x00"))], len(data))
        fields: Json = {"input": shown}
        if error is None:
            tests.append(case(comment, flags=(flag,), **fields))
        else:
            tests.append(case(comment, result="invalid", error=error, flags=(flag,), **fields))
    return tests


def _value_error(data: bytes) -> str | None:
    try:
        unpack(data, what="value")
    except ProtocolError as exc:
        return exc.code
    return None


def generate() -> Json:
    skdms, skms = _sender_key_samples()
    rng = seeded("wire/ratchet-message")
    ratchet_message = RatchetMessage(_ratchet_samples()[0][1], rng.random_bytes(48)).encode()
    groups = [
        _group("PreKeyBundle", handshake.sample_bundles()),
        _group(
            "Message",
            [("RatchetMessage", ratchet_message), *handshake.sample_initial_messages()],
        ),
        _group("RatchetHeader", _ratchet_samples()),
        _group("SignedDeviceList", _device_list_samples()),
        _group("SenderKeyDistributionMessage", skdms),
        _group("SenderKeyMessage", skms),
        *(_group(name, samples) for name, samples in wire_group.samples().items()),
        {"type": "Decode", "structure": "Value", "tests": _value_tests()},
    ]
    return vector_file(
        NAME,
        description=(
            "Decoding of every wire structure: valid encodings with their fields, and malformed, "
            "non-canonical, unknown-version and wrongly typed inputs with the error each must give."
        ),
        spec=["00-conventions.md", "06-wire-format.md"],
        notes=NOTES,
        groups=groups,
    )


def verify_test(group: Json, test: Json) -> list[str]:
    c = Checker()
    if group["structure"] == "Value":
        data = unhex_any(test["input"])
        value = c.outcome("decode", test, lambda: unpack(data, what="value"))
        if value is not None:
            c.equal("re-encoded", h(data), h(pack(value)))
        return c.failures
    structure = STRUCTURES.get(group["structure"])
    if structure is None:
        return [f"unknown structure {group['structure']}"]
    data = unhex(test["input"])
    decoded = c.outcome("decode", test, lambda: structure.decode(data))
    if decoded is not None:
        c.equal("decoded", test["decoded"], decoded)
        c.equal("re-encoded", test["input"], h(structure.encode(test["decoded"])))
    return c.failures
