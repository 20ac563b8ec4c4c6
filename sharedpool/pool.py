"""Keep this process's connections: a LIFO pool per target, under a per-host budget.

Runs in the worker. ``ProcessBudget`` is this process's share of one pool
NAME (its ledger slot, permits, per-process cap, shed listener); each
``LocalPool`` holds the idle connections of one connection target (Django
alias and database) and draws on its budget. Every open connection holds
exactly one permit, taken before connect and posted after a synchronous
close, so the server never sees more backends than the budget.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from . import drivers, forksafe
from .config import PoolConfig
from .embedded import attach_or_start
from .errors import ConfigError, PoolClosed, PoolTimeout, PoolUnavailable
from .ledger import FLAG_BACKENDS_LOCAL, MAX_BACKENDS
from .permits import PermitGate
from .pressure import ShedListener, others_waiting, request_shed

log = logging.getLogger("sharedpool")

CLOSE_WAIT = 2.0  # seconds to wait for the server to confirm a closed backend has exited
SHED_PENDING_FOR = 1.0  # seconds a shed request waits for a busy connection to come back
MIN_STINT = 0.2  # seconds a busy connection is kept before a shed request may close it (no churn)
IDLE_SETTLED = 0.02  # seconds idle after which a connection is not merely between two requests
LOCAL_RETURN_CHECK = 0.02  # seconds between looks for a connection returned by another thread while waiting
HANDOVER_YIELD = 0.03  # seconds at most a process that just handed a permit over lets the waiter take it
_IDLE = drivers.IDLE
_RESETTABLE = (drivers.INTRANS, drivers.INERROR)
_LOCAL_HOSTS = frozenset(("localhost", "127.0.0.1", "::1"))


class _Entry:
    __slots__ = ("conn", "pool", "created", "last_used", "backend_index")

    def __init__(self, conn: Any, pool: "LocalPool", now: float, backend_index: int) -> None:
        self.conn = conn
        self.pool = pool
        self.created = now
        self.last_used = now
        self.backend_index = backend_index


class ProcessBudget:
    """This process's share of one pool NAME. Created lazily, in the process that uses it."""

    _by_name: dict[str, "ProcessBudget"] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def for_config(cls, config: PoolConfig) -> "ProcessBudget":
        with cls._registry_lock:
            budget = cls._by_name.get(config.name)
            if budget is None or budget.closed:
                budget = cls._by_name[config.name] = cls(config)
            elif budget.config.pool_size != config.pool_size:
                raise ConfigError(
                    f"pool {config.name!r}: POOL_SIZE {config.pool_size} disagrees with "
                    f"{budget.config.pool_size} configured earlier in this process"
                )
            return budget

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.name = config.name
        self.max_open = config.max_per_process
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.pools: "weakref.WeakSet[LocalPool]" = weakref.WeakSet()
        self.closed = False
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self.pid = 0
        self.ledger = None
        self.gate: PermitGate | None = None
        self.slot = None
        self.listener: ShedListener | None = None
        self.open = 0  # connections open or being opened by this process
        self.idle = 0
        self.in_use = 0
        self.global_waiters = 0
        self.local_waiters = 0  # threads of this process waiting at the per-process cap
        self.shed_pending = 0
        self.shed_pending_until = 0.0
        self.handed_over_at = 0.0
        self.backend_free = list(range(MAX_BACKENDS - 1, -1, -1))
        self.all_local = True

    # -- process lifecycle ---------------------------------------------------------

    def ensure_ready(self) -> None:
        """Attach and register in this process (first use, or first use after fork)."""
        if self.pid:
            return  # reset to 0 in a forked child
        with self.lock:
            if self.pid:
                return
            if self.closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            gate = self._register()
            try:
                interval = min(v for v in (self.config.max_idle, self.config.recycle, 60.0) if v is not None)
                self.listener = ShedListener(self, os.getpid(), max(interval / 2, 0.5))
            except BaseException:
                gate.deregister()
                raise
            self.gate, self.slot = gate, gate.slot
            self.pid = os.getpid()

    def _register(self) -> PermitGate:
        """Claim a slot in the pool's current ledger (under self.lock).

        A coordinator exiting idle may unlink the ledger just as we attach; a
        slot in an unlinked ledger would be a second budget, so follow the name.
        """
        for _ in range(3):
            if self.ledger is None:
                self.ledger = attach_or_start(self.config)
            gate = PermitGate(self.ledger, on_pressure=self._on_pressure)
            gate.register()
            if self.ledger.is_current():
                return gate
            gate.deregister()
            self.ledger.close()
            self.ledger = None
        raise PoolUnavailable(f"pool {self.name!r}: the ledger keeps being replaced while attaching")

    def forget_after_fork(self) -> None:
        """Child after fork: drop the parent's connections and slot without any I/O."""
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        for pool in list(self.pools):
            pool.forget_after_fork()
        if self.listener is not None:
            self.listener.sock.close()  # our copy only: the parent keeps listening on its own
        ledger = self.ledger
        self._reset_process_state()
        if ledger is not None:
            ledger.after_fork_in_child()
        self.ledger = ledger  # the mapping and semaphore are inherited and valid here

    def close(self) -> None:
        """Close this process's idle connections and free its slot once nothing is open (exit).

        Connections other threads still have checked out keep their permits
        until they come back (then they are closed), or until the process dies
        and the coordinator sees their backends gone: never before.
        """
        if self.pid != os.getpid():
            return
        with self.lock:
            self.closed = True  # from now on a returned connection is closed, not parked
            self.pid = 0  # the next checkout raises PoolClosed
            if self.listener is not None:
                self.listener.close()
                self.listener = None
        for pool in list(self.pools):
            pool.close()
        with self.lock:
            finished = self.open == 0
        if finished:
            self._deregister()

    def _deregister(self) -> None:
        with self.lock:
            gate, self.gate = self.gate, None
        if gate is not None:
            gate.deregister()

    # -- permits and the per-process cap ---------------------------------------------

    def _publish(self) -> None:
        """Mirror the counts into our slot (under self.lock)."""
        slot = self.slot
        if self.idle and not slot.idle:
            slot.idle_since = time.time()
        slot.idle = self.idle
        slot.in_use = self.in_use

    def may_reserve(self) -> bool:
        """Tell whether a thread may count a new connection in (under self.lock).

        Below MAX_PER_PROCESS, and only one thread per process waits at the
        semaphore while others hold connections: the rest wait on ``cond``,
        where a connection another thread returns reaches them at once.
        """
        return self.open < self.max_open and not (self.global_waiters and self.in_use)

    def _on_pressure(self) -> None:
        request_shed(self.ledger, self.gate.slot_index)

    def take_permit(self, deadline: float, timeout: float, pool: "LocalPool") -> bool:
        """Take one permit for a connection about to open (self.open already counted it).

        Returns False, holding no permit, when a connection of ``pool`` came
        back in this process meanwhile: taking that one costs no reconnect.
        """
        gate = self.gate
        if time.monotonic() - self.handed_over_at < HANDOVER_YIELD:
            self._let_waiters_go_first()
        if gate.try_acquire():
            return True
        with self.lock:
            other = self._pop_lru_idle(exclude=pool)
            self.global_waiters += 1
        if other is not None:
            other.pool._close_entry(other)  # an idle connection to another target: its permit is ours
        self.listener.nudge()
        try:
            if self.in_use > 1:
                # other threads here hold connections: one may come back before any permit does
                return gate.acquire(
                    max(deadline - time.monotonic(), 0.0), reported_timeout=timeout,
                    give_up=lambda: bool(pool._idle), wait_slice=LOCAL_RETURN_CHECK,
                )
            return gate.acquire(max(deadline - time.monotonic(), 0.0), reported_timeout=timeout)
        finally:
            with self.lock:
                self.global_waiters -= 1
                if self.local_waiters:
                    self.cond.notify()  # another thread here may now take its turn at the semaphore

    def _let_waiters_go_first(self) -> None:
        """Don't barge: a woken waiter may need milliseconds to take the permit we posted."""
        sem, own = self.ledger.sem, self.gate.slot_index
        deadline = self.handed_over_at + HANDOVER_YIELD
        while sem.value > 0 and others_waiting(self.ledger, own) and time.monotonic() < deadline:
            time.sleep(0.001)

    def give_back(self, entry: _Entry | None, *, in_use: bool = False) -> None:
        """Post the permit of a closed (or never opened) connection, then uncount it.

        Posting first means a concurrent close() cannot see this connection gone
        and deregister (posting every recorded permit) while ours is still held.
        """
        if entry is not None:
            with self.lock:
                self.slot.backends[entry.backend_index] = 0
                self.backend_free.append(entry.backend_index)
                self.slot.closed += 1
        self.gate.release()
        self.unreserve(in_use=in_use)

    def unreserve(self, *, in_use: bool = True) -> None:
        """Uncount a connection that is no longer open (and, if ``in_use``, was checked out)."""
        with self.lock:
            if in_use:
                self.in_use -= 1
                self._publish()
            self.open -= 1
            if self.local_waiters:
                self.cond.notify()
            last = self.closed and self.open == 0
        if last:
            self._deregister()

    def should_hand_over(self, entry: _Entry) -> bool:
        """Tell whether a returned connection should be closed for a waiter elsewhere (under self.lock)."""
        if self.shed_pending:
            now = time.monotonic()
            if now - entry.created < MIN_STINT:
                return False  # served too briefly: keep it, the request stays pending
            if now < self.shed_pending_until and others_waiting(self.ledger, self.gate.slot_index):
                self.shed_pending -= 1
                self.slot.sheds += 1
                self.handed_over_at = now
                return True
            self.shed_pending = 0  # expired, or the waiter was served meanwhile
        return False

    # -- shedding and expiry (listener thread) ---------------------------------------

    def shed_one(self, requested: bool = True) -> None:
        """Close the least recently used idle connection for a waiter elsewhere.

        Called by the listener for each request, and again (``requested=False``)
        while a request is pending and an idle connection is about to settle.
        """
        if self.pid != os.getpid():
            return
        now = time.monotonic()
        with self.lock:
            if not requested and not (self.shed_pending and others_waiting(self.ledger, self.gate.slot_index)):
                self.shed_pending = 0
                return
            entry = self._pop_lru_idle(settled_by=now)
            if entry is None:
                if requested and (self.in_use or self.idle):
                    # busy, or idle only for a moment between requests: hand over after the stint
                    self.shed_pending = min(self.shed_pending + 1, self.in_use + self.idle)
                    self.shed_pending_until = now + SHED_PENDING_FOR
                return
            if not requested:
                self.shed_pending -= 1
            self.slot.sheds += 1
            self.handed_over_at = now
        entry.pool._close_entry(entry)

    def _pop_lru_idle(self, exclude: "LocalPool | None" = None, settled_by: float | None = None) -> _Entry | None:
        """Pop the least recently used idle connection (under self.lock).

        With ``settled_by`` (now), only one that served its minimum stint or has
        really gone idle qualifies: shedding a connection between two requests
        of a busy worker would only trade permits for reconnects.
        """
        victim = None
        for pool in self.pools:
            if pool is exclude or not pool._idle:
                continue
            oldest = pool._idle[0]
            if settled_by is not None and not (
                settled_by - oldest.created >= MIN_STINT or settled_by - oldest.last_used >= IDLE_SETTLED
            ):
                continue
            if victim is None or oldest.last_used < victim._idle[0].last_used:
                victim = pool
        if victim is None:
            return None
        entry = victim._idle.pop(0)
        self.idle -= 1
        self._publish()
        return entry

    def maintain(self) -> None:
        """Close idle connections past MAX_IDLE (above MIN_IDLE) or RECYCLE."""
        if self.pid != os.getpid():
            return
        now = time.monotonic()
        max_idle, recycle, keep = self.config.max_idle, self.config.recycle, self.config.min_idle
        expired = []
        with self.lock:
            for pool in self.pools:
                for entry in list(pool._idle):
                    stale = recycle is not None and now - entry.created >= recycle
                    unused = max_idle is not None and now - entry.last_used >= max_idle and self.idle > keep
                    if stale or unused:
                        pool._idle.remove(entry)
                        self.idle -= 1
                        expired.append(entry)
            if expired:
                self._publish()
        for entry in expired:
            entry.pool._close_entry(entry)


