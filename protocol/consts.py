"""Every protocol constant and limit, each with the reason it has its value.

spec/01-parameters.md restates this table; a test checks the two agree.
Limits that a user may need to change are defaults of constructor or
function parameters elsewhere; the values here are those defaults.
"""

from __future__ import annotations

from typing import Final

# ------------------------------------------------------------------ versions

# Version of every wire structure defined by spec/ but group control messages
# and welcomes (GROUP_VERSION) and the sender-key structures
# (SENDER_KEY_VERSION). A receiver refuses any other value (UNKNOWN_VERSION)
# rather than guessing at a layout. Version 2 (spec revision 3) added each
# device's proof of possession to device lists and bound both parties' users
# into a session's associated data; a version 1 peer's lists and messages are
# refused, not misread.
PROTOCOL_VERSION: Final = 2
# Version of group control messages and welcomes (spec/12-groups.md). 2 since
# a member applies a change only on its current state and never switches to
# another branch (version 1's fork rule let an author who grinds its change
# id rewind the group). A version-1 change is refused (UNKNOWN_VERSION), so
# a member never runs the two rule sets side by side. Group state snapshots
# are at PROTOCOL_VERSION: their layout and hashes did not change with
# GROUP_VERSION 2.
GROUP_VERSION: Final = 2

# Version of the sender-key structures (SenderKeyDistributionMessage and
# SenderKeyMessage, with the GroupText inside), as libsignal versions its
# messages. Until PROTOCOL_VERSION 2 they carried PROTOCOL_VERSION, in a
# layout that did not bind a chain to its sender; 3 since a chain is bound
# to the device that created it (the distribution names that device, every
# message's signature covers it) and every group message carries its
# sender's group state. Versions 1 and 2 are refused, UNKNOWN_VERSION: their
# chains could be forwarded under another sender's name.
SENDER_KEY_VERSION: Final = 3

# Version of serialized state (pickles). Bumped on any layout change; older
# versions are migrated on load, newer ones refused (UNKNOWN_STATE_VERSION).
# State 1 was written under protocol version 1: it holds wire structures
# (device lists, group snapshots) and sessions that version 2 refuses, so it
# is refused as a whole rather than migrated.
STATE_VERSION: Final = 2

# ------------------------------------------------------------------ key encodings
# PQXDH revision 2 requires the encodings of all key types to be disjoint, so
# a curve key can never be parsed as a KEM key. Each encoding is one type
# byte followed by the raw key; the type bytes are distinct.

KEY_TYPE_X25519: Final = 0x05  # as libsignal's DJB type byte
KEY_TYPE_ED25519: Final = 0x06  # hushchat's own assignment
# libsignal uses 0x07 (Kyber768), 0x08 (Kyber1024), 0x0A (ML-KEM-1024) and
# has none for ML-KEM-768; hushchat assigns 0x0B, distinct from all of them.
KEY_TYPE_MLKEM768: Final = 0x0B

X25519_KEY_SIZE: Final = 32
ED25519_KEY_SIZE: Final = 32
ED25519_SIGNATURE_SIZE: Final = 64
MLKEM768_PUBLIC_KEY_SIZE: Final = 1184
MLKEM768_CIPHERTEXT_SIZE: Final = 1088
MLKEM768_SEED_SIZE: Final = 64
MLKEM768_SHARED_SECRET_SIZE: Final = 32

# ------------------------------------------------------------------ info strings
# HKDF "info" labels. Distinct per use so no derived key can serve two roles.
# PQXDH asks for an info of at least 8 bytes naming curve, hash and KEM.

X3DH_INFO: Final = b"hushchat_X25519_SHA-256"
PQXDH_INFO: Final = b"hushchat_X25519_SHA-256_ML-KEM-768"
RATCHET_ROOT_INFO: Final = b"hushchat_ratchet_root"
MESSAGE_KEYS_INFO: Final = b"hushchat_message_keys"
SENDER_KEY_INFO: Final = b"hushchat_sender_key"

# X3DH/PQXDH: F = 32 bytes of 0xFF prepended to the KDF input, so the input
# can never collide with an XEdDSA-style signature input (X3DH section 2.2).
KDF_PREFIX: Final = b"\xff" * 32
SHARED_SECRET_SIZE: Final = 32

# Double Ratchet section 5.2 ENCRYPT: 32-byte AES-256 key, 32-byte HMAC key, 16-byte IV.
MESSAGE_KEY_MATERIAL_SIZE: Final = 80
# HMAC-SHA-256 tag truncated to 16 bytes (128 bits): the spec (section 6.6)
# deems 128 bits fine for CBC+HMAC; libsignal uses 8, we keep the margin.
MAC_SIZE: Final = 16
# Sender keys: libsignal's 48 bytes (IV 16 || key 32).
SENDER_MESSAGE_KEY_MATERIAL_SIZE: Final = 48

# KDF_CK / sender-key chain constants (HMAC inputs), as in the specs.
CHAIN_MESSAGE_KEY_SEED: Final = b"\x01"
CHAIN_NEXT_KEY_SEED: Final = b"\x02"

