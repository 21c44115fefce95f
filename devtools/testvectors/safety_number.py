"""safety_number.json: fingerprints, the 60-digit safety number, and scannable codes."""

from __future__ import annotations

from hushchat.protocol.consts import FINGERPRINT_ITERATIONS, FINGERPRINT_VERSION
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.fingerprint import SafetyNumber
from hushchat.protocol.keys import IdentityKeyPair

from ._common import Checker, Json, case, h, note, seeded, unhex, vector_file

NAME = "safety_number"

NOTES = {
    "Basic": note("BASIC", "Two users' fingerprints and their common safety number."),
    "NonAscii": note("EDGE_CASE", "A user id with non-ASCII characters (hashed as UTF-8)."),
    "SmallIterations": note("EDGE_CASE", "Fewer iterations, to debug the hash chain."),
    "Match": note("BASIC", "The other side's scannable code matches."),
    "Mismatch": note("AUTH_BYPASS", "The scanned code names another identity key."),
    "Reflection": note(
        "AUTH_BYPASS",
        "Our own code scanned back (local and remote not swapped); it must not match.",
    ),
    "UnknownVersion": note("BASIC", "The scanned code has version 1."),
    "Malformed": note("BASIC", "The scanned code is not a valid encoding."),
}


def _identity(label: str) -> bytes:
    return IdentityKeyPair(seeded("safety_number/" + label).random_bytes(32)).public.ed25519


def _compute(test: Json, iterations: int) -> SafetyNumber:
    return SafetyNumber.compute(
        test["local_id"],
        unhex(test["local_identity"]),
        test["remote_id"],
        unhex(test["remote_identity"]),
        iterations=iterations,
    )


def _compute_case(
    comment: str, local: str, remote: str, iterations: int, flags: tuple[str, ...]
) -> Json:
    test = {
        "local_id": local,
        "local_identity": h(_identity(local)),
        "remote_id": remote,
        "remote_identity": h(_identity(remote)),
    }
    number = _compute(test, iterations)
    return case(
        comment,
        flags=flags,
        **test,
        local_fingerprint=h(number.local_fingerprint),
        remote_fingerprint=h(number.remote_fingerprint),
        safety_number=number.digits,
        grouped=number.grouped(),
        scannable=h(number.scannable()),
    )


def _scan_case(comment: str, scanned: bytes, flags: tuple[str, ...]) -> Json:
    test = {
        "local_id": "alice",
        "local_identity": h(_identity("alice")),
        "remote_id": "bob",
        "remote_identity": h(_identity("bob")),
    }
    try:
        _compute(test, FINGERPRINT_ITERATIONS).verify_scanned(scanned)
        result, error = "valid", None
    except Exception as exc:  # the reference's verdict is what gets recorded
        result, error = "invalid", getattr(exc, "code", type(exc).__name__)
    return case(comment, result=result, error=error, flags=flags, **test, scanned=h(scanned))


def generate() -> Json:
    compute = [
        _compute_case("alice and bob", "alice", "bob", FINGERPRINT_ITERATIONS, ("Basic",)),
        _compute_case("bob and alice", "bob", "alice", FINGERPRINT_ITERATIONS, ("Basic",)),
        _compute_case("non-ASCII id", "zo\u00eb", "bob", FINGERPRINT_ITERATIONS, ("NonAscii",)),
    ]
    short = [_compute_case("one iteration", "alice", "bob", 1, ("SmallIterations",))]
    alice, bob, mallory = _identity("alice"), _identity("bob"), _identity("mallory")
    theirs = SafetyNumber.compute("bob", bob, "alice", alice).scannable()
    ours = SafetyNumber.compute("alice", alice, "bob", bob).scannable()
    forged = SafetyNumber.compute("bob", mallory, "alice", alice).scannable()
    scans = [
        _scan_case("Bob's code, scanned by Alice", theirs, ("Match",)),
        _scan_case("code of a different key for Bob", forged, ("Mismatch",)),
        _scan_case("Alice's own code", ours, ("Reflection",)),
        _scan_case(
            "version 1",
            pack([FINGERPRINT_VERSION + 1, *unpack(theirs, what="test")[1:]]),
            ("UnknownVersion",),
        ),
        _scan_case("last byte missing", theirs[:-1], ("Malformed",)),
        _scan_case("fingerprints of 31 bytes", pack([0, bytes(31), bytes(31)]), ("Malformed",)),
    ]
    groups = [
        {
            "type": "SafetyNumber",
            "iterations": FINGERPRINT_ITERATIONS,
            "version": FINGERPRINT_VERSION,
            "tests": compute,
        },
        {"type": "SafetyNumber", "iterations": 1, "version": FINGERPRINT_VERSION, "tests": short},
        {
            "type": "ScannedCode",
            "iterations": FINGERPRINT_ITERATIONS,
            "version": FINGERPRINT_VERSION,
            "tests": scans,
        },
    ]
    return vector_file(
        NAME,
        description=(
            "Safety numbers: each user's iterated SHA-512 fingerprint, the 60-digit number both "
            "sides display, and the comparison of a scanned code."
        ),
        spec=["13-safety-numbers.md"],
        notes=NOTES,
        groups=groups,
    )


def verify_test(group: Json, test: Json) -> list[str]:
    c = Checker()
    number = _compute(test, group["iterations"])
    if group["type"] == "SafetyNumber":
        c.equal("local_fingerprint", test["local_fingerprint"], h(number.local_fingerprint))
        c.equal("remote_fingerprint", test["remote_fingerprint"], h(number.remote_fingerprint))
        c.equal("safety_number", test["safety_number"], number.digits)
        c.equal("grouped", test["grouped"], number.grouped())
        c.equal("scannable", test["scannable"], h(number.scannable()))
    elif group["type"] == "ScannedCode":
        c.outcome("verify_scanned", test, lambda: number.verify_scanned(unhex(test["scanned"])))
    else:
        c.fail(f"unknown test group type {group['type']}")
    return c.failures
