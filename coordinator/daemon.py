"""Own a pool's ledger: reclaim dead workers, audit, retire cut permits, report.

Coordinator only. Read it like gunicorn's arbiter: signal handlers only
enqueue; one loop waits on pidfds, the control socket and the signal pipe,
dispatches to ``handle_*`` methods, and on every pass heals the header from
its own copies, reads one stable view of the slots, reclaims dead workers
whose backends are gone, retires permits of a budget cut and audits the
semaphore. The decisions are pure functions in audit.py; this file is the
I/O around them. Nothing read from the ledger is trusted: the budget, the
permits in circulation and the slot count are the coordinator's own.
"""
from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import posix_ipc

from sharedpool import channel
from sharedpool.config import SETTINGS, PoolConfig
from sharedpool.errors import ConfigError
from sharedpool.ledger import (
    DEFAULT_SLOTS,
    FLAG_BACKENDS_LOCAL,
    HEADER_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    MAX_BUDGET,
    SLOT_FREE,
    SLOT_SIZE,
    Ledger,
    Slot,
    is_alive,
    pid_namespace,
    process_start_time,
    sealed,
)
from sharedpool.names import SLOT_LOCK_BASE, PoolNames, locked_bytes

from .audit import SlotFacts, exact_missing, excess, needs_exact_count, reclaimable
from .lifecycle import CoordinatorError, PoolClaim, create_or_adopt
from .liveness import Watcher
from .notify import SystemdNotifier

log = logging.getLogger("sharedpool.coordinator")

DRAIN_TIMEOUT = 10.0  # seconds, at exit with --remove-on-exit, for registered workers to stop too
TICK = 0.1  # seconds between passes when no event arrives
AUDIT_EVERY = 0.5
RECLAIM_POLL = 0.005  # seconds between /proc checks while a dead worker's backends exit
BACKEND_WARN_AFTER = 5.0  # seconds a dead worker's backend may run before a warning
BAD_LOG_BURST = 5  # bad control requests logged one by one before one line per DROP_LOG_EVERY
CUT_SHED_EVERY = 0.1  # seconds between shed requests to idle holders while a budget cut is retired

__all__ = ["Coordinator", "CoordinatorError", "Options"]


