#!/usr/bin/env bash
# Install what bench/run.py needs, idempotently:
#   - Debian packages wrk and pgbouncer (apt-get; the bench starts its own
#     PgBouncer per run, never the system service), and the PostgreSQL server
#     binaries unless DATABASE_URL is set or initdb is already there;
#   - .venv with this project and its `bench` extra (Django, gunicorn,
#     SQLAlchemy, psycopg, django-db-connection-pool, matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
VENV=${VENV:-.venv}

SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v pgbouncer >/dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]] || need+=(pgbouncer)
if [[ -z "${DATABASE_URL:-}" ]] && ! command -v initdb >/dev/null 2>&1 \
        && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    need+=(postgresql)
fi
if [[ ${#need[@]} -gt 0 ]]; then
    echo "bench/setup.sh: apt-get install ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    # initdb and pgbouncer refuse root; the bench runs them as this user
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.bench-installed-$(cksum < pyproject.toml | cut -d' ' -f1)"
if [[ ! -e $stamp ]]; then
    echo "bench/setup.sh: pip install -e .[bench] into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[bench]'
    touch "$stamp"
fi
