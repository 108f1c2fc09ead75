#!/usr/bin/env bash
# The team stack, locally: PostgreSQL (MLflow's tracking store and basic-auth's user store), an S3
# endpoint (moto_server) and an MLflow tracking server with proxied S3 artifacts (clients need no S3
# credentials).
#   scripts/stack.sh start [--auth]   # --auth: MLflow basic-auth (admin/password from the env)
#   scripts/stack.sh stop
#   scripts/stack.sh backup DIR       # pg_dump of both databases + a copy of the artifact bucket
#   scripts/stack.sh restore DIR      # a backup into the running stack (a fresh one after a loss)
# Replace moto_server with your real S3/MinIO by setting MLFLOW_S3_ENDPOINT_URL and skipping it.
# Everything the stack keeps (PostgreSQL's data folder, its password, logs, pids, the auth config) lives
# in $MAMMOSEG_STACK_DIR (default artifacts/stack). Run as root, PostgreSQL runs as the `postgres` user,
# which must be able to reach that folder.
set -euo pipefail
# Paths the caller gives (DIR, MAMMOSEG_STACK_DIR) are relative to where it runs the script from.
from_caller() { (cd "$caller_dir" && realpath -m "$1"); }
caller_dir="$PWD"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
state="$(if [ -n "${MAMMOSEG_STACK_DIR:-}" ]; then from_caller "$MAMMOSEG_STACK_DIR"; else realpath -m artifacts/stack; fi)"
pgdata="$state/postgres"
# 5433: 5432 is where a Debian machine's own PostgreSQL cluster listens.
pg_port="${MAMMOSEG_PG_PORT:-5433}"
s3_port="${MAMMOSEG_S3_PORT:-9000}"
mlflow_port="${MAMMOSEG_MLFLOW_PORT:-5000}"
mlflow_workers="${MAMMOSEG_MLFLOW_WORKERS:-4}"
bucket="${MAMMOSEG_BUCKET:-mlflow}"
# The tracking store and the user store: two databases of the one PostgreSQL server.
databases=(mlflow mlflow_auth)

die() { echo "scripts/stack.sh: $*" >&2; exit 1; }

# --- PostgreSQL: its own data folder, 127.0.0.1 only, password auth, run as a non-root user ----------

# Debian keeps initdb/pg_ctl off PATH (under /usr/lib/postgresql/<version>/bin); take PATH's first.
initdb_path="$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)"
pg_bindir="${initdb_path:+$(dirname "$(realpath "$initdb_path")")}"

