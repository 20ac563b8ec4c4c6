#!/usr/bin/env bash
# Run Django's own test suite (tests/runtests.py from the Django sdist) against
# a real PostgreSQL, with the stock postgresql backend or with our ENGINE
# sharedpool.integrations.django.  See --help.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPTS="$REPO/scripts"
DJANGO_SPEC=${DJANGO_SUITE_DJANGO:-Django>=5.2,<5.3}
CACHE=${DJANGO_SUITE_CACHE:-$REPO/.cache}
DEFAULT_LABELS=(backends transactions transaction_hooks select_for_update basic queries)

usage() {
    cat <<EOF
usage: scripts/django_suite.sh [--engine stock|sharedpool] [--driver psycopg2|psycopg] [labels...] [-- runtests options...]

Runs Django's own test suite (tests/runtests.py of the Django sdist matching the
installed Django) against PostgreSQL:
  runtests.py --settings=django_suite_settings --parallel 1 -v 1 LABELS

  --engine stock       django.db.backends.postgresql (default)
  --engine sharedpool  sharedpool.integrations.django (repo installed with pip -e)
  --driver psycopg2    the venv has psycopg2-binary only (default)
  --driver psycopg     the venv has psycopg 3 and psycopg_pool only (Django's pool
                       tests in backends.postgresql then run too)
  labels               Django test labels (default: ${DEFAULT_LABELS[*]})
  -- ARGS              passed to runtests.py as they are (e.g. -- --failfast -k name)
  -h, --help           this text

Environment:
  DATABASE_URL or PGHOST  use that server (PGPORT PGUSER PGPASSWORD too) instead of
                          starting a throwaway PostgreSQL cluster (devtools.pgcluster)
  DJANGO_SUITE_POOL_SIZE  POOL_SIZE for the sharedpool engine (default 8)
  DJANGO_SUITE_VENV       scratch virtualenv (default .cache/djsuite-venv-DRIVER in the repo)
  DJANGO_SUITE_DJANGO     pip requirement for Django (default "Django>=5.2,<5.3")
  DJANGO_SUITE_CACHE      where the sdist is unpacked (default <repo>/.cache)

Each driver has its own venv holding only that driver, so the stock backend
(which prefers psycopg 3 whenever it is importable) and the ENGINE run on the
same one; the ENGINE also gets SHAREDPOOL_DRIVER=DRIVER.
Exit status: that of runtests.py (1 on a setup failure).
EOF
}

log() { echo "django_suite: $*" >&2; }
die() { log "error: $*"; exit 1; }

ENGINE_KIND=stock
DRIVER=psycopg2
LABELS=()
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --engine) [ $# -ge 2 ] || die "--engine needs stock|sharedpool"; ENGINE_KIND=$2; shift 2 ;;
        --engine=*) ENGINE_KIND=${1#--engine=}; shift ;;
        --driver) [ $# -ge 2 ] || die "--driver needs psycopg2|psycopg"; DRIVER=$2; shift 2 ;;
        --driver=*) DRIVER=${1#--driver=}; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -*) die "unknown option $1 (runtests options go after --; see --help)" ;;
        *) LABELS+=("$1"); shift ;;
    esac
done
case "$ENGINE_KIND" in
    stock) ENGINE=django.db.backends.postgresql ;;
    sharedpool) ENGINE=sharedpool.integrations.django ;;
    *) die "--engine must be stock or sharedpool, not '$ENGINE_KIND'" ;;
esac
case "$DRIVER" in
    psycopg2) DRIVER_REQS=(psycopg2-binary); OTHER=psycopg ;;
    psycopg) DRIVER_REQS=("psycopg[binary,pool]"); OTHER=psycopg2 ;;
    *) die "--driver must be psycopg2 or psycopg, not '$DRIVER'" ;;