class LocalPool:
    """Thread-safe pool of connections to one target, inside one process.

    Runs in the worker. Connections come back with ``putconn`` (rolled back, or
    discarded if broken); the pool may be used before and after fork. DRIVER
    picks psycopg 3 or psycopg2; ``connect`` replaces that driver's connect
    function (it must return that driver's connections).
    """

    def __init__(
        self,
        config: PoolConfig,
        dsn: str | None = None,
        *,
        connect: Callable[..., Any] | None = None,
        **connect_kwargs: Any,
    ) -> None:
        self.config = config
        self.driver = drivers.get(config.driver)
        self.budget = ProcessBudget.for_config(config)
        self.budget.pools.add(self)
        self._connect = connect or self.driver.connect
        self._status = self.driver.transaction_status
        self._connect_args = (dsn,) if dsn is not None else ()
        self._connect_kwargs = _with_server_options(config, connect_kwargs)
        # None means never: infinity keeps the warm checkout path to plain comparisons
        self._recycle = float("inf") if config.recycle is None else config.recycle
        self._pre_ping = float("inf") if config.pre_ping is None else config.pre_ping
        self._idle: list[_Entry] = []  # LIFO: the warmest connection is at the end
        self._out: dict[int, _Entry] = {}
        self._stats = dict.fromkeys(STAT_KEYS, 0)

    # -- checkout ----------------------------------------------------------------------

    def getconn(self, timeout: float | None = None) -> Any:
        """Check a connection out, waiting at most ``timeout`` (default TIMEOUT) seconds."""
        budget = self.budget
        if not budget.pid:
            budget.ensure_ready()
        if timeout is None:
            timeout = self.config.timeout
        now = time.monotonic()
        deadline = now + timeout
        count = True
        while True:
            entry = self._take_idle_or_reserve(deadline, timeout, count)
            count = False
            if entry is None:
                conn = self._open_new(deadline, timeout)
                if conn is not None:
                    return conn
                now = time.monotonic()
                continue
            conn = entry.conn
            if not (conn.closed or now - entry.created >= self._recycle or now - entry.last_used >= self._pre_ping):
                self._out[id(conn)] = entry  # the warm path: nothing to check
                return conn
            try:
                problem = self._problem(entry, now)
            except BaseException:  # e.g. gevent.Timeout during the ping: don't strand its permit
                self._close_entry(entry, checked_out=True)
                raise
            if problem is None:
                self._out[id(entry.conn)] = entry
                return entry.conn
            if problem == "lost":
                with budget.lock:
                    self._stats["connections_lost"] += 1
            self._close_entry(entry, checked_out=True)
            now = time.monotonic()

    def _take_idle_or_reserve(self, deadline: float, timeout: float, count: bool) -> _Entry | None:
        """Pop the warmest idle connection, or count a new one in; wait at the cap."""
        budget = self.budget
        with budget.lock:
            if count:
                self._stats["requests_num"] += 1
            waited = False
            while True:
                if budget.closed:
                    raise PoolClosed(f"pool {self.config.name!r} is closed")
                idle = self._idle
                if idle:
                    entry = idle.pop()
                    budget.idle -= 1
                    budget.in_use += 1
                    slot = budget.slot  # _publish(), inlined: a connection left idle is no news
                    slot.idle = budget.idle
                    slot.in_use = budget.in_use
                    return entry
                if budget.may_reserve():
                    budget.open += 1
                    budget.in_use += 1
                    budget._publish()
                    return None
                other = budget._pop_lru_idle(exclude=self)
                if other is not None:
                    budget.lock.release()
                    try:
                        other.pool._close_entry(other)
                    finally:
                        budget.lock.acquire()
                    continue
                remaining = deadline - time.monotonic()
                if not waited:
                    self._stats["requests_waiting"] += 1
                    waited = True
                budget.local_waiters += 1
                try:
                    woken = remaining > 0 and budget.cond.wait(remaining)
                finally:
                    budget.local_waiters -= 1
                if not woken:
                    if self._idle or budget.may_reserve():
                        continue
                    self._stats["requests_errors"] += 1
                    if budget.open < budget.max_open:  # behind this process's own permit waiter
                        raise budget.gate.timeout_error(timeout)
                    raise PoolTimeout(
                        f"pool {self.config.name!r}: no connection after {timeout:.1f} s "
                        f"(MAX_PER_PROCESS {budget.max_open} reached in process {os.getpid()}: "
                        f"{budget.in_use} in use, {budget.idle} idle)"
                    )

    def _open_new(self, deadline: float, timeout: float) -> Any | None:
        """Take a permit and connect; None if a connection came back here meanwhile."""
        budget = self.budget
        started = time.monotonic()
        try:
            permitted = budget.take_permit(deadline, timeout, self)
        except BaseException:
            with budget.lock:
                self._stats["requests_errors"] += 1
            budget.unreserve()
            raise
        if not permitted:
            budget.unreserve()
            return None
        waited_ms = int((time.monotonic() - started) * 1000.0)
        slot = budget.slot
        with budget.lock:
            self._stats["requests_wait_ms"] += waited_ms
            slot.connecting += 1
        try:
            conn = self._connect(*self._connect_args, **self._connect_kwargs)
        except BaseException:
            with budget.lock:
                slot.connecting -= 1
                self._stats["connections_errors"] += 1
            budget.give_back(None, in_use=True)
            raise
        backend_pid = conn.info.backend_pid
        local = _backend_is_local(conn, backend_pid)
        with budget.lock:
            index = budget.backend_free.pop()
            slot.backends[index] = backend_pid
            slot.connecting -= 1
            slot.opened += 1
            self._stats["connections_num"] += 1
            if not local:
                budget.all_local = False
            if budget.all_local:
                slot.flags |= FLAG_BACKENDS_LOCAL
            else:
                slot.flags &= ~FLAG_BACKENDS_LOCAL
        entry = _Entry(conn, self, time.monotonic(), index)
        self._out[id(conn)] = entry
        return conn

    def _problem(self, entry: _Entry, now: float) -> str | None:
        """Return why an idle connection must not be handed out ("lost", "recycled"), or None."""
        conn = entry.conn
        if conn.closed:
            return "lost"
        if now - entry.created >= self._recycle:
            return "recycled"
        if now - entry.last_used >= self._pre_ping:
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                if not conn.autocommit:
                    conn.rollback()
            except self.driver.Error:
                return "lost"
        return None

    # -- return ------------------------------------------------------------------------

    def putconn(self, conn: Any, *, discard: bool = False) -> None:
        """Give a connection back: rolled back and kept, or closed if broken or asked for."""
        entry = self._out.pop(id(conn), None)
        if entry is None:
            return  # dropped after fork, or already returned
        bad = False
        if discard or conn.closed:
            discard = True
        else:
            try:
                status = self._status(conn)
                if status != _IDLE:
                    if status in _RESETTABLE:
                        conn.rollback()
                    else:
                        bad = True  # a query still running, or a lost connection
            except self.driver.Error:
                bad = True
            except BaseException:  # e.g. gevent.Timeout during the rollback: don't strand the permit
                self._close_entry(entry, checked_out=True)
                raise
        budget = self.budget
        with budget.lock:
            if bad:
                self._stats["returns_bad"] += 1
            elif not (discard or budget.closed or (budget.shed_pending and budget.should_hand_over(entry))):
                entry.last_used = time.monotonic()
                self._idle.append(entry)
                budget.idle += 1
                budget.in_use -= 1
                budget._publish()
                if budget.local_waiters:
                    budget.cond.notify()
                return
        self._close_entry(entry, checked_out=True)

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Any]:
        """Check out for a block; roll back on error, return on exit."""
        conn = self.getconn(timeout)
        try:
            yield conn
        except BaseException:
            if not conn.closed:
                with contextlib.suppress(self.driver.Error):
                    conn.rollback()
            raise
        finally:
            self.putconn(conn)

    # -- closing -----------------------------------------------------------------------

    def _close_entry(self, entry: _Entry, *, checked_out: bool = False) -> None:
        """Close synchronously, then give the permit back (never the other way round)."""
        close_synchronously(entry.conn, self.driver.Error)
        self.budget.give_back(entry, in_use=checked_out)

    def close(self) -> None:
        """Close the idle connections; checked-out ones close when returned."""
        with self.budget.lock:
            idle, self._idle = self._idle, []
            self.budget.idle -= len(idle)
            if self.budget.slot is not None:
                self.budget._publish()
        for entry in idle:
            self._close_entry(entry)

    def forget_after_fork(self) -> None:
        # Emptied first: a connection class whose close() returns to this pool finds nothing to give back.
        entries = [*self._idle, *self._out.values()]
        self._idle = []
        self._out = {}
        for entry in entries:
            drop_without_io(entry.conn, self.driver.Error)
        self._stats = dict.fromkeys(STAT_KEYS, 0)

    # -- stats -------------------------------------------------------------------------

    def get_stats(self) -> dict[str, int]:
        """Counters since start plus current gauges (psycopg_pool's ``get_stats`` keys)."""
        budget = self.budget
        return {
            **self._stats,
            "pool_max": budget.max_open,
            "pool_size": budget.open,
            "pool_available": len(self._idle),
            "pool_in_use": len(self._out),
            "budget": self.config.pool_size,
        }

    def pop_stats(self) -> dict[str, int]:
        stats = self.get_stats()
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        return stats


