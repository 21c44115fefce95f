"""Relay configuration: where it listens and stores, how long it keeps mail, its limits."""

from __future__ import annotations

import enum
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hushchat.protocol.errors import InvalidArgument

from ..wire import limits as L
from ..wire.frames import MAX_RELAY_NAME_SIZE, RequestLimits
from .ratelimit import RateLimit

# Listen addresses that name no host: every interface. Clients dial the relay by
# some other name, which only its operator knows.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


class Registration(enum.Enum):
    """Who may register a new user (publish the first device list of a user id)."""

    OPEN = "open"  # anyone: user ids are first come, first served
    INVITE = "invite"  # only with an invitation token the operator issued (single use)
    CLOSED = "closed"  # no one: the relay serves the users it has


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch: envelope timestamps and retention."""
    return time.time_ns() // 1_000_000


_DURATION = re.compile(r"([0-9]+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in a duration such as ``"72h"``, ``"3d"``, ``"90m"`` or ``"3600s"``.

    A positive integer and one unit (s, m, h, d); InvalidArgument otherwise.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise InvalidArgument(f"duration {text!r}: expected a number and a unit s, m, h or d")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise InvalidArgument(f"duration {text!r} must be positive")
    return seconds


def parse_rate(text: str) -> RateLimit:
    """A rate such as ``"20/1h"``: 20 at once, regained at 20 per hour (InvalidArgument if not)."""
    count, _, period = text.strip().partition("/")
    if not count.isdigit() or int(count) < 1:
        raise InvalidArgument(f"rate {text!r}: expected a count of at least 1, '/', a duration")
    return RateLimit(int(count), int(count) / parse_duration(period))


BUNDLE_FETCH_RATE = RateLimit(L.BUNDLE_FETCH_CAPACITY, L.BUNDLE_FETCH_PER_SECOND)
ONE_TIME_PREKEY_BUDGET = RateLimit(L.TARGET_ONE_TIME_CAPACITY, L.TARGET_ONE_TIME_PER_SECOND)
SEND_RATE = RateLimit(L.SEND_CAPACITY, L.SEND_PER_SECOND)
FRAME_RATE = RateLimit(L.FRAME_CAPACITY, L.FRAME_PER_SECOND)


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """Every limit, rate and timeout of a relay; the reasons are in wire.limits."""

    max_frame_size: int = L.MAX_FRAME_SIZE
    max_unauthenticated_frame_size: int = L.MAX_UNAUTHENTICATED_FRAME_SIZE
    max_payload_size: int = L.MAX_PAYLOAD_SIZE
    max_recipients: int = L.MAX_RECIPIENTS_PER_SEND
    max_prekeys_per_upload: int = L.MAX_PREKEYS_PER_UPLOAD
    max_stored_prekeys: int = L.MAX_STORED_PREKEYS
    prekey_low_threshold: int = L.PREKEY_LOW_THRESHOLD
    max_mailbox_size: int = L.MAX_MAILBOX_SIZE
    max_in_flight: int = L.MAX_IN_FLIGHT
    bundle_fetch_rate: RateLimit = BUNDLE_FETCH_RATE
    one_time_prekey_budget: RateLimit = ONE_TIME_PREKEY_BUDGET
    send_rate: RateLimit = SEND_RATE
    frame_rate: RateLimit = FRAME_RATE
    max_rate_limit_keys: int = L.MAX_RATE_LIMIT_KEYS
    auth_timeout: float = L.AUTH_TIMEOUT
    idle_timeout: float = L.IDLE_TIMEOUT
    frame_timeout: float = L.FRAME_TIMEOUT
    send_timeout: float = L.SEND_TIMEOUT
    close_timeout: float = L.CLOSE_TIMEOUT
    # Seconds between retention sweeps; None: at every epoch boundary, when
    # an epoch leaves the retention window (EPOCHS_PER_RETENTION).
    sweep_interval: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_in_flight <= L.MAX_IN_FLIGHT:
            # The protocol's bound: a client sizes its buffer and its ACKs by it.
            raise InvalidArgument(f"max_in_flight must be 1 to {L.MAX_IN_FLIGHT}")
        if self.max_payload_size > self.max_frame_size:
            raise InvalidArgument("max_payload_size cannot exceed max_frame_size")
        if self.sweep_interval is not None and not self.sweep_interval > 0:
            raise InvalidArgument("sweep_interval must be positive")

    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_frame_size=self.max_frame_size,
            max_payload_size=self.max_payload_size,
            max_recipients=self.max_recipients,
            max_prekeys_per_upload=self.max_prekeys_per_upload,
        )


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """How to run a relay.

    ``db_path`` is the SQLite file (``":memory:"`` for a throwaway relay).
    ``key_file`` holds the keys of the queued mail (spec 07 section 7.13):
    None is ``db_path`` + ``".keys"`` (an in-memory relay keeps them in
    memory); ``reset_keys`` starts a relay whose key file is lost, discarding
    the mail sealed under it (its recipients are told).
    ``registration`` says who may register new users: anyone (``OPEN``), the
    holders of invitation tokens issued with ``hushchat relay invite``
    (``INVITE``), or no one (``CLOSED``).
    ``name`` is announced in WELCOME and signed by authenticating devices,
    who refuse a relay that does not call itself by the name they dial
    (spec 7.4): set it to the public host name clients dial. Left empty it
    is ``host``, which is right for a relay dialled by the address it listens
    on; a relay listening on every address (``0.0.0.0``, ``::``) has no such
    default and needs a name. ``clock`` returns milliseconds since the epoch
    (injectable for retention tests).
    """

    host: str = "127.0.0.1"
    port: int = 0
    db_path: str = "hushchat-relay.db"
    key_file: str | None = None
    reset_keys: bool = False
    retention_seconds: int = L.DEFAULT_RETENTION_SECONDS
    name: str = ""
    ssl_context: ssl.SSLContext | None = None
    registration: Registration = Registration.OPEN
    clock: Callable[[], int] = wall_clock_ms
    limits: RelayLimits = field(default_factory=RelayLimits)

    def __post_init__(self) -> None:
        if self.retention_seconds <= 0:
            raise InvalidArgument("retention must be positive")
        if not self.name:
            if self.host in WILDCARD_HOSTS:
                raise InvalidArgument(
                    f"a relay listening on {self.host or 'every address'} needs a name: "
                    "the host name its clients dial"
                )
            object.__setattr__(self, "name", self.host)
        if len(self.name.encode()) > MAX_RELAY_NAME_SIZE:
            raise InvalidArgument(f"a relay name is 1 to {MAX_RELAY_NAME_SIZE} bytes of UTF-8")
