"""Token-bucket rate limits, sans-I/O: the caller passes the time (seconds, monotonic).

A bucket holds up to ``capacity`` tokens and regains ``per_second`` tokens
per second; a request takes one, and gives it back if it is refused after
all (a refused request changes nothing). As Signal-Server's ``RateLimiters``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from hushchat.protocol.errors import InvalidArgument

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``capacity`` requests at once, regained at ``per_second``."""

    capacity: float
    per_second: float

    def __post_init__(self) -> None:
        if not (self.capacity >= 1 and self.per_second > 0 and math.isfinite(self.capacity)):
            raise InvalidArgument("a rate limit needs capacity >= 1 and a positive rate")


class TokenBucket:
    """One bucket, full when created."""

    __slots__ = ("_limit", "_tokens", "_updated")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self._limit = limit
        self._tokens = limit.capacity
        self._updated = now

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self._limit.capacity, self._tokens + elapsed * self._limit.per_second)
        self._updated = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if granted, else the seconds until one is available."""
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self._limit.per_second

    def give_back(self) -> None:
        """Return a token taken for a request that was then refused or did not need it."""
        self._tokens = min(self._limit.capacity, self._tokens + 1)

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self._tokens >= self._limit.capacity


class KeyedRateLimiter(Generic[K]):
    """One bucket per key, created on first use; full buckets are dropped by :meth:`prune`.

    A dropped bucket was full, so forgetting it changes nothing. When more
    than ``max_keys`` buckets are live, the oldest is evicted (which errs on
    the side of allowing: bounded memory matters more than exactness then).
    """

    __slots__ = ("_buckets", "_limit", "_max_keys")

    def __init__(self, limit: RateLimit, *, max_keys: int) -> None:
        self._limit = limit
        self._max_keys = max_keys
        self._buckets: dict[K, TokenBucket] = {}

    def take(self, key: K, now: float) -> float:
        """Take a token for ``key``: 0.0 if granted, else the seconds to wait."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._buckets.pop(next(iter(self._buckets)))
            bucket = self._buckets[key] = TokenBucket(self._limit, now)
        return bucket.take(now)

    def give_back(self, key: K) -> None:
        """Return the token just taken for ``key`` (nothing if its bucket was dropped)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.give_back()

    def prune(self, now: float) -> None:
        """Forget buckets that have refilled completely."""
        for key in [k for k, b in self._buckets.items() if b.is_full(now)]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class LogThrottle:
    """At most one log line per ``interval`` seconds for a recurring event; the rest counted.

    Sans-I/O like the buckets: the caller passes the time (seconds, monotonic).
    """

    __slots__ = ("_interval", "_next", "_suppressed")

    def __init__(self, interval: float) -> None:
        if not interval > 0:
            raise InvalidArgument("a log interval is positive")
        self._interval = interval
        self._next = -math.inf
        self._suppressed = 0

    def event(self, now: float) -> int | None:
        """Count one event: None to stay quiet, else log a line now.

        The number returned is how many events went unlogged since the last
        line, for that line to say.
        """
        if now < self._next:
            self._suppressed += 1
            return None
        suppressed, self._suppressed = self._suppressed, 0
        self._next = now + self._interval
        return suppressed

    def line_end(self, now: float, more: str) -> str | None:
        """Count one event as :meth:`event` does: None to stay quiet, else how the line
        logged now ends: empty, or e.g. " (3 more refused since the last report)" for
        ``more`` = "more refused"."""
        unlogged = self.event(now)
        if unlogged is None:
            return None
        return f" ({unlogged} {more} since the last report)" if unlogged else ""