@dataclass
class PendingReclaim:
    """A dead worker whose permits wait for its server backends to be gone."""

    pid: int
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
        self.names = PoolNames(options.name)
        self.ledger: Ledger | None = None
        self.selector = selectors.DefaultSelector()
        self.watcher = Watcher(self.selector)
        self.notifier = SystemdNotifier()
        self.claim = PoolClaim(self.names, options.group)
        self.control: channel.Inbox | None = None
        self.pending: dict[int, PendingReclaim] = {}
        # live slots as last scanned: index -> (pid, start time, {backend pid: start time}); our own
        # copy, so a worker that dies after its record was lost (truncated, overwritten) is still
        # seen dying, and a backend dropped from a record while it runs is still waited for
        self.seen: dict[int, tuple[int, int, dict[int, int]]] = {}
        self.lost: list[PendingReclaim] = []  # such deaths: no exact count until their backends are gone
        self.signals: list[int] = []
        self.running = True
        self.idle_since = time.monotonic()
        self.parent_gone = False
        self.suspects = 0  # slots settled without an exact count: leaks only an exact count can find
        self.budget = self.physical = self.debt = 0  # our own copies: never read back from the header
        self.hold = 0
        self._next_audit = 0.0
        self._next_watchdog = 0.0
        self._next_cut_shed = 0.0
        self._bad_unlogged = 0  # bad control requests not logged yet
        self._log_tokens, self._log_refilled = float(BAD_LOG_BURST), time.monotonic()
        self._pid_ns = pid_namespace()
        self._wakeup_r = self._wakeup_w = -1

    # -- start -----------------------------------------------------------------------

    def start(self) -> None:
        opts = self.options
        self.claim.take()
        self.control = self.claim.bind_control()  # before the ledger: an unreachable coordinator touches nothing
        self.ledger, adopted = create_or_adopt(self.claim, opts.budget, opts.nslots)
        header = self.ledger.header
        if adopted:
            self.budget = header.budget
            self.physical = header.physical if header.budget <= header.physical <= MAX_BUDGET else header.budget
            self.debt = self.physical - self.budget
            self.suspects = 1  # nothing read back is proven: count exactly once before trusting it
            header.epoch += 1
            log.info("pool %r: adopted existing ledger (epoch %d, budget %d, %d permits held)",
                     self.name, header.epoch, header.budget, self.ledger.snapshot().held)
            if self.budget != opts.budget:
                self.set_budget(opts.budget)
        else:
            self.budget = self.physical = opts.budget
            log.info("pool %r: created ledger and semaphore (%d slots)", self.name, self.ledger.nslots)
        header.coordinator_pid = os.getpid()
        header.coordinator_start = process_start_time(os.getpid()) or 0
        self.heal_header()
        self.selector.register(self.control.sock, selectors.EVENT_READ, ("control", None))
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, ("signal", None))
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._enqueue_signal)
        if opts.exit_with_pid:
            self._watch_parent(opts.exit_with_pid)
        self.tick()
        self.notifier.send("READY=1", f"STATUS=pool {self.name!r}: budget {self.budget}")
        log.info("pool %r: coordinator pid %d ready, budget %d, epoch %d",
                 self.name, os.getpid(), self.budget, header.epoch)

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

    def _serve(self, done: Callable[[], bool]) -> None:
        while not done():
            for key, _ in self.selector.select(RECLAIM_POLL if self.pending or self.lost else TICK):
                kind, _ = key.data
                if kind == "control":
                    self.handle_control()
                elif kind == "signal":
                    self._drain_wakeup()
                elif kind == "parent":
                    self.parent_gone = True
            self.handle_signals()
            self.tick()

    def tick(self) -> None:
        now = time.monotonic()
        ledger = self.ledger
        if not ledger.intact():
            log.error("pool %r: someone truncated the ledger file; restoring its size (the processes that "
                      "touched it meanwhile died of SIGBUS; lost slots are settled by an exact count)", self.name)
            ledger.restore_size()
            self.suspects += 1
        self.heal_header()
        self.settle_debt()
        facts, free = self.stable_view()
        self.scan(facts)
        self.finish_reclaims()
        if now >= self._next_audit or self.suspects:
            self._next_audit = now + AUDIT_EVERY
            self.audit()
        if self.debt and now >= self._next_cut_shed:
            self._next_cut_shed = now + CUT_SHED_EVERY
            self.ask_idle_holders_to_shed(facts)
        if self.notifier.watchdog_interval and now >= self._next_watchdog:
            self._next_watchdog = now + self.notifier.watchdog_interval
            self.notifier.send("WATCHDOG=1")
        self.check_exit(now, facts)

    def heal_header(self) -> None:
        """Publish our own copies over whatever the header now says."""
        header, ledger = self.ledger.header, self.ledger
        header.magic, header.version = MAGIC, LAYOUT_VERSION
        header.header_size, header.slot_size, header.nslots = HEADER_SIZE, SLOT_SIZE, ledger.nslots
        header.token = ledger.token
        header.budget, header.physical, header.hold = self.budget, self.physical, self.hold
        header.coordinator_pid = os.getpid()
        if not header.slot_hwm <= ledger.nslots:
            header.slot_hwm = ledger.nslots
        header.heartbeat = time.time()

    def stable_view(self) -> tuple[list[SlotFacts], int]:
        """Read the slots, the semaphore and the slots again until nothing moved in between."""
        ledger = self.ledger
        before, free, alive = ledger.stable_slots()
        facts = []
        for index in range(ledger.nslots):
            slot = Slot.from_buffer_copy(before, index * SLOT_SIZE)
            if slot.state == SLOT_FREE and index not in alive and not (slot.held or slot.inflight):
                continue
            facts.append(SlotFacts(index=index, alive=index in alive, verified=sealed(ledger.token, slot),
                                   held=slot.held, inflight=slot.inflight, waiting=slot.waiting))
        return facts, free

    def scan(self, facts: list[SlotFacts]) -> None:
        """Watch newly registered workers of our PID namespace; start reclaiming dead ones."""
        slots = self.ledger.slots
        for fact in facts:
            index = fact.index
            if fact.alive:
                slot = slots[index]
                pid, start = slot.pid, slot.start_time
                if slot.pid_ns == self._pid_ns and not self.watcher.watching(index, pid, start):
                    self.watcher.watch(index, pid, start)
                    log.debug("pool %r: worker %d registered in slot %d", self.name, pid, index)
                self.remember(index, fact, pid, start, tuple(b for b in slot.backends if b > 0))
            elif index not in self.pending:
                self.handle_death(index, fact)
        alive = {fact.index for fact in facts if fact.alive}
        for index in list(self.seen):
            if index not in alive and index not in self.pending:
                self.lose(index)  # gone, and the slot reads free: a clean exit, or a record lost

    def remember(self, index: int, fact: SlotFacts, pid: int, start: int, backends: tuple[int, ...]) -> None:
        """Keep our own copy of a live slot's owner and backends (the record may be lost later).

        A backend stays in our copy while it runs, whatever the record says
        now: the backend pids are not covered by the check value, so a
        record that dropped one may be a scribble.
        """
        before = self.seen.get(index)
        if fact.verified and before is not None and before[0] and before[:2] != (pid, start):
            self.lose(index)  # its owner went and the slot was claimed again between two passes
            before = None
        known = before[2] if before is not None else {}
        current: dict[int, int] = {}
        for backend in backends:
            began = known.get(backend)
            if began is None and _is_postgres(backend):
                began = process_start_time(backend)
            if began is not None:
                current[backend] = began
        for backend, began in known.items():
            if backend not in current and is_alive(backend, began):
                current[backend] = began
        if fact.verified:
            owner = (pid, start)
        else:  # a scribbled record names nobody: keep the owner we knew
            owner = before[:2] if before is not None else (0, 0)
        self.seen[index] = (*owner, current)

    def lose(self, index: int) -> None:
        """A worker left a slot that no longer records it; if its backends still run, it died with its record lost.

        A clean exit closes its backends (confirmed by the server) before it
        frees its slot, so nothing of it runs. A worker that died after its
        record was truncated or overwritten may hold permits for backends
        that still run: no exact count until they are gone.
        """
        pid, _, known = self.seen.pop(index)
        self.watcher.forget(index)
        backends = tuple((b, began) for b, began in known.items() if is_alive(b, began))
        if not backends:
            return
        self.lost.append(PendingReclaim(pid=pid, since=time.monotonic(), backends=backends, need_grace=True))
        log.warning("pool %r: worker %d left slot %d without a record while its backend(s) %s still run (record "
                    "truncated or overwritten?); no exact count until they are gone", self.name, pid, index,
                    ", ".join(str(b) for b, _ in backends))

    def handle_death(self, index: int, fact: SlotFacts) -> None:
        self.watcher.forget(index)
        slot = self.ledger.read_slot(index)
        trusted = fact.verified and slot.pid_ns == self._pid_ns
        local = trusted and bool(slot.flags & FLAG_BACKENDS_LOCAL)
        backends = []
        seen = self.seen.pop(index, None)
        # remember each backend's start time: pids are recycled, and a new process under an old
        # backend pid must not stall the reclaim; an untrusted list only counts real postgres processes
        for pid in slot.backends:
            if pid > 0 and (trusted or _is_postgres(pid)) and (seen is None or pid not in seen[2]):
                start = process_start_time(pid)
                if start is not None:
                    backends.append((pid, start))
        if seen is not None:
            backends += [(pid, began) for pid, began in seen[2].items() if is_alive(pid, began)]
        self.pending[index] = PendingReclaim(
            pid=slot.pid,
            since=time.monotonic(),
            backends=tuple(backends),
            # a connect under way has a backend we have no pid for; remote backends are invisible
            need_grace=not local or bool(slot.connecting),
        )
        if fact.held or fact.inflight or not fact.verified:
            log.info("pool %r: worker %d died holding %d permit(s)%s", self.name, slot.pid, fact.held,
                     "" if fact.verified else " (its slot fails its check: settled by an exact count)")

    def finish_reclaims(self) -> None:
        """Return a dead worker's permits once its server backends are surely gone."""
        now = time.monotonic()
        for dead in list(self.lost):
            if now - dead.since >= self.options.reclaim_grace and not any(
                    is_alive(pid, start) for pid, start in dead.backends):
                self.lost.remove(dead)
                self.suspects += 1
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
        with ledger.registry_lock():  # no claim, free or retirement moves while we count and decide
            self._absorb_retired()
            facts, free = self.stable_view()
            fact = next((f for f in facts if f.index == index), None)
            if fact is None or fact.alive:
                # its record was lost meanwhile (the slot reads free), or freed and claimed again:
                # whatever it held is left to an exact count (its backends are gone by now)
                self.suspects += 1
                return
            count = reclaimable(fact, self.physical, free, [f for f in facts if f.index != index])
            exact_needed = needs_exact_count(fact, count)
            ledger.header.reclaimed_permits += count
            ledger.header.reclaimed_workers += 1
            ledger.retire_dead_slot(index)
            for _ in range(count):
                ledger.sem.release()
        if exact_needed:
            self.suspects += 1
        log.info("pool %r: reclaimed %d permit(s) of worker %d after %.0f ms%s", self.name, count, dead.pid,
                 (now - dead.since) * 1000, " (the rest after an exact count)" if exact_needed else "")

    # -- audit and budget ----------------------------------------------------------

    def audit(self) -> None:
        """Settle leaks exactly, or take back permits that surely exceed what circulates.

        With suspects, raise the hold so waiters stop blocking on the
        semaphore; within one wait slice no live operation is in flight, and
        the count is exact.
        """
        ledger = self.ledger
        with ledger.registry_lock():  # no retirement moves the count while we decide
            self._absorb_retired()
            facts, free = self.stable_view()
            if self.lost or self.pending or any(not f.alive for f in facts):
                return  # dead workers still being reclaimed: their permits are neither free nor live
            missing = exact_missing(self.physical, free, facts)
            if missing is None:
                if self.suspects and not self.hold:
                    self.hold = ledger.header.hold = 1
                surplus = excess(self.physical, free, facts)
                if surplus:
                    self._take_back(surplus, free, sum(f.held for f in facts if f.verified))
                return
            if missing > 0:
                # a budget cut takes leaked permits first: nothing is posted above the budget (and a
                # physical count forged before we adopted it is retired here, never handed out)
                retired = min(missing, self.debt)
                if retired:
                    self.debt -= retired
                    self.physical -= retired
                    ledger.header.retire_debt, ledger.header.physical = self.debt, self.physical
                    missing -= retired
                    log.warning("pool %r: audit retired %d leaked permit(s) for the budget cut (exact count)",
                                self.name, retired)
                for _ in range(missing):
                    ledger.sem.release()
                if missing:
                    ledger.header.audit_fixes += missing
                    log.warning("pool %r: audit returned %d leaked permit(s) (exact count)", self.name, missing)
            elif missing < 0:
                self._take_back(-missing, free, sum(f.held for f in facts))
            self.suspects = 0
            self.hold = ledger.header.hold = 0

    def _take_back(self, surplus: int, free: int, held: int) -> None:
        taken = 0
        for _ in range(surplus):
            try:
                self.ledger.sem.acquire(0)
            except posix_ipc.BusyError:
                break
            taken += 1
        log.error("pool %r: semaphore %d + held %d exceeds the %d permits in circulation; took back %d of %d",
                  self.name, free, held, self.physical, taken, surplus)

    def _absorb_retired(self) -> None:
        """Count the permits returning workers retired since we last looked (under the registry lock).

        A published debt above ours is someone's scribble: ours wins.
        """
        published = self.ledger.header.retire_debt
        if published < self.debt:
            self.physical -= self.debt - published
            self.debt = published
        self.ledger.header.retire_debt = self.debt

    def settle_debt(self) -> None:
        """Account for permits workers retired, then retire free ones ourselves (budget cut)."""
        ledger = self.ledger
        with ledger.registry_lock():
            header = ledger.header
            self._absorb_retired()
            while self.debt:
                try:
                    ledger.sem.acquire(0)
                except posix_ipc.BusyError:
                    break
                self.debt -= 1
                self.physical -= 1
            header.retire_debt = self.debt
            header.physical = self.physical

    def set_budget(self, budget: int) -> None:
        """Change the budget online: add permits now, retire the excess as connections come back."""
        old = self.budget
        ledger = self.ledger
        with ledger.registry_lock():
            header = ledger.header
            self._absorb_retired()
            self.budget = budget
            if self.physical < budget:
                for _ in range(budget - self.physical):
                    ledger.sem.release()
                self.physical = budget
            self.debt = self.physical - budget
            header.budget, header.physical, header.retire_debt = budget, self.physical, self.debt
            header.reloads += 1
            header.epoch += 1
        log.info("pool %r: budget %d -> %d%s", self.name, old, budget,
                 f" ({self.debt} permit(s) to retire as they come back)" if self.debt else "")
        self.notifier.send(f"STATUS=pool {self.name!r}: budget {budget}")
        self.settle_debt()

    def ask_idle_holders_to_shed(self, facts: list[SlotFacts]) -> None:
        slots = self.ledger.slots
        for fact in facts:
            if fact.alive and slots[fact.index].idle:
                channel.send(self.names, PoolNames.worker_socket(fact.index), b"shed")

    # -- events ----------------------------------------------------------------------

    def _enqueue_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wakeup_r, 512):
                pass

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                log.info("pool %r: SIGHUP: counting exactly", self.name)
                self.suspects += 1
            else:
                log.info("pool %r: %s: shutting down", self.name, signal.Signals(signum).name)
                self.running = False

    def handle_control(self) -> None:
        """Serve datagrams from trusted senders: "exit PID" (look now), "budget N"."""
        for message in self.control.receive():
            verb, _, argument = message.decode(errors="replace").partition(" ")
            if verb == "exit":
                continue  # the pass that follows looks at every slot lock
            if verb == "budget":
                try:
                    budget = SETTINGS["POOL_SIZE"][0]("POOL_SIZE", argument)
                except ConfigError as exc:
                    self._bad_request(f"budget request {argument[:32]!r}: {exc}")
                    continue
                self.set_budget(budget)
            else:
                self._bad_request(f"unknown request {verb[:32]!r}")

    def _bad_request(self, what: str) -> None:
        """Count a trusted sender's bad request; log a few, then one line per interval with a count."""
        self.ledger.header.dropped_messages += 1
        now = time.monotonic()
        self._log_tokens = min(BAD_LOG_BURST, self._log_tokens + (now - self._log_refilled) / channel.DROP_LOG_EVERY)
        self._log_refilled = now
        if self._log_tokens < 1:
            self._bad_unlogged += 1
            return
        self._log_tokens -= 1
        log.warning("pool %r: ignored %s%s", self.name, what,
                    f" ({self._bad_unlogged} more bad request(s) since the last line)" if self._bad_unlogged else "")
        self._bad_unlogged = 0

    def check_exit(self, now: float, facts: list[SlotFacts]) -> None:
        if facts or self.pending or self.lost:
            self.idle_since = now
            return
        if self.parent_gone:
            log.info("pool %r: the server that started this coordinator is gone", self.name)
            self.running = False
        elif self.options.exit_when_idle is not None and now - self.idle_since >= self.options.exit_when_idle:
            log.info("pool %r: no worker for %.1f s, exiting", self.name, self.options.exit_when_idle)
            self.running = False

    def _registered(self) -> bool:
        """Tell whether any slot is still taken: by a live worker, or a dead one not yet reclaimed."""
        return bool(self.stable_view()[0]) or bool(self.pending) or bool(self.lost)

    # -- stop ----------------------------------------------------------------------

    def _watch_parent(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.parent_gone = True
            return
        self.selector.register(pidfd, selectors.EVENT_READ, ("parent", None))

    def shutdown(self) -> int:
        self.notifier.send("STOPPING=1")
        ledger = self.ledger
        self.finish_reclaims()
        ledger.header.coordinator_pid = 0
        live = sorted(f.index for f in self.stable_view()[0] if f.alive)
        pids = [ledger.slots[i].pid for i in live]
        removed = None
        if self.options.remove_on_exit and not live:
            # under the registry lock, so no worker claims a slot between our check and the removal
            with ledger.registry_lock():
                live = sorted(locked_bytes(ledger.locks_fd, SLOT_LOCK_BASE, ledger.nslots))
                removed = None if live else ledger.unlink_own()
        if removed is not None:
            log.info("pool %r: removed %s", self.name, ", ".join(removed) or "nothing")
        else:
            log.info("pool %r: coordinator stopped; ledger left for %d running worker(s)%s", self.name,
                     len(live), f" ({', '.join(map(str, pids[:8]))})" if pids else "")
        self.watcher.close()
        self.selector.close()
        self.control.close()
        signal.set_wakeup_fd(-1)
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)
        ledger.close()
        self.claim.release()  # last: the next coordinator may start now
        return 0


def _is_postgres(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().startswith(b"postgres")
    except OSError:
        return False

