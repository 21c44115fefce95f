"""Every limit and default of the relay protocol, each with the reason for its value.

spec/07-relay-protocol.md restates this table. These are the defaults of
:class:`hushchat.transport.relay.config.RelayLimits` (relay side) and of the keyword
parameters of :func:`hushchat.transport.client.connection.connect_relay` (client side); an
operator or an application changes them there, not here.
"""

from __future__ import annotations

from typing import Final

from hushchat.protocol.consts import (
    MAX_DEVICES_PER_USER,
    MAX_GROUP_MEMBERS,
    MAX_MESSAGE_SIZE,
    PREKEY_BATCH_SIZE,
    PREKEY_LOW_WATERMARK,
)

# ------------------------------------------------------------------ versions

# Version of the relay protocol (frames, handshake, error codes), negotiated
# by HELLO. Separate from hushchat.protocol.consts.PROTOCOL_VERSION: the relay carries
# protocol messages as opaque bytes, so either can change without the other.
# 4 adds SEND_CHANGE and its RECEIPT envelopes (one place in the relay's
# order for a group change, spec/12-groups.md section 12.4); 5 an invitation
# token in PUBLISH_DEVICE_LIST (registration by invitation), and it carries
# device lists of protocol version 2 (device proofs); 6 stores a send for
# every named device with room, ACCEPTED naming the full mailboxes, and a
# resend may name some of a user's devices.
RELAY_PROTOCOL_VERSION: Final = 6

# ------------------------------------------------------------------ sizes

# Largest payload (one ciphertext) in a send. The relay must carry every
# message the protocol core may produce, and no decoder there accepts more
# than MAX_MESSAGE_SIZE (256 KiB, Signal-Server's multi-recipient limit).
MAX_PAYLOAD_SIZE: Final = MAX_MESSAGE_SIZE

# Most recipient devices named in one send. A direct send covers one user's
# devices; a group send may cover a whole maximal group in one upload, so
# that its payload is stored once (8,000 pairs of at most ~75 bytes each).
MAX_RECIPIENTS_PER_SEND: Final = MAX_GROUP_MEMBERS * MAX_DEVICES_PER_USER

# Room for everything in a frame that is not payload: frame type, request
# id, user ids, device ids, msgpack headers (a direct send to 8 devices needs
# under 200 bytes of it; a group send's recipient list is counted separately).
FRAME_OVERHEAD: Final = 64 * 1024

# Largest frame body either side accepts; the 4-byte length prefix of a
# longer frame is refused before its body is read (FRAME_TOO_LARGE). It
# bounds the memory one connection can make a peer buffer. The largest
# legitimate frame is a direct send with MAX_PAYLOAD_SIZE to each of
# MAX_DEVICES_PER_USER devices (2 MiB); a full group send (payload plus
# 8,000 recipients, ~830 KB) and a full prekey upload (~260 KB) are smaller.
MAX_FRAME_SIZE: Final = MAX_DEVICES_PER_USER * MAX_PAYLOAD_SIZE + FRAME_OVERHEAD

# Largest frame body the relay accepts before a connection has authenticated.
# Nothing an unauthenticated peer may send (HELLO, AUTH, PING, a new user's
# signed device list: under 1 KB with 8 devices) comes near it, and it keeps
# what an anonymous connection can make the relay buffer to 64 KiB instead of
# MAX_FRAME_SIZE (2 MiB, for up to FRAME_TIMEOUT, on every such connection).
MAX_UNAUTHENTICATED_FRAME_SIZE: Final = 64 * 1024

# Bytes asked of the socket per receive: a few TCP segments; large frames
# arrive in several reads, small ones in one.
RECEIVE_CHUNK_SIZE: Final = 64 * 1024

# ------------------------------------------------------------------ mailboxes

# Envelopes queued per device. A full mailbox takes no more envelopes rather
# than dropping old mail silently; the send is stored for the other devices it
# names, and the sender learns which devices to retry (ACCEPTED's list, or
# MAILBOX_FULL when none had room). 10,000 is days of traffic of a busy user,
# and bounds the disk a hostile sender can fill per device.
MAX_MAILBOX_SIZE: Final = 10_000

