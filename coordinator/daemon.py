"""Own a pool's ledger: create or adopt it, reclaim dead workers, audit, report.

Coordinator only. Read it like gunicorn's arbiter: signal handlers only
enqueue; one loop waits on pidfds, the control socket and the signal pipe,
dispatches to ``handle_*`` methods, and on every pass reaps dead workers,
finishes pending reclaims and audits the semaphore against the ledger.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import posix_ipc

from sharedpool import channel
from sharedpool.config import SETTINGS, PoolConfig
from sharedpool.errors import ConfigError, LedgerError, SharedPoolError
from sharedpool.ledger import (
    DEFAULT_SLOTS,
    FLAG_BACKENDS_LOCAL,
    SLOT_ACTIVE,
    Header,
    Ledger,
    Slot,
    coordinator_ready,
    group_id,
    ipc_names,
    is_alive,
    lock_path,
    permit_counts,
    process_start_time,
    unlink,
    validate_segment,
)

from .liveness import Watcher
from .notify import SystemdNotifier

log = logging.getLogger("sharedpool.coordinator")

DRAIN_TIMEOUT = 10.0  # seconds, at exit with --remove-on-exit, for registered workers to stop too
TICK = 0.1  # seconds between passes when no event arrives
AUDIT_EVERY = 0.5
RECLAIM_POLL = 0.005  # seconds between /proc checks while a dead worker's backends exit
BACKEND_WARN_AFTER = 5.0  # seconds a dead worker's backend may run before a warning
UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid of a control message's sender
LOCK_PATIENCE = 10.0  # seconds a coordinator that lost the lock waits for the winner to be ready


class CoordinatorError(SharedPoolError):
    """The coordinator cannot start or adopt the pool."""


@dataclass
class PendingReclaim:
    """A dead worker whose permits wait for its server backends to be gone."""

    pid: int
    start_time: int
    since: float
    backends: tuple[tuple[int, int], ...]  # (pid, start time) of its backends seen on this host
    need_grace: bool  # some connection cannot be watched in /proc: wait RECLAIM_GRACE too
    warned: bool = False


@dataclass
class Options:
    name: str
    budget: int
    nslots: int = DEFAULT_SLOTS
    group: str | None = None
    reclaim_grace: float = PoolConfig.__dataclass_fields__["reclaim_grace"].default
    remove_on_exit: bool = False
    exit_when_idle: float | None = None
    exit_with_pid: int | None = None


class Coordinator:
    """The daemon for one pool name. Runs in its own process, never in a worker."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.name = options.name
        self.ledger: Ledger | None = None
        self.selector = selectors.DefaultSelector()
        self.watcher = Watcher(self.selector)
        self.notifier = SystemdNotifier()
        self.pending: dict[int, PendingReclaim] = {}
        self.signals: list[int] = []
        self.running = True
        self.idle_since = time.monotonic()
        self.parent_gone = False
        self._next_audit = 0.0
        self._audit_state: tuple | None = None
        self.suspect_leaks = 0  # in-flight operations of reclaimed dead workers: permits they may have leaked
        self._next_watchdog = 0.0
        self._control = None
        self._wakeup_r = self._wakeup_w = -1
        self._lock_fd = -1

    # -- start -----------------------------------------------------------------------

    def start(self) -> None:
        self._take_lock()
        self.ledger = self._create_or_adopt()
        self._control = channel.bind(channel.coordinator_address(self.name))
        # the kernel attaches each sender's credentials: only root and our own user may steer us
        self._control.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._control.setblocking(False)
        self.selector.register(self._control, selectors.EVENT_READ, ("control", None))
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, ("signal", None))
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._enqueue_signal)
        if self.options.exit_with_pid:
            self._watch_parent(self.options.exit_with_pid)
        self.scan_slots()
        self.audit()
        self.notifier.send("READY=1", f"STATUS=pool {self.name!r}: budget {self.ledger.header.budget}")
        log.info(
            "pool %r: coordinator pid %d ready, budget %d, epoch %d",
            self.name, os.getpid(), self.ledger.header.budget, self.ledger.header.epoch,
        )

    def _take_lock(self) -> None:
        """Hold the pool's lock file for this process's life: one coordinator per pool name.

        Everything that creates, adopts or recreates the IPC objects runs
        under it; the kernel drops it when we die. A loser (N workers booting
        together each start one) waits until the winner has claimed the
        ledger, so whoever started it finds a ready pool, then fails.
        """
        opts = self.options
        path = lock_path(opts.name)
        gid = group_id(opts.group) if opts.group else -1
        deadline = time.monotonic() + LOCK_PATIENCE
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o660 if opts.group else 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if coordinator_ready(opts.name, opts.group) or time.monotonic() > deadline:
                    raise CoordinatorError(f"pool {opts.name!r}: a coordinator already runs (pid {holder})") from None
                time.sleep(0.01)
                continue
            # an exiting coordinator may have removed the file between our open and our lock
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        if gid != -1:
            os.fchown(fd, -1, gid)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _create_or_adopt(self) -> Ledger:
        opts = self.options
        try:
            ledger = Ledger.create(opts.name, opts.budget, nslots=opts.nslots, group=opts.group)
            log.info("pool %r: created ledger and semaphore (%d slots)", opts.name, opts.nslots)
        except posix_ipc.ExistentialError:
            ledger = self._adopt()
        header = ledger.header
        header.coordinator_pid = os.getpid()
        header.coordinator_start = process_start_time(os.getpid()) or 0
        header.heartbeat = time.time()
        return ledger

    def _adopt(self) -> Ledger:
        opts = self.options
        sem_name = ipc_names(opts.name)[1]
        if not Ledger.exists(opts.name):
            # a semaphore without its segment: a creation that died half-way (we hold the lock,
            # so no other coordinator is between the two right now)
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_semaphore(sem_name)
            log.warning("pool %r: removed a semaphore left without its ledger", opts.name)
            return Ledger.create(opts.name, opts.budget, nslots=opts.nslots, group=opts.group)
        try:
            if not os.path.exists(f"/dev/shm/sem.{sem_name[1:]}"):
                self._recreate_semaphore()
            ledger = Ledger.attach(opts.name, group=opts.group)
        except LedgerError as exc:
            raise CoordinatorError(f"{exc}; remove it with `sharedpool cleanup --name {opts.name}`") from None
        header = ledger.header
        try:
            self._refuse_live_coordinator(header)
        except CoordinatorError:
            ledger.close()
            raise
        header.epoch += 1
        log.info(
            "pool %r: adopted existing ledger (epoch %d, budget %d, %d permits held)",
            opts.name, header.epoch, header.budget, ledger.snapshot().held,
        )
        if header.budget != opts.budget:
            self.ledger = ledger
            self.set_budget(opts.budget)
        return ledger

    def _refuse_live_coordinator(self, header: Header) -> None:
        """Another live coordinator claims the ledger (one that predates the lock file, or whose
        file a forced cleanup removed): touch nothing."""
        pid = header.coordinator_pid
        if pid and pid != os.getpid() and is_alive(pid, header.coordinator_start):
            raise CoordinatorError(f"pool {self.name!r}: a coordinator already runs (pid {pid})")

    def _recreate_semaphore(self) -> None:
        """The segment survived its semaphore: rebuild it from what the slots record."""
        opts = self.options
        shm_name, sem_name = ipc_names(opts.name)
        shm = posix_ipc.SharedMemory(shm_name)
        try:
            validate_segment(opts.name, shm.fd, f"/dev/shm/{shm_name[1:]}", opts.group)
            header = Header.from_buffer_copy(os.pread(shm.fd, ctypes.sizeof(Header), 0))
            self._refuse_live_coordinator(header)
            raw = os.pread(shm.fd, header.slot_hwm * ctypes.sizeof(Slot), ctypes.sizeof(Header))
            held, inflight, waiting, _ = permit_counts(raw)
            # every operation in flight may hold a permit it has not recorded yet: count it as taken
            # (never over-grant); a blocked waiter almost surely holds nothing, so its permit becomes
            # a suspect leak the audit returns once the waiters are seen still waiting, empty-handed
            free = max(0, header.physical - held - inflight)
            self.suspect_leaks += waiting
            mode = 0o660 if opts.group else 0o600
            posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=mode, initial_value=free).close()
        finally:
            os.close(shm.fd)
        log.warning(
            "pool %r: recreated the missing semaphore with %d free permit(s)%s", opts.name, free,
            f" ({waiting} waiting thread(s) counted as holders until the audit sees them empty-handed)" if waiting else "",
        )

    # -- loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT, or until idle/parent-gone exit conditions hold.

        With --remove-on-exit, registered workers usually stop along with us
        (the server stops everything at once): keep reclaiming for up to
        DRAIN_TIMEOUT until they are gone, so the ledger can be removed.
        """
        self._serve(lambda: not self.running)
        if self.options.remove_on_exit and self._registered():
            log.info("pool %r: waiting up to %.0f s for the registered workers to exit", self.name, DRAIN_TIMEOUT)
            deadline = time.monotonic() + DRAIN_TIMEOUT
            self.running = True  # a second SIGTERM/SIGINT ends the wait
            self._serve(lambda: not self.running or time.monotonic() > deadline or not self._registered())
        return self.shutdown()

    def _registered(self) -> bool:
        """Tell whether any slot is still taken: by a live worker, or a dead one not yet reclaimed."""
        return any(s.state == SLOT_ACTIVE for s in self.ledger.slots[: self.ledger.header.slot_hwm])

    def _serve(self, done: Callable[[], bool]) -> None:
        while not done():
            for key, _ in self.selector.select(self._timeout()):
                kind, data = key.data
                if kind == "pidfd":
                    self.handle_death(data)
                elif kind == "control":
                    self.handle_control()
                elif kind == "signal":
                    self._drain_wakeup()
                elif kind == "parent":
                    self.parent_gone = True
            self.handle_signals()
            self.tick()

    def _timeout(self) -> float:
        return RECLAIM_POLL if self.pending else TICK

    def tick(self) -> None:
        now = time.monotonic()
        self.ledger.header.heartbeat = time.time()
        self.scan_slots()
        for index in self.watcher.poll_dead():
            self.handle_death(index)
        self.finish_reclaims()
        self.retire_excess_permits()
        if now >= self._next_audit:
            self._next_audit = now + AUDIT_EVERY
            self.audit()
        if self.notifier.watchdog_interval and now >= self._next_watchdog:
            self._next_watchdog = now + self.notifier.watchdog_interval
            self.notifier.send("WATCHDOG=1")
        self.check_exit(now)

    def check_exit(self, now: float) -> None:
        active = any(s.state == SLOT_ACTIVE for s in self.ledger.slots[: self.ledger.header.slot_hwm])
        if active or self.pending:
            self.idle_since = now
            return
        if self.parent_gone:
            log.info("pool %r: the server that started this coordinator is gone", self.name)
            self.running = False
        elif self.options.exit_when_idle is not None and now - self.idle_since >= self.options.exit_when_idle:
            log.info("pool %r: no worker for %.1f s, exiting", self.name, self.options.exit_when_idle)
            self.running = False

    # -- events ----------------------------------------------------------------------

    def _enqueue_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                log.info("pool %r: SIGHUP: reconciling the ledger", self.name)
                self.scan_slots()
                self.audit()
            else:
                log.info("pool %r: %s: shutting down", self.name, signal.Signals(signum).name)
                self.running = False

    def handle_control(self) -> None:
        """Serve datagrams from root or our own user: "exit PID", "budget N"."""
        while True:
            try:
                message, ancdata, _, _ = self._control.recvmsg(256, socket.CMSG_SPACE(UCRED.size))
            except BlockingIOError:
                return
            uid = None
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= UCRED.size:
                    uid = UCRED.unpack_from(data)[1]
            if uid not in (0, os.geteuid()):
                log.warning("pool %r: ignored control message %r from uid %s", self.name, message[:64], uid)
                continue
            verb, _, argument = message.decode(errors="replace").partition(" ")
            if verb == "exit" and argument.isdigit():
                self.handle_exit_notice(int(argument))
            elif verb == "budget":
                try:
                    budget = SETTINGS["POOL_SIZE"][0]("POOL_SIZE", argument)
                except ConfigError as exc:
                    log.warning("pool %r: ignored budget request %r: %s", self.name, argument[:32], exc)
                    continue
                self.set_budget(budget)
            else:
                log.warning("pool %r: ignored control message %r", self.name, message[:64])

    def handle_exit_notice(self, pid: int) -> None:
        """A server told us a worker exited (gunicorn child_exit): act without waiting."""
        for index in range(self.ledger.header.slot_hwm):
            slot = self.ledger.slots[index]
            if slot.state == SLOT_ACTIVE and slot.pid == pid and not is_alive(pid, slot.start_time):
                self.handle_death(index)

    def scan_slots(self) -> None:
        """Watch every newly registered worker; catch the ones already gone."""
        slots = self.ledger.slots
        for index in range(self.ledger.header.slot_hwm):
            slot = slots[index]
            if slot.state != SLOT_ACTIVE or index in self.pending:
                if slot.state != SLOT_ACTIVE:
                    self.watcher.forget(index)
                continue
            pid, start = slot.pid, slot.start_time
            if self.watcher.watching(index, pid, start):
                continue
            if not self.watcher.watch(index, pid, start):
                self.handle_death(index)
            else:
                log.debug("pool %r: worker %d registered in slot %d", self.name, pid, index)

    def handle_death(self, index: int) -> None:
        self.watcher.forget(index)
        slot = self.ledger.slots[index]
        if slot.state != SLOT_ACTIVE or index in self.pending or is_alive(slot.pid, slot.start_time):
            return
        local = bool(slot.flags & FLAG_BACKENDS_LOCAL)
        backends = []
        if local:
            # remember each backend's start time: pids are recycled (pid_max may be 32768),
            # and a new process under an old backend pid must not stall the reclaim
            for pid in slot.backends:
                start = process_start_time(pid) if pid else None
                if start is not None:
                    backends.append((pid, start))
        self.pending[index] = PendingReclaim(
            pid=slot.pid,
            start_time=slot.start_time,
            since=time.monotonic(),
            backends=tuple(backends),
            # a connect under way has a backend we have no pid for; remote backends are invisible
            need_grace=not local or bool(slot.connecting),
        )
        log.info("pool %r: worker %d died holding %d permit(s)", self.name, slot.pid, slot.held)
        self.finish_reclaims()

    def finish_reclaims(self) -> None:
        """Return a dead worker's permits once its server backends are surely gone."""
        now = time.monotonic()
        for index, dead in list(self.pending.items()):
            if dead.need_grace and now - dead.since < self.options.reclaim_grace:
                continue
            running = [pid for pid, start in dead.backends if is_alive(pid, start)]
            if running:
                if not dead.warned and now - dead.since > BACKEND_WARN_AFTER:
                    dead.warned = True
                    log.warning(
                        "pool %r: worker %d died %.0f s ago but its backend(s) %s still run; its permits "
                        "stay taken until they exit (is CHECK_INTERVAL disabled?)",
                        self.name, dead.pid, now - dead.since, ", ".join(map(str, running)),
                    )
                continue
            del self.pending[index]
            self.reclaim(index, dead, now)

    def reclaim(self, index: int, dead: PendingReclaim, now: float) -> None:
        ledger = self.ledger
        with ledger.registry_lock():
            slot = ledger.slots[index]
            if slot.state != SLOT_ACTIVE or (slot.pid, slot.start_time) != (dead.pid, dead.start_time):
                return
            count = slot.held
            slot.held = 0  # unrecord before posting: a crash here leaks, the audit repairs
            if slot.inflight:
                self.suspect_leaks += slot.inflight
                self._next_audit = 0.0  # the audit settles them at once
            ledger.header.reclaimed_permits += count
            ledger.header.reclaimed_workers += 1
            ledger._retire(slot)
        for _ in range(count):
            ledger.sem.release()
        log.info(
            "pool %r: reclaimed %d permit(s) of worker %d after %.0f ms",
            self.name, count, dead.pid, (now - dead.since) * 1000,
        )

    # -- budget --------------------------------------------------------------------

    def set_budget(self, budget: int) -> None:
        """Change the budget online: add permits now, retire the excess as it frees."""
        header = self.ledger.header
        old = header.budget
        header.budget = budget
        header.reloads += 1
        header.epoch += 1
        while header.physical < budget:
            header.physical += 1
            self.ledger.sem.release()
        log.info("pool %r: budget %d -> %d", self.name, old, budget)
        self.notifier.send(f"STATUS=pool {self.name!r}: budget {budget}")
        self.retire_excess_permits()

    def retire_excess_permits(self) -> None:
        header = self.ledger.header
        while header.physical > header.budget:
            try:
                self.ledger.sem.acquire(0)
            except posix_ipc.BusyError:
                return
            header.physical -= 1

    # -- audit ---------------------------------------------------------------------

    def audit(self) -> None:
        """Return permits leaked by workers that died mid-operation.

        The semaphore value is read between two identical copies of the slot
        table, so no permit operation completed in between. Counting every
        in-flight operation as holding a permit, what is still missing was
        leaked and is posted back; that can never over-grant.

        A thread blocked waiting for a permit is in flight too, and almost
        surely holds nothing: counted as holding, it would hide exactly the
        leak it waits for. So when the strict count finds nothing, the
        waiters are counted as empty-handed, but a permit is posted only if
        (a) a dead worker's in-flight operations could have leaked it
        (``suspect_leaks``), (b) no permit moved and the semaphore stayed
        the same since the previous audit, AUDIT_EVERY earlier (a waiter
        that had just been granted would have recorded it by then), and
        (c) no waiting worker is stopped (SIGSTOP, a debugger).
        """
        ledger = self.ledger
        before = ledger.raw_slots()
        value = ledger.sem.value
        if ledger.raw_slots() != before:
            self._audit_state = None
            return
        held, inflight, waiting, key = permit_counts(before)
        physical = ledger.header.physical
        missing = physical - value - held - inflight
        loose = physical - value - held - (inflight - waiting)  # blocked waiters counted as empty-handed
        if loose <= 0 and inflight == waiting:
            # every operation in flight is a blocked waiter, which holds at most what it has not
            # recorded yet: loose >= leaked, so nothing leaked and no suspect is left to settle
            self.suspect_leaks = 0
        if missing <= 0 and waiting and self.suspect_leaks:
            state = (key, value, physical)
            if self._audit_state == state and not self._waiters_stopped():
                missing = min(loose, self.suspect_leaks)
            self._audit_state = state
        else:
            self._audit_state = None
        if missing > 0:
            for _ in range(missing):
                ledger.sem.release()
            ledger.header.audit_fixes += missing
            self.suspect_leaks = max(0, self.suspect_leaks - missing)
            self._audit_state = None
            log.warning("pool %r: audit returned %d leaked permit(s)", self.name, missing)
        elif value + held > physical:
            # More free plus recorded than exist: something posted twice (a worker still on a
            # semaphore that was recreated, a foreign post). Take the excess back as it frees.
            excess, taken = value + held - physical, 0
            for _ in range(value + held - physical):
                try:
                    ledger.sem.acquire(0)
                except posix_ipc.BusyError:
                    break
                taken += 1
            self._audit_state = None
            log.error(
                "pool %r: semaphore %d + held %d exceeds the %d permits in circulation; took back %d of %d",
                self.name, value, held, physical, taken, excess,
            )

    def _waiters_stopped(self) -> bool:
        for s in self.ledger.snapshot().slots:
            if s.waiting:
                try:
                    with open(f"/proc/{s.pid}/stat", "rb") as f:
                        state = f.read().rpartition(b")")[2].split()[0]
                except (OSError, IndexError):
                    continue
                if state in (b"T", b"t"):
                    return True
        return False

    # -- stop ----------------------------------------------------------------------

    def _watch_parent(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.parent_gone = True
            return
        self.selector.register(pidfd, selectors.EVENT_READ, ("parent", None))

    def _live_workers(self) -> list[int]:
        slots = self.ledger.slots
        return [
            s.pid for s in slots[: self.ledger.header.slot_hwm] if s.state == SLOT_ACTIVE and is_alive(s.pid, s.start_time)
        ]

    def shutdown(self) -> int:
        self.notifier.send("STOPPING=1")
        ledger = self.ledger
        self.finish_reclaims()
        ledger.header.coordinator_pid = 0
        if self.options.remove_on_exit:
            # under the registry lock, so no worker claims a slot between our check and the unlink;
            # one that attached before and claims after sees ledger.is_current() turn false
            with ledger.registry_lock():
                live = self._live_workers()
                removed = [] if live else unlink(self.name)
            if live:
                log.warning(
                    "pool %r: not removing the ledger: %d worker(s) still registered (%s)",
                    self.name, len(live), ", ".join(map(str, live[:8])),
                )
            else:
                log.info("pool %r: removed %s", self.name, ", ".join(removed) or "nothing")
        else:
            live = self._live_workers()
            log.info("pool %r: coordinator stopped; ledger left for %d running worker(s)", self.name, len(live))
        self.watcher.close()
        self.selector.close()
        self._control.close()
        signal.set_wakeup_fd(-1)
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)
        ledger.close()
        os.close(self._lock_fd)  # last: the next coordinator may start now
        return 0
