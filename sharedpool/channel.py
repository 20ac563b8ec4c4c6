"""Address and send the small datagrams that wake a coordinator or a worker.

Runs in any process. Abstract unix sockets (Linux) leave no file behind and
vanish with their owner, so a dead worker or coordinator never leaves litter.
"""
from __future__ import annotations

import socket


def coordinator_address(name: str) -> bytes:
    return f"\0sharedpool/{name}/coordinator".encode()


def worker_address(name: str, pid: int) -> bytes:
    return f"\0sharedpool/{name}/worker/{pid}".encode()


def send(address: bytes, message: bytes) -> bool:
    """Send one datagram without blocking; tell whether someone was listening."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.sendto(message, address)
        except (ConnectionRefusedError, FileNotFoundError, BlockingIOError):
            return False
    return True


def bind(address: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    return sock