# Envelopes pushed to a connection and not yet acknowledged. The relay stops
# pushing at this many until acknowledgements arrive, so a slow reader holds
# back its own mail only (Matrix delivers at most 100 to-device events per
# sync, synapse #11457). A relay may configure less, never more. It also
# bounds the guids of one ACK (the decoder's max_ack_guids): a client
# acknowledges what it was pushed, so more is a malformed frame.
MAX_IN_FLIGHT: Final = 100

# Envelopes read from storage per query when filling the in-flight window.
DELIVERY_BATCH_SIZE: Final = 50

# Default retention of an envelope: deleted this long after the relay
# accepted it, acknowledged or not (3 days, the reference relay design;
# Signal-Server keeps 30 days). Clients cover the loss with retries.
DEFAULT_RETENTION_SECONDS: Final = 72 * 3600

# Epochs the retention window is cut into. Queued mail is sealed at rest under
# keys that change every epoch and cease to exist once the epoch has left the
# window (spec 7.13), so an envelope's ciphertext outlives its expiry by at
# most one epoch (1/72 of the retention: one hour at the default 72 h), a
# leftover row's time is known to within an epoch, and finding a device's
# mail costs one mailbox index per epoch in the window (73: computed once per
# connection, a few tens of microseconds). The relay purges at every epoch
# boundary: that is when keys cease to exist.
EPOCHS_PER_RETENTION: Final = 72

# ------------------------------------------------------------------ prekeys

# One-time prekeys (of each kind) in one upload: two batches, so a device
# can top up from the low watermark in one request.
MAX_PREKEYS_PER_UPLOAD: Final = 2 * PREKEY_BATCH_SIZE

# One-time prekeys (of each kind) stored per device. Bounds the storage one
# device can claim; ten batches is far more than any refill policy needs.
MAX_STORED_PREKEYS: Final = 10 * PREKEY_BATCH_SIZE

# Stock of one-time prekeys (either kind) below which the owner is told
# (PREKEYS_LOW); the protocol core's refill threshold.
PREKEY_LOW_THRESHOLD: Final = PREKEY_LOW_WATERMARK

# ------------------------------------------------------------------ registration

# Random bytes in an invitation token (printed as 32 hex digits, which no
# command line reads as an option): 128 bits, so the relay stores only a
# SHA-256 of it, and guessing one is out of reach however many registrations
# are tried.
INVITE_TOKEN_BYTES: Final = 16

# Longest invitation token a PUBLISH_DEVICE_LIST may carry, in UTF-8 bytes:
# room for the relay's own tokens and for an operator's longer ones.
MAX_INVITE_SIZE: Final = 64

# How long an invitation is good for unless the operator says otherwise
# (hushchat relay invite --valid-for): long enough to be passed on by hand,
# short enough that a forgotten one does not stay open for good.
DEFAULT_INVITE_LIFETIME_SECONDS: Final = 7 * 24 * 3600

# ------------------------------------------------------------------ rate limits
# Token buckets: `capacity` requests at once, regained at `per_second`.

# Bundle fetches per (requester device, target device): Signal-Server's
# PRE_KEYS limiter, 6 at once, regained at one per 10 minutes. Each fetch
# burns a one-time prekey, so this bounds how fast one device can drain
# another's stock; it does not bound many devices (a sybil army).
BUNDLE_FETCH_CAPACITY: Final = 6.0
BUNDLE_FETCH_PER_SECOND: Final = 1 / 600

# One-time prekeys (a pair: one X25519 and one ML-KEM) handed out per target
# device, whoever fetches: 20 at once, regained at 20 an hour. This is what
# bounds a sybil army (any number of registered devices) to 20 + 20 per hour,
# 500 a day, per device; a fetch beyond it still gets a bundle, without
# one-time keys (the signed prekey and the last-resort KEM prekey), as after
# the stock ran out, so nobody is refused a session. 20 an hour is far more
# new sessions than a person's device starts with others; a device joining
# a large group is asked for more at once, and the initiators beyond the
# first 20 use the last-resort keys. The owner refills from the low
# watermark (25, PREKEYS_LOW) with a batch of 100, so the stock outlasts
# this rate while the owner connects. The budget is kept in the relay's
# database, so the relay processes sharing one spend one budget, not one each.
TARGET_ONE_TIME_CAPACITY: Final = 20.0
TARGET_ONE_TIME_PER_SECOND: Final = 20 / 3600

