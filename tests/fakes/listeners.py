"""Loopback listeners that misbehave at the TCP level."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

__all__ = ["full_accept_queue"]


@contextlib.contextmanager
def full_accept_queue() -> Iterator[int]:
    """Yields the port of a listener whose accept queue is full: the kernel drops further SYNs, so a
    connect() to it hangs until the caller's connect timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    try:
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", port))
            fillers.append(c)
        yield port
    finally:
        for c in fillers:
            c.close()
        listener.close()
