"""A free TCP port on 127.0.0.1 for a local server the project starts: the teacher's
vLLM OpenAI server (pipeline/engines.py), and in tests and benchmarks Argilla, Redis
and torchrun's rendezvous."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now: the OS picks it from a socket bound to port 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