STAT_KEYS = (
    "requests_num",
    "requests_waiting",
    "requests_wait_ms",
    "requests_errors",
    "returns_bad",
    "connections_num",
    "connections_errors",
    "connections_lost",
)


def close_synchronously(conn: Any, driver_error: type[Exception] = OSError) -> None:
    """Close and wait until the server side is gone, so its permit is really free.

    PostgreSQL keeps a backend's socket open until the process has exited
    (pqcomm.c, "synchronous close"), so EOF on a duplicate of our socket means
    the backend no longer counts against max_connections. ``driver_error`` is
    the Error class of the connection's driver (a lost connection has no socket).
    """
    try:
        fd = os.dup(conn.fileno())
    except (driver_error, OSError, ValueError):
        fd = -1
    with contextlib.suppress(driver_error):
        conn.close()
    if fd < 0:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        deadline = time.monotonic() + CLOSE_WAIT
        # unread messages (NOTIFY, ParameterStatus) also wake poll: read until EOF
        while (left := deadline - time.monotonic()) > 0 and poller.poll(left * 1000):
            if not os.read(fd, 65536):
                break
    except OSError:
        pass  # reset by the server: it is gone
    finally:
        os.close(fd)


def drop_without_io(conn: Any, driver_error: type[Exception] = OSError) -> None:
    """Forget an inherited connection without a byte reaching its server.

    Closing a connection (either driver: libpq's PQfinish) sends Terminate,
    which would end the parent's session; pointing our copy of the descriptor
    at /dev/null first makes the close harmless to the parent.
    """
    if conn.closed:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, conn.fileno())
    finally:
        os.close(devnull)
    with contextlib.suppress(driver_error):
        conn.close()


