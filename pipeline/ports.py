"""TCP ports on 127.0.0.1 for the local servers the project starts: a free one for the
teacher's vLLM OpenAI server (pipeline/engines.py), and in tests and benchmarks
Argilla, Redis and torchrun's rendezvous; whether a fixed one (Argilla's, review
serve) is free."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now: the OS picks it from a socket bound to port 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing answers on `port` now."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0