esac
[ ${#LABELS[@]} -gt 0 ] || LABELS=("${DEFAULT_LABELS[@]}")
VENV=${DJANGO_SUITE_VENV:-$REPO/.cache/djsuite-venv-$DRIVER}

# --- venv -----------------------------------------------------------------
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    log "creating venv $VENV"
    "${PYTHON:-python3}" -m venv "$VENV" || die "${PYTHON:-python3} -m venv $VENV failed"
fi
IMPORTS="import django, $DRIVER"
[ "$DRIVER" = psycopg2 ] || IMPORTS="$IMPORTS, psycopg_pool"
if ! "$PY" -c "$IMPORTS" >/dev/null 2>&1; then
    log "installing $DJANGO_SPEC ${DRIVER_REQS[*]} into $VENV"
    "$PY" -m pip install -q "$DJANGO_SPEC" "${DRIVER_REQS[@]}" || die "pip install failed"
fi
if "$PY" -c "import $OTHER" >/dev/null 2>&1; then
    die "$OTHER is importable in $VENV: the suite on $DRIVER needs a venv without it (DJANGO_SUITE_VENV)"
fi
if [ "$ENGINE_KIND" = sharedpool ]; then
    # Editable install; redone when pyproject.toml changes (or was never done).
    STAMP="$VENV/.sharedpool-editable"
    WANT="$REPO $(cd "$REPO" && sha1sum pyproject.toml | cut -d' ' -f1)"
    if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] \
        || ! "$PY" -c 'import sharedpool' >/dev/null 2>&1; then
        log "pip install -e $REPO"
        "$PY" -m pip install -q -e "$REPO" || die "pip install -e $REPO failed"
        echo "$WANT" >"$STAMP"
    fi
fi
DJANGO_VERSION=$("$PY" -c 'import django; print(django.__version__)') || die "cannot import django"

# --- Django sdist (tests/ is not in the wheel) ---------------------------------
SDIST="$CACHE/django-$DJANGO_VERSION"
if [ ! -f "$SDIST/tests/runtests.py" ]; then
    log "fetching the Django $DJANGO_VERSION sdist into $CACHE"
    mkdir -p "$CACHE" || die "cannot create $CACHE"
    DL=$(mktemp -d "$CACHE/dl.XXXXXX")
    "$PY" -m pip download -q --no-binary :all: --no-deps -d "$DL" "Django==$DJANGO_VERSION" \
        || { rm -rf "$DL"; die "pip download of the Django sdist failed"; }
    TARBALL=$(ls "$DL"/*.tar.gz 2>/dev/null | head -n1)
    [ -n "$TARBALL" ] || { rm -rf "$DL"; die "no sdist tarball downloaded"; }
    tar -xzf "$TARBALL" -C "$DL" || { rm -rf "$DL"; die "cannot unpack $TARBALL"; }
    UNPACKED=$(find "$DL" -mindepth 1 -maxdepth 1 -type d | head -n1)
    rm -rf "$SDIST" && mv "$UNPACKED" "$SDIST" && rm -rf "$DL" || die "cannot place $SDIST"
fi

# --- PostgreSQL -----------------------------------------------------------------
PGDIR=""
cleanup() {
    if [ -n "$PGDIR" ]; then
        (cd "$REPO" && "$PY" -m devtools.pgcluster stop --dir "$PGDIR") >/dev/null 2>&1
        rm -rf "$PGDIR"
        PGDIR=""
    fi
    [ -z "${LOG:-}" ] || rm -f "$LOG"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "${DATABASE_URL:-}" ] || [ -n "${PGHOST:-}" ]; then
    log "using the given server (${DATABASE_URL:-host=$PGHOST port=${PGPORT:-5432}})"
else
    PGDIR=$(mktemp -d /tmp/djsuite-pg.XXXXXX) || die "mktemp failed"
    URL=$(cd "$REPO" && "$PY" -m devtools.pgcluster start --dir "$PGDIR") \
        || die "devtools.pgcluster start failed"
    export DATABASE_URL=$URL
    log "started a throwaway PostgreSQL: $URL"
fi

# --- run --------------------------------------------------------------------------
export DJANGO_SUITE_ENGINE=$ENGINE
[ "$ENGINE_KIND" = stock ] || export SHAREDPOOL_DRIVER=$DRIVER
export PYTHONPATH="$SCRIPTS${PYTHONPATH:+:$PYTHONPATH}"
LOG=$(mktemp /tmp/djsuite-log.XXXXXX)
log "Django $DJANGO_VERSION, engine $ENGINE, driver $DRIVER, labels: ${LABELS[*]}"
START=$(date +%s)
(cd "$SDIST/tests" && "$PY" runtests.py --settings=django_suite_settings --parallel 1 -v 1 \
    "${LABELS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}) 2>&1 | tee "$LOG"
RC=${PIPESTATUS[0]}
WALL=$(( $(date +%s) - START ))

RAN=$(grep -Eo '^Ran [0-9]+ tests? in [0-9.]+s' "$LOG" | tail -n1)
STATUS=$(grep -E '^(OK|FAILED)( \(|$)' "$LOG" | tail -n1)
SKIPPED=$(echo "$STATUS" | grep -Eo 'skipped=[0-9]+' | cut -d= -f2)
RESULT=${STATUS%% *}
DETAIL=$(echo "$STATUS" | sed 's/expected failures=[0-9]*//' | grep -Eo '(failures|errors|unexpected successes)=[0-9]+' | paste -sd' ' -)
rm -f "$LOG"
echo "django_suite: engine=$ENGINE_KIND driver=$DRIVER Django $DJANGO_VERSION: ${RAN:-no test run}," \
    "${RESULT:-no result}${DETAIL:+ ($DETAIL)}, skipped ${SKIPPED:-0}, wall ${WALL}s, exit $RC"
exit "$RC"
