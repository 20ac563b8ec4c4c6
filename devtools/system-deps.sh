#!/usr/bin/env bash
# Install what pip cannot: the PostgreSQL server binaries (the tests and the
# demo start their own throwaway cluster with them), a `postgres` OS user
# (initdb refuses root), a C compiler with Python headers (uwsgi builds
# from source), redis-server (the Celery tests start their own broker) and
# PgBouncer (tests/test_proxy.py runs the pool behind one it starts, as user
# postgres, its own config). Does nothing when everything is already there.
# Needs root (apt-get) only when something is missing.
set -euo pipefail

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
log() { printf '=== system-deps: %s\n' "$*"; }

apt_updated=0
apt_install() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "system-deps: missing $*; install them (apt-get install $*) or run as root" >&2
        exit 1
    fi
    if [[ $apt_updated -eq 0 ]]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

have_initdb() {
    command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

if ! have_initdb; then
    log "installing the PostgreSQL server (apt: postgresql)"
    # the tests and the demo start their own clusters: no system cluster on 5432
    mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" >> /etc/postgresql-common/createcluster.conf
    apt_install postgresql
fi
if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    log "creating the postgres OS user"
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || need+=(make)
command -v pgrep >/dev/null 2>&1 || need+=(procps)  # the server tests list a master's children
command -v pgbouncer >/dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]] || need+=(pgbouncer)  # tests/test_proxy.py starts its own
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)  # the Celery tests' broker (started per test)
if command -v "$PYTHON" >/dev/null 2>&1; then
    include=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [[ -f "$include/Python.h" ]] || need+=(python3-dev)
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
else
    need+=(python3 python3-venv python3-dev)
fi
if [[ ${#need[@]} -gt 0 ]]; then
    log "installing build dependencies: ${need[*]}"
    apt_install "${need[@]}"
fi
