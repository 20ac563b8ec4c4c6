"""Speak systemd's notify protocol (READY, WATCHDOG, STATUS, STOPPING). Coordinator only.

The protocol is one datagram to $NOTIFY_SOCKET; see sd_notify(3).
"""
from __future__ import annotations

import os
import socket


class SystemdNotifier:
    """Send state to systemd when run as a Type=notify unit; do nothing otherwise."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and (not watchdog_pid or watchdog_pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if enabled else None

    def send(self, *fields: str) -> None:
        if self.address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), self.address)
            except OSError:
                pass