# ------------------------------------------------------------------ Double Ratchet limits

# Most message keys one incoming message may make us derive and store in a
# single chain (the spec's MAX_SKIP). Bounds the CPU a forged counter costs
# us (each skipped key is one HMAC) while tolerating long offline gaps.
# libsignal allows 25,000; a chat that loses 2,000 messages in a row on one
# chain has a bigger problem than this limit.
MAX_SKIP: Final = 2000

# Most skipped message keys kept per session, across all chains; the oldest
# are evicted first. Bounds memory and the size of a stored session record
# (libsignal: 2,000). Evicted keys make very late messages undecryptable.
MAX_SKIPPED_KEYS: Final = 2000

# Remote ratchet keys of finished receiving chains remembered per session
# (libsignal keeps 5 receiver chains), so a late message on such a chain
# whose key is no longer stored is reported as DUPLICATE_MESSAGE rather than
# being mistaken for a new DH ratchet step.
MAX_PREVIOUS_RATCHET_KEYS: Final = 5

# Previous (archived) sessions kept per peer device beside the current one, so
# that messages in flight across a session reset or a simultaneous initiation
# still decrypt (libsignal keeps 40). Each costs a record's size in storage.
MAX_PREVIOUS_SESSIONS: Final = 10

# An initiator session whose handshake was never answered stops being used
# for sending after this long (libsignal: 30 days): the peer's prekeys it
# used may have been rotated away, so a fresh bundle is needed.
MAX_UNACKNOWLEDGED_SESSION_AGE: Final = 30 * 24 * 3600

# Base keys of handshakes accepted without a one-time prekey, remembered to
# refuse a replayed initial message (X3DH section 4.2). Bounded; cleared for
# a signed prekey when that prekey is deleted.
MAX_REMEMBERED_BASE_KEYS: Final = 1000

# ------------------------------------------------------------------ prekeys

# One-time prekeys generated per batch, and the stock below which the relay
# tells the owner to upload more (XEP-0384 suggests at least 25 of ~100).
PREKEY_BATCH_SIZE: Final = 100
PREKEY_LOW_WATERMARK: Final = 25

# One-time prekeys of each kind an account keeps, the oldest deleted first
# when a new batch would exceed it. A key handed out stays in the account
# until its initial message arrives, and the owner cannot tell a key whose
# initiator never writes from one whose message is on its way, so without a
# bound every key ever taken is kept: a relay that says PREKEYS_LOW again
# and again makes the device keep a batch each time. The relay hands out
# the oldest first and holds at most ten batches, so a key is deleted only
# after ten more batches were taken after it: at the default one-time
# budget (500 a day), two days.
MAX_ONE_TIME_PREKEYS: Final = 20 * PREKEY_BATCH_SIZE

# Signed prekeys are rotated after this age (X3DH section 3.2 suggests a week
# to a month); the previous one is kept this long again for late messages.
SIGNED_PREKEY_ROTATION_AGE: Final = 7 * 24 * 3600
SIGNED_PREKEY_GRACE_PERIOD: Final = 7 * 24 * 3600

# ------------------------------------------------------------------ sender keys

# Largest forward jump in one sender chain (libsignal MAX_FORWARD_JUMPS is
# 25,000). Bounds the HMACs a forged iteration costs a receiver.
MAX_SENDER_KEY_FORWARD_JUMP: Final = 25_000

# Skipped sender message keys kept per sender-key state, oldest evicted
# (libsignal MAX_MESSAGE_KEYS: 2,000).
MAX_SENDER_MESSAGE_KEYS: Final = 2000

# Sender-key states kept per (group, sender device), newest first, so that
# messages sent just before a rotation still decrypt (libsignal: 5).
MAX_SENDER_KEY_STATES: Final = 5

# Sender-key records (one per group and sender device) a device keeps in all.
# A record is accepted only for a held group from a current member's listed
# device, so each group brings at most its members' devices; this bounds the
# total for a device in many groups (spec 9.3): a fresh record holds about
# 150 bytes, and at most MAX_SENDER_KEY_STATES chains of skipped keys. A
# distribution that needs a new record beyond it is refused
# (TOO_MANY_SENDER_KEYS) and nothing is evicted, so no peer can push another
# sender's key out. 10,000 covers, for example, 100 groups of 50 members with
# two devices each.
MAX_SENDER_KEY_RECORDS: Final = 10_000

# Our own sender key is rotated after this age or this many messages, even
# without a membership change, to bound what one leaked chain key exposes.
# Signal-Android rotates after 14 days; Megolm every 100 messages or a week.
SENDER_KEY_MAX_AGE: Final = 7 * 24 * 3600
SENDER_KEY_MAX_MESSAGES: Final = 1000

# Group ids are 16 opaque bytes picked by the group layer (libsignal's
# distribution UUID); every sender-key message names its group so that a
# receiver can route it, and the signature binds it to that group.
GROUP_ID_SIZE: Final = 16

# Highest iteration a sender chain sends at: the chain key after it would be
# at iteration 2^32, which the u32 field cannot carry (libsignal refuses to
# advance a sender chain past u32::MAX too). The sender must rotate first.
MAX_SENDER_KEY_ITERATION: Final = 2**32 - 2

