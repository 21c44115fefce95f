"""Length-prefixed framing, sans-I/O: bytes in, frame bodies out.

A frame on the wire is a 4-byte big-endian body length, then the body (a
canonical msgpack array, see :mod:`hushchat.transport.wire.frames`). :class:`FrameDecoder`
is fed whatever the socket returned and hands out complete bodies, as h11's
connection object does for HTTP; it never touches a socket or a clock, so
both the relay and the client drive it with their own I/O and timeouts.

The maximum body size is a constructor parameter: a length prefix above it
raises :class:`~hushchat.transport.wire.errors.FrameTooLarge` as soon as the 4 bytes are
in, before any of the body is buffered.
"""

from __future__ import annotations

from hushchat.protocol.errors import InvalidArgument

from .errors import FrameTooLarge
from .limits import MAX_FRAME_SIZE

FRAME_HEADER_SIZE = 4


def encode_frame(body: bytes, *, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """The frame carrying ``body``; InvalidArgument if it exceeds ``max_frame_size``."""
    if len(body) > max_frame_size:
        raise InvalidArgument(f"frame body of {len(body)} bytes exceeds {max_frame_size}")
    return len(body).to_bytes(FRAME_HEADER_SIZE, "big") + body


class FrameDecoder:
    """Splits a byte stream into frame bodies.

    Call :meth:`receive_data` with each chunk read, then :meth:`next_frame`
    until it returns None (more data needed). After FrameTooLarge the stream
    cannot be resynchronised; the caller closes the connection.
    """

    __slots__ = ("_buffer", "_expected", "max_frame_size")

    def __init__(self, *, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if max_frame_size < 1 or max_frame_size >= 2 ** (8 * FRAME_HEADER_SIZE):
            raise InvalidArgument("max_frame_size must fit the 4-byte length prefix")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._expected: int | None = None  # body length of the frame being read

    def receive_data(self, data: bytes | bytearray) -> None:
        """Append bytes read from the stream."""
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete frame body, or None if more bytes are needed."""
        if self._expected is None:
            if len(self._buffer) < FRAME_HEADER_SIZE:
                return None
            length = int.from_bytes(self._buffer[:FRAME_HEADER_SIZE], "big")
            if length > self.max_frame_size:
                raise FrameTooLarge(f"frame of {length} bytes exceeds {self.max_frame_size}")
            del self._buffer[:FRAME_HEADER_SIZE]
            self._expected = length
        if len(self._buffer) < self._expected:
            return None
        body = bytes(self._buffer[: self._expected])
        del self._buffer[: self._expected]
        self._expected = None
        return body

    @property
    def in_frame(self) -> bool:
        """True while part of a frame (header or body) has arrived but not all of it."""
        return self._expected is not None or bool(self._buffer)

    def __repr__(self) -> str:
        return f"FrameDecoder(buffered={len(self._buffer)}, expected={self._expected})"