# Send requests per connection: Signal-Server's MESSAGES limiter, 60/s.
SEND_CAPACITY: Final = 60.0
SEND_PER_SECOND: Final = 60.0

# Frames read per connection, of any kind, valid or not. A client needs one
# request per envelope it acknowledges plus its sends (SEND_PER_SECOND), so
# this also caps one device's delivery rate near 500 envelopes a second
# (acknowledgements are answered before their deletion commits). Above the rate the
# relay stops reading the connection until it is back under it: no reply, so
# a flood of cheap frames (malformed, pings) costs no CPU and cannot hold
# the event loop, and with it every other connection's storage work.
FRAME_CAPACITY: Final = 1000.0
FRAME_PER_SECOND: Final = 500.0

# Rate-limit buckets kept in memory before full (idle) ones are dropped;
# bounds the limiter's memory whatever the number of device pairs.
MAX_RATE_LIMIT_KEYS: Final = 100_000

# A warning that recurs (refused logins, a full disk) is logged at most once
# per this many seconds, saying how many were not logged since: an operator
# sees each problem within a minute, and a client retrying in a loop (four
# clients refused 430 times a minute) cannot flood the log.
WARNING_LOG_INTERVAL: Final = 60.0

# ------------------------------------------------------------------ relay clusters (PostgreSQL)

# Bytes of one NOTIFY payload at most: PostgreSQL refuses 8000 and more. A
# send to more devices on one other relay than fit wakes it with several.
NOTIFY_PAYLOAD_LIMIT: Final = 7900

# Seconds the thread listening for a relay's notifications waits for one
# before it checks whether the relay is stopping: how long a stop waits for it.
NOTIFY_POLL_INTERVAL: Final = 0.2

# Seconds between attempts to reconnect the listening connection after the
# database went away: a restarting database is not hammered, and a relay
# is woken again within this long of its return.
POSTGRES_RECONNECT_INTERVAL: Final = 1.0

# ------------------------------------------------------------------ timeouts (seconds)

# From TCP accept to a successful AUTH (HELLO and registration included).
# An unauthenticated connection costs a socket and a buffer; it gets a short
# time only.
AUTH_TIMEOUT: Final = 30.0

# No complete frame from an authenticated client for this long closes the
# connection (IDLE_TIMEOUT). Clients ping well within it (CLIENT_KEEPALIVE).
IDLE_TIMEOUT: Final = 300.0

# A frame whose first byte arrived must be complete within this long
# (FRAME_TIMEOUT): stops a peer holding a buffer open a byte at a time.
FRAME_TIMEOUT: Final = 30.0

# Writing one frame to a peer must finish within this long, else the peer is
# not reading and the connection is closed (it must not hold a writer lock,
# and with it every other push to that connection, forever).
SEND_TIMEOUT: Final = 30.0

# Time to send a final error frame before closing a connection anyway.
CLOSE_TIMEOUT: Final = 2.0

# ------------------------------------------------------------------ client defaults

# TCP connect, TLS handshake and HELLO together.
CLIENT_CONNECT_TIMEOUT: Final = 10.0
# From sending a request to its reply (the relay commits sends to disk first).
CLIENT_REQUEST_TIMEOUT: Final = 30.0
# Interval between client pings; well under IDLE_TIMEOUT.
CLIENT_KEEPALIVE: Final = 60.0
# Incoming envelopes and notices buffered by a connection before its reader
# stops reading (backpressure). Above MAX_IN_FLIGHT plus the few notices, so
# a client that acknowledges what it has processed never stalls its reader.
CLIENT_INCOMING_QUEUE_SIZE: Final = MAX_IN_FLIGHT + 16
