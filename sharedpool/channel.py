"""Send and receive the small datagrams that wake a coordinator or a worker of one pool.

Any process. The sockets are files in the pool's directory (names.py), so
only the pool's owner (and its GROUP) can reach them at all, whatever PID or
network namespace either side runs in; a receiver still acts only on
datagrams whose sender the kernel vouches for (``SCM_CREDENTIALS``): root,
the pool's owner, or a member of GROUP. Bad datagrams cost one recvmsg each
and are logged at most once per interval, with a count.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pwd
import socket
import struct
import time

from .names import PoolNames, group_id, modes

log = logging.getLogger("sharedpool")

UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid of a datagram's sender
MAX_MESSAGE = 256
DROP_LOG_EVERY = 10.0  # seconds between two log lines about dropped datagrams


def send(names: PoolNames, entry: str, message: bytes, wait: float = 0.0) -> bool:
    """Send one datagram; tell whether someone was listening and took it.

    With ``wait`` 0 it never blocks; otherwise it waits up to ``wait``
    seconds for room in a full queue (a command asking the coordinator
    while someone floods it).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        if wait > 0:
            sock.settimeout(wait)
        else:
            sock.setblocking(False)
        try:
            sock.sendto(message, names.path(entry))
        except (ConnectionRefusedError, FileNotFoundError, BlockingIOError, PermissionError, NotADirectoryError,
                TimeoutError):
            return False
    return True


class Inbox:
    """A bound datagram socket that hands over only trusted senders' messages."""

    def __init__(self, names: PoolNames, entry: str, group: str | None, owner_uid: int) -> None:
        self.names = names
        self.path = names.path(entry)
        self.trusted_uids = {0, owner_uid, os.geteuid()}
        self.trusted_gid = group_id(group) if group else None
        self._members: dict[int, bool] = {}  # uid -> member of GROUP (primary or supplementary)
        self.dropped = 0
        self._dropped_logged = 0
        self._next_drop_log = 0.0
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a dead owner's socket: the directory is ours, so is the file
            sock.bind(self.path)
            os.chmod(self.path, modes(group)[1], follow_symlinks=False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.setblocking(False)
            self._inode = os.stat(self.path, follow_symlinks=False).st_ino
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, limit: int = 64) -> list[bytes]:
        """Drain up to ``limit`` datagrams; return the trusted ones."""
        messages = []
        for _ in range(limit):
            try:
                message, ancdata, _, _ = self.sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(UCRED.size))
            except (BlockingIOError, InterruptedError):
                break
            if self._trusted(ancdata):
                messages.append(message)
            else:
                self.dropped += 1
        if self.dropped != self._dropped_logged and time.monotonic() >= self._next_drop_log:
            log.warning("sharedpool: %s: dropped %d datagram(s) from untrusted senders",
                        self.path, self.dropped - self._dropped_logged)
            self._dropped_logged = self.dropped
            self._next_drop_log = time.monotonic() + DROP_LOG_EVERY
        return messages

    def _trusted(self, ancdata: list) -> bool:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= UCRED.size:
                _, uid, gid = UCRED.unpack_from(data)
                if uid in self.trusted_uids:
                    return True
                return self.trusted_gid is not None and (gid == self.trusted_gid or self._member(uid))
        return False

    def _member(self, uid: int) -> bool:
        """Tell whether ``uid`` is in GROUP: the credentials carry only the sender's effective gid,
        and members usually have GROUP as a supplementary group (``usermod -aG``)."""
        known = self._members.get(uid)
        if known is None:
            try:
                entry = pwd.getpwuid(uid)
                known = self.trusted_gid in os.getgrouplist(entry.pw_name, entry.pw_gid)
            except (KeyError, OSError):
                known = False
            if len(self._members) < 4096:
                self._members[uid] = known
        return known

    def close(self, unlink: bool = True) -> None:
        """Close; remove the socket file only while it is still the one we bound."""
        try:
            if unlink and os.stat(self.path, follow_symlinks=False).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass
        self.sock.close()
