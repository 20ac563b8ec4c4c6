"""Views driven by the load generator.

/health   no database (readiness probe)
/read     one primary-key lookup through the ORM
/slow     a query that takes ?ms= milliseconds (default 10), then a read
/session  session features: server-side cursor, SET LOCAL, advisory lock,
          prepared statement (and a plain session SET, reported as extra);
          200 when every feature behaved, 500 with the details otherwise
"""
import os
import random
import secrets

from django.db import connection, transaction
from django.http import JsonResponse

from .models import Item

ROWS = int(os.environ.get("BENCH_ROWS", "10000"))
CURSOR_ROWS = 200
CURSOR_CHUNK = 20


def health(request):
    return JsonResponse({"ok": True, "pid": os.getpid()})


def _read_one():
    pk = random.randint(1, ROWS)
    return Item.objects.filter(pk=pk).values("id", "name", "value").first()


def read(request):
    return JsonResponse({"item": _read_one()})


def slow(request):
    ms = float(request.GET.get("ms", "10"))
    with connection.cursor() as cur:
        cur.execute("SELECT pg_sleep(%s)", [ms / 1000.0])
    return JsonResponse({"item": _read_one(), "slept_ms": ms})


# --- session features ------------------------------------------------------

def _server_side_cursor():
    # Outside a transaction Django declares a WITH HOLD cursor and FETCHes it
    # in chunks, each FETCH its own transaction: the cursor lives in the
    # server session, so every FETCH must reach the same server connection.
    qs = Item.objects.order_by("id").values_list("id", flat=True)[:CURSOR_ROWS]
    got = list(qs.iterator(chunk_size=CURSOR_CHUNK))
    expected = list(range(1, CURSOR_ROWS + 1))
    if got != expected:
        return False, f"got {len(got)} rows, first {got[:3]}"
    return True, ""


def _set_local():
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = '4321ms'")
            cur.execute("SHOW statement_timeout")
            inside = cur.fetchone()[0]
    with connection.cursor() as cur:
        cur.execute("SHOW statement_timeout")
        after = cur.fetchone()[0]
    if inside != "4321ms":
        return False, f"inside transaction: {inside}"
    if after == "4321ms":
        return False, "SET LOCAL leaked past COMMIT"
    return True, ""


def _advisory_lock():
    key = random.getrandbits(62)
    with connection.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s)", [key])
        if not cur.fetchone()[0]:
            return False, "lock not granted"
        cur.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            " AND pid = pg_backend_pid() AND granted"
            " AND ((classid::bigint << 32) | objid::bigint) = %s",
            [key],
        )
        held = cur.fetchone()[0]
        cur.execute("SELECT pg_advisory_unlock(%s)", [key])
        released = cur.fetchone()[0]
    if not held:
        return False, "lock not held by this session on the next statement"
    if not released:
        return False, "unlock ran in another session (lock leaked)"
    return True, ""


def _prepared_statement():
    name = "bench_ps_" + secrets.token_hex(6)
    with connection.cursor() as cur:
        cur.execute(f"PREPARE {name} (int) AS SELECT $1::int + 1")
        cur.execute(f"EXECUTE {name} (41)")
        value = cur.fetchone()[0]
        cur.execute(f"DEALLOCATE {name}")
    if value != 42:
        return False, f"EXECUTE returned {value}"
    return True, ""


def _session_set():
    token = secrets.token_hex(6)
    with connection.cursor() as cur:
        cur.execute(f"SET bench.token = '{token}'")
        cur.execute("SELECT current_setting('bench.token', true)")
        seen = cur.fetchone()[0]
    if seen != token:
        return False, f"SET not visible to the next statement (saw {seen!r})"
    return True, ""


FEATURES = {
    "server_side_cursor": _server_side_cursor,
    "set_local": _set_local,
    "advisory_lock": _advisory_lock,
    "prepared_statement": _prepared_statement,
    "session_set": _session_set,  # extra: plain session-level SET
}


def session(request):
    results = {}
    for name, fn in FEATURES.items():
        try:
            ok, detail = fn()
        except Exception as exc:  # noqa: BLE001 - psycopg2 errors escape Django's wrapper on cursor close
            ok, detail = False, f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        results[name] = {"ok": ok, "error": detail}
    all_ok = all(r["ok"] for r in results.values())
    return JsonResponse({"ok": all_ok, "features": results}, status=200 if all_ok else 500)