def _with_server_options(config: PoolConfig, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Tag connections and let the server drop the backends of dead workers quickly."""
    kwargs = dict(kwargs)
    kwargs.setdefault("application_name", f"sharedpool/{config.name}")
    if config.check_interval is not None:
        option = f"-c client_connection_check_interval={int(config.check_interval * 1000)}"
        kwargs["options"] = f"{kwargs['options']} {option}" if kwargs.get("options") else option
    return kwargs


def _backend_is_local(conn: Any, backend_pid: int) -> bool:
    """Tell whether this host's /proc shows the backend, so the coordinator can watch it exit."""
    host = conn.info.host or ""
    if not (host.startswith("/") or host in _LOCAL_HOSTS):
        return False
    try:
        with open(f"/proc/{backend_pid}/comm", "rb") as f:
            return f.read().startswith(b"postgres")
    except OSError:
        return False


def _forget_all_after_fork() -> None:
    ProcessBudget._registry_lock = threading.Lock()  # another thread may have held it at fork
    for budget in list(ProcessBudget._by_name.values()):
        budget.forget_after_fork()


def close_all(name: str | None = None) -> None:
    """Close this process's pools (all, or those of pool NAME) and free their slots.

    Runs at exit, from a server's worker-exit hook or a test's teardown. A
    later checkout through a new LocalPool starts afresh.
    """
    with ProcessBudget._registry_lock:
        budgets = [b for n, b in ProcessBudget._by_name.items() if name is None or n == name]
    for budget in budgets:
        budget.close()


forksafe.register(_forget_all_after_fork)
atexit.register(close_all)
