"""primitives_kdf.json: KDF_RK, KDF_CK chains, message keys, ENCRYPT/DECRYPT, sender chains."""

from __future__ import annotations

from hushchat.protocol import double_ratchet as dr
from hushchat.protocol import primitives as p
from hushchat.protocol import sender_keys as sk
from hushchat.protocol.consts import (
    CHAIN_MESSAGE_KEY_SEED,
    CHAIN_NEXT_KEY_SEED,
    MAC_SIZE,
    MESSAGE_KEY_MATERIAL_SIZE,
    MESSAGE_KEYS_INFO,
    RATCHET_ROOT_INFO,
    SENDER_KEY_INFO,
    SENDER_MESSAGE_KEY_MATERIAL_SIZE,
)

from ._common import Checker, Json, case, h, note, seeded, unhex, vector_file

NAME = "primitives_kdf"
# Sparse chain positions, as MLS's secret-tree vectors: the first two, a
# small gap, and one as far as the skip limit.
INDICES = (0, 1, 15, 2000)
PLAINTEXT_SIZES = (0, 1, 15, 16, 17, 100)

NOTES = {
    "SparseIndices": note("BASIC", "Chain keys at positions 0, 1, 15 and 2000 of one chain."),
    "EmptyPlaintext": note("EDGE_CASE", "PKCS#7 pads an empty plaintext to one full block."),
    "BlockBoundary": note("EDGE_CASE", "A plaintext of a multiple of 16 bytes gains a block."),
    "ModifiedTag": note("AUTH_BYPASS", "A tag bit is flipped; the MAC check must fail."),
    "ModifiedCiphertext": note("AUTH_BYPASS", "A ciphertext bit is flipped under the old tag."),
    "ModifiedAssociatedData": note("AUTH_BYPASS", "The associated data differs from the sender's."),
    "ShortBody": note("EDGE_CASE", "A body shorter than one block plus the tag is malformed."),
    "BadPadding": note(
        "EDGE_CASE",
        "The tag is valid but the ciphertext does not unpad; only a buggy or hostile sender "
        "can produce it, and it must fail as DECRYPTION_FAILED, not crash.",
    ),
}


def _chain_steps(chain_key: bytes) -> list[Json]:
    steps = []
    for index in range(max(INDICES) + 1):
        message_key, next_key = dr.kdf_ck(chain_key)
        if index in INDICES:
            enc_key, auth_key, iv = dr.message_keys(message_key)
            steps.append(
                {
                    "index": index,
                    "chain_key": h(chain_key),
                    "message_key": h(message_key),
                    "encryption_key": h(enc_key),
                    "authentication_key": h(auth_key),
                    "iv": h(iv),
                }
            )
        chain_key = next_key
    return steps


def _sender_steps(chain_key: bytes) -> list[Json]:
    steps = []
    for index in range(max(INDICES) + 1):
        if index in INDICES:
            seed = sk.message_seed(chain_key)
            iv, key = sk.message_key(seed)
            steps.append(
                {
                    "index": index,
                    "chain_key": h(chain_key),
                    "seed": h(seed),
                    "iv": h(iv),
                    "cipher_key": h(key),
                }
            )
        chain_key = sk.next_chain_key(chain_key)
    return steps


def _seal_cases() -> list[Json]:
    rng = seeded("kdf/seal")
    tests = []
    for size in PLAINTEXT_SIZES:
        message_key = rng.random_bytes(32)
        associated = rng.random_bytes(66) + rng.random_bytes(40)
        plaintext = rng.random_bytes(size)
        flags: tuple[str, ...] = ()
        if size == 0:
            flags = ("EmptyPlaintext",)
        elif size % 16 == 0:
            flags = ("BlockBoundary",)
        tests.append(
            case(
                f"{size}-byte plaintext",
                flags=flags,
                message_key=h(message_key),
                associated_data=h(associated),
                plaintext=h(plaintext),
                body=h(dr.seal(message_key, plaintext, associated)),
            )
        )
    message_key = rng.random_bytes(32)
    associated = rng.random_bytes(80)
    plaintext = b"attack at dawn"
    body = dr.seal(message_key, plaintext, associated)

    def bad(comment: str, flag: str, error: str, body: bytes, ad: bytes = associated) -> Json:
        return case(
            comment,
            result="invalid",
            error=error,
            flags=(flag,),
            message_key=h(message_key),
            associated_data=h(ad),
            plaintext=None,
            body=h(body),
        )

    enc_key, auth_key, iv = dr.message_keys(message_key)
    unpaddable = p.aes256_cbc_encrypt(enc_key, iv, b"x" * 15)[:-16] + bytes(16)
    badly_padded = unpaddable + p.hmac_sha256(auth_key, associated + unpaddable)[:MAC_SIZE]
    return [
        *tests,
        bad("last tag bit flipped", "ModifiedTag", "BAD_MAC", body[:-1] + bytes([body[-1] ^ 1])),
        bad(
            "first ciphertext bit flipped",
            "ModifiedCiphertext",
            "BAD_MAC",
            bytes([body[0] ^ 1]) + body[1:],
        ),
        bad(
            "associated data differs in its last byte",
            "ModifiedAssociatedData",
            "BAD_MAC",
            body,
            associated[:-1] + bytes([associated[-1] ^ 1]),
        ),
        bad("body of 31 bytes", "ShortBody", "MALFORMED", body[:31]),
        bad("tag valid, padding not", "BadPadding", "DECRYPTION_FAILED", badly_padded),
    ]