as_db_owner() {
    # PostgreSQL refuses to run as root; from / because the caller's folder may be closed to that user.
    if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# libpq (psql, pg_dump, and psycopg inside the MLflow server) reads the password from this file, so it
# never appears in a URI, a command line or a log.
export PGPASSFILE="$state/pgpass" PGHOST=127.0.0.1 PGPORT="$pg_port" PGUSER=mlflow
db_uri() { echo "postgresql+psycopg://mlflow@127.0.0.1:$pg_port/$1"; }

postgres_running() { [ -n "$pg_bindir" ] && as_db_owner "$pg_bindir/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; }

init_postgres() {
    [ -n "$pg_bindir" ] || die "PostgreSQL not found: no initdb on PATH or under /usr/lib/postgresql (Debian: apt-get install postgresql)"
    [ -f "$pgdata/PG_VERSION" ] && return
    mkdir -p "$pgdata"
    if [ ! -f "$PGPASSFILE" ]; then
        (umask 077 && printf '127.0.0.1:*:*:mlflow:%s\n' "$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" >"$PGPASSFILE")
    fi
    # initdb wants an empty folder and a file for the password; the file goes as soon as it has read it.
    local pwfile="$state/.pwfile"
    (umask 077 && cut -d: -f5 "$PGPASSFILE" >"$pwfile")
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$pgdata" "$pwfile"
        as_db_owner test -w "$pgdata" \
            || die "$pgdata: the postgres user cannot reach it; set MAMMOSEG_STACK_DIR to a folder it can"
    fi
    as_db_owner "$pg_bindir/initdb" -D "$pgdata" -U mlflow --pwfile="$pwfile" --auth=scram-sha-256 \
        -E UTF8 --locale=C >"$state/initdb.log" 2>&1 || die "initdb failed: $state/initdb.log"
    rm -f "$pwfile"
    # TCP on the loopback only, no Unix socket (the port is given at each start).
    printf "listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n" >>"$pgdata/postgresql.conf"
}

start_postgres() {
    init_postgres
    if ! postgres_running; then
        touch "$state/postgres.log"
        [ "$(id -u)" -ne 0 ] || chown postgres: "$state/postgres.log"
        as_db_owner "$pg_bindir/pg_ctl" -D "$pgdata" -l "$state/postgres.log" -o "-p $pg_port" -w -t 60 start \
            >/dev/null || die "PostgreSQL did not start: $state/postgres.log"
    fi
    local db
    for db in "${databases[@]}"; do
        [ -n "$("$pg_bindir/psql" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ] \
            || "$pg_bindir/createdb" "$db"
    done
}

stop_postgres() {
    postgres_running || return 0
    as_db_owner "$pg_bindir/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null
}

# --- S3 and the MLflow server -----------------------------------------------------------------------

s3_env() {
    export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
    export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
    export MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL:-http://127.0.0.1:$s3_port}"
}

running() { [ -f "$state/$1.pid" ] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; }

start() {
    source scripts/venv.sh
    mkdir -p "$state"
    running mlflow && die "the stack in $state is running already (scripts/stack.sh stop first)"
    s3_env
    start_postgres
    if [ "$MLFLOW_S3_ENDPOINT_URL" = "http://127.0.0.1:$s3_port" ]; then
        # setsid: its own process group, so that stop ends the server and every worker it forked.
        setsid moto_server -H 127.0.0.1 -p "$s3_port" >"$state/moto.log" 2>&1 &
        echo $! >"$state/moto.pid"
        for _ in $(seq 1 50); do curl -sf "$MLFLOW_S3_ENDPOINT_URL" >/dev/null && break; sleep 0.2; done
    fi
    python scripts/bucket.py create "$bucket"
    auth=()
    if [ "${1:-}" = "--auth" ]; then
        auth=(--app-name basic-auth)
        export MLFLOW_AUTH_CONFIG_PATH="$state/basic_auth.ini"
        # Flask's CSRF protection needs a fixed secret shared by every server process.
        export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
        # The admin password is in this file: readable by its owner only. A password check hashes the
        # password (tens of ms); the cache keeps a training run's hundreds of requests from paying it each
        # time, at the cost of a changed password being accepted by other workers for up to 60 s.
        (umask 077 && printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = %s\nadmin_password = %s\nauth_cache_ttl_seconds = 60\n' \
            "$(db_uri mlflow_auth)" "${MLFLOW_ADMIN_USERNAME:-admin}" "${MLFLOW_ADMIN_PASSWORD:?set MLFLOW_ADMIN_PASSWORD}" \
            >"$MLFLOW_AUTH_CONFIG_PATH")
    fi
    # The server's job runner serves GenAI features (scorers, evaluations, prompt optimisation) that this
    # project does not use; it would be eight more Python processes on the machine.
    export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
    setsid mlflow server "${auth[@]}" --backend-store-uri "$(db_uri mlflow)" \
        --artifacts-destination "s3://$bucket/artifacts" --serve-artifacts \
        --host 127.0.0.1 --port "$mlflow_port" --workers "$mlflow_workers" >"$state/mlflow.log" 2>&1 &
    echo $! >"$state/mlflow.pid"
    # Minutes, not seconds, on a busy machine (imports, migrations on a new database, one process per
    # worker); the wait ends early if the server exits.
    local deadline=$((SECONDS + 600))
    while [ "$SECONDS" -lt "$deadline" ] && running mlflow; do
        curl -sf "http://127.0.0.1:$mlflow_port/health" >/dev/null && break
        sleep 0.5
    done
    curl -sf "http://127.0.0.1:$mlflow_port/health" >/dev/null || die "mlflow server did not start: $state/mlflow.log"
    echo "MLflow: http://127.0.0.1:$mlflow_port  (export MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port)"
}

stop() {
    local name pid
    for name in mlflow moto; do
        if [ -f "$state/$name.pid" ]; then
            pid="$(cat "$state/$name.pid")"
            # The whole process group (mlflow server forks uvicorn workers and job consumers), given a
            # minute to finish its requests before it is killed.
            kill -- "-$pid" 2>/dev/null || true
            for _ in $(seq 1 120); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
            kill -KILL -- "-$pid" 2>/dev/null || true
            rm -f "$state/$name.pid"
        fi
    done
    stop_postgres
}

# --- backup and restore: both databases, then the bucket ---------------------------------------------

backup() {
    local dir="${1:-}" db
    [ -n "$dir" ] || die "usage: scripts/stack.sh backup DIR"
    [ ! -e "$dir" ] || [ -z "$(ls -A "$dir")" ] || die "$dir: not empty; back up into a new folder"
    postgres_running || die "PostgreSQL of $state is not running (scripts/stack.sh start first)"
    source scripts/venv.sh
    s3_env
    # The dumps hold basic-auth's password hashes: the folder is its owner's only.
    (umask 077 && mkdir -p "$dir")
    # The databases first: every artifact they reference was written before the dump, so the bucket
    # copy that follows holds it.
    for db in "${databases[@]}"; do
        "$pg_bindir/pg_dump" --format=custom --file="$dir/$db.dump" "$db" || die "pg_dump of $db failed"
    done
    python scripts/bucket.py download "$bucket" "$dir/bucket"
    echo "backup of $state in $dir"
}

restore() {
    local dir="${1:-}" db
    [ -n "$dir" ] || die "usage: scripts/stack.sh restore DIR"
    for db in "${databases[@]}"; do
        [ -f "$dir/$db.dump" ] || die "$dir/$db.dump: no such file; DIR must be a folder that scripts/stack.sh backup wrote"
    done
    [ -d "$dir/bucket" ] || die "$dir/bucket: no such folder; DIR must be a folder that scripts/stack.sh backup wrote"
    postgres_running || die "PostgreSQL of $state is not running (scripts/stack.sh start first)"
    source scripts/venv.sh
    s3_env
    # The artifacts first, so that no restored row ever points at a missing object.
    python scripts/bucket.py upload "$dir/bucket" "$bucket"
    # --clean replaces the tables a fresh server created (same MLflow version) with the backup's, in one
    # transaction, while the server stays up.
    for db in "${databases[@]}"; do
        "$pg_bindir/pg_restore" --clean --if-exists --single-transaction --no-owner --dbname="$db" "$dir/$db.dump" \
            || die "pg_restore of $dir/$db.dump failed"
    done
    echo "restored $dir into $state"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    backup) backup "${2:+$(from_caller "$2")}" ;;
    restore) restore "${2:+$(from_caller "$2")}" ;;
    *) echo "usage: scripts/stack.sh start [--auth] | stop | backup DIR | restore DIR" >&2; exit 2 ;;
esac
