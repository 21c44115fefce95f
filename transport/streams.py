"""Writing frames to a trio stream without waiting, for both ends of a relay connection.

Most frames fit the socket's send buffer at once. Written directly with one
syscall they cost the syscall only; trio's ``send_all`` adds a lock, a
conflict check and a checkpoint through the scheduler, several times the
syscall's cost (measured on the relay's pushes and on the client's requests).
A caller writes what the socket takes at once and hands any rest to
``send_all`` under its write lock, taken before anything else can run, so
two writers never interleave their bytes.
"""

from __future__ import annotations

import os

import trio


def direct_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket of a plain TCP stream, which :func:`write_at_once` may write; None for
    other streams (TLS, or in-memory ones in tests), which go through ``send_all``."""
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def write_at_once(sock: trio.socket.SocketType, data: bytes) -> int:
    """Write as much of ``data`` as ``sock`` takes now, with one syscall: the bytes written.

    0 if the send buffer is full, and also if the socket is closed or broken:
    ``send_all`` then waits for room, or raises the error as trio reports it.
    The descriptor is read at each call, never kept: once the socket is
    closed its number may belong to another file.
    """
    fd = sock.fileno()
    if fd < 0:
        return 0
    try:
        return os.write(fd, data)
    except OSError:  # BlockingIOError: full; any other: send_all reports it
        return 0