def generate() -> Json:
    rng = seeded("kdf")
    kdf_rk_tests = []
    for comment in ("root key and DH output", "another root key and DH output"):
        root_key, dh_output = rng.random_bytes(32), rng.random_bytes(32)
        new_root, chain = dr.kdf_rk(root_key, dh_output)
        kdf_rk_tests.append(
            case(
                comment,
                root_key=h(root_key),
                dh_output=h(dh_output),
                new_root_key=h(new_root),
                chain_key=h(chain),
            )
        )
    chain_tests = [
        case(
            "one receiving chain",
            flags=("SparseIndices",),
            steps=_chain_steps(rng.random_bytes(32)),
        )
    ]
    sender_tests = [
        case(
            "one sender chain", flags=("SparseIndices",), steps=_sender_steps(rng.random_bytes(32))
        )
    ]
    groups = [
        {
            "type": "KdfRk",
            "hash": "SHA-256",
            "info": h(RATCHET_ROOT_INFO),
            "outputLength": 64,
            "tests": kdf_rk_tests,
        },
        {
            "type": "KdfCkChain",
            "hash": "SHA-256",
            "messageKeyInput": h(CHAIN_MESSAGE_KEY_SEED),
            "chainKeyInput": h(CHAIN_NEXT_KEY_SEED),
            "messageKeysInfo": h(MESSAGE_KEYS_INFO),
            "messageKeysLength": MESSAGE_KEY_MATERIAL_SIZE,
            "tests": chain_tests,
        },
        {
            "type": "MessageEncryption",
            "messageKeysInfo": h(MESSAGE_KEYS_INFO),
            "macSize": MAC_SIZE,
            "tests": _seal_cases(),
        },
        {
            "type": "SenderKeyChain",
            "hash": "SHA-256",
            "messageKeyInput": h(CHAIN_MESSAGE_KEY_SEED),
            "chainKeyInput": h(CHAIN_NEXT_KEY_SEED),
            "senderKeyInfo": h(SENDER_KEY_INFO),
            "senderKeyLength": SENDER_MESSAGE_KEY_MATERIAL_SIZE,
            "tests": sender_tests,
        },
    ]
    return vector_file(
        NAME,
        description=(
            "Known answers for the Double Ratchet KDFs (KDF_RK, KDF_CK, message-key "
            "expansion), its ENCRYPT/DECRYPT with 16-byte tags, and the sender-key chain."
        ),
        spec=["03-double-ratchet.md", "04-sender-keys.md"],
        notes=NOTES,
        groups=groups,
    )


def verify_test(group: Json, test: Json) -> list[str]:
    c = Checker()
    kind = group["type"]
    if kind == "KdfRk":
        root, chain = dr.kdf_rk(unhex(test["root_key"]), unhex(test["dh_output"]))
        c.equal("new_root_key", test["new_root_key"], h(root))
        c.equal("chain_key", test["chain_key"], h(chain))
    elif kind == "KdfCkChain":
        c.equal("steps", test["steps"], _chain_steps(unhex(test["steps"][0]["chain_key"])))
    elif kind == "SenderKeyChain":
        c.equal("steps", test["steps"], _sender_steps(unhex(test["steps"][0]["chain_key"])))
    elif kind == "MessageEncryption":
        key, ad, body = (
            unhex(test["message_key"]),
            unhex(test["associated_data"]),
            unhex(test["body"]),
        )
        if test["result"] == "valid":
            c.equal("body", test["body"], h(dr.seal(key, unhex(test["plaintext"]), ad)))
        opened = c.outcome("open", test, lambda: dr.open_sealed(key, body, ad))
        if opened is not None:
            c.equal("plaintext", test["plaintext"], h(opened))
    else:
        c.fail(f"unknown test group type {kind}")
    return c.failures