# ------------------------------------------------------------------ groups and devices

# Members of one group (each with its devices). Bounds control messages and
# the fan-out list a relay is asked to deliver.
MAX_GROUP_MEMBERS: Final = 1000
# Devices of one user (Signal allows 6 linked devices).
MAX_DEVICES_PER_USER: Final = 8
# Longest user id, in UTF-8 bytes (at least 1). User ids are opaque names the
# relay routes by; 64 bytes fits a UUID or an e-mail-like handle.
MAX_USER_ID_SIZE: Final = 64
# Prefix of the message a user identity signs over a device list body, so
# that this signature can never be read as any other signed hushchat value.
DEVICE_LIST_SIGNATURE_CONTEXT: Final = b"hushchat_device_list"
# Prefix of the message a device identity signs to say which user it belongs
# to (its proof of possession in a device list: Matrix's self-signed device
# keys). Without it a user could list another user's device key as its own.
DEVICE_PROOF_SIGNATURE_CONTEXT: Final = b"hushchat_device_proof"
# Longest group title, in UTF-8 bytes. Titles travel in every snapshot a
# joiner receives; 256 bytes is ample for a name and bounds that cost.
MAX_GROUP_TITLE_SIZE: Final = 256
# Group states kept behind the current one. Changes apply only on the current
# state; the ancestors let a member tell a sender that is a few changes
# behind (its state is an ancestor) from one on another branch (a split), and
# go into welcomes for the same purpose. Each kept state costs one snapshot
# (about 100 bytes per member) in the stored record.
MAX_GROUP_HISTORY: Final = 16
# Message ids one DeliveryReceipt names: a relay pushes at most 100 envelopes
# before it waits for their acknowledgement (MAX_IN_FLIGHT), so a device
# confirms what one such batch brought from one sender in one receipt.
MAX_RECEIPT_MESSAGE_IDS: Final = 100
# Domain-separation prefixes of group control messages: the author device's
# signature, the change id (hash of the body) and the state hash chain.
GROUP_CONTROL_SIGNATURE_CONTEXT: Final = b"hushchat_group_control"
GROUP_CHANGE_ID_CONTEXT: Final = b"hushchat_group_change"
GROUP_STATE_HASH_CONTEXT: Final = b"hushchat_group_state"
# Bytes of the receipt an author device gets back from the relay with its own
# group change (spec/07 SEND_CHANGE): drawn at random per change so that the
# author tells its current change's receipt from an older one's; 16 bytes
# make a collision between two changes of one device negligible.
CHANGE_RECEIPT_SIZE: Final = 16
# Control messages a device holds because they arrived before the change they
# build on (or before the welcome of their group): a relay may reorder
# envelopes from different senders. They apply once their parent arrives. The
# bound caps what peers can make a device store; the oldest goes first, but
# first of those that no current member of a held group sent for it: anyone
# with a session can send changes for groups we do not hold, and must not
# push a member's change out (the device would stay a change behind).
MAX_HELD_GROUP_CONTROLS: Final = 64
# Groups a device holds at once (ClientCore parameter max_groups). Anyone
# who can open a session with a device can send it a welcome, and each group
# held is a stored record (a snapshot of up to MAX_GROUP_MEMBERS members and
# MAX_GROUP_HISTORY states behind it), so without a bound a sybil fills the
# device's storage one welcome at a time (spec 9.3). A welcome beyond it is
# refused (TOO_MANY_GROUPS) and nothing is evicted; an admin's reinit of a
# held group replaces it and so always fits. 1,000 is far above what people
# take part in (a phone's chat list, with MAX_SENDER_KEY_RECORDS in mind).
MAX_GROUPS: Final = 1000
# Groups a device remembers having left (or been removed from): a GroupSync
# that another of its user's devices sent before it learned of the removal
# must not bring the group back. The oldest is forgotten first.
MAX_LEFT_GROUPS: Final = 64

# ------------------------------------------------------------------ safety numbers

# Iterations of SHA-512 per fingerprint, as Signal (> 112 bits of work for a
# second-preimage search on 30 digits).
FINGERPRINT_ITERATIONS: Final = 5200
FINGERPRINT_VERSION: Final = 0

# ------------------------------------------------------------------ decoding

# Largest message any decoder accepts. Bounds memory spent on one hostile
# input before any check runs; Signal-Server caps a message at 96 KiB, and
# our group messages carry at most a plaintext of MAX_PLAINTEXT_SIZE.
MAX_MESSAGE_SIZE: Final = 256 * 1024
MAX_PLAINTEXT_SIZE: Final = 64 * 1024

# Largest serialized state accepted by a loader (a session record with
# MAX_SKIPPED_KEYS keys and its previous sessions stays well below).
MAX_STATE_SIZE: Final = 16 * 1024 * 1024

# Deepest array nesting any decoder accepts (the outermost value is at depth
# 0). No hushchat structure nests deeper than 6; the bound keeps a hostile
# input of nested arrays from exhausting the decoder's stack.
MAX_NESTING_DEPTH: Final = 32
