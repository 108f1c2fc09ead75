#!/usr/bin/env bash
# Start or stop the team stack locally: an S3 endpoint (moto_server) and an MLflow tracking server
# with a SQL backend store and proxied S3 artifacts (clients need no S3 credentials).
#   scripts/stack.sh start [--auth]   # --auth: MLflow basic-auth (admin/password from the env)
#   scripts/stack.sh stop
# Replace moto_server with your real S3/MinIO by setting MLFLOW_S3_ENDPOINT_URL and skipping it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
state="artifacts/stack"
s3_port="${MAMMOSEG_S3_PORT:-9000}"
mlflow_port="${MAMMOSEG_MLFLOW_PORT:-5000}"
bucket="${MAMMOSEG_BUCKET:-mlflow}"

start() {
    source scripts/venv.sh
    mkdir -p "$state"
    export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
    export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
    export MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL:-http://127.0.0.1:$s3_port}"
    if [ "$MLFLOW_S3_ENDPOINT_URL" = "http://127.0.0.1:$s3_port" ]; then
        moto_server -H 127.0.0.1 -p "$s3_port" >"$state/moto.log" 2>&1 &
        echo $! >"$state/moto.pid"
        for _ in $(seq 1 50); do curl -sf "$MLFLOW_S3_ENDPOINT_URL" >/dev/null && break; sleep 0.2; done
        python -c "import boto3; boto3.client('s3', endpoint_url='$MLFLOW_S3_ENDPOINT_URL').create_bucket(Bucket='$bucket')"
    fi
    auth=()
    if [ "${1:-}" = "--auth" ]; then
        auth=(--app-name basic-auth)
        export MLFLOW_AUTH_CONFIG_PATH="$state/basic_auth.ini"
        # Flask's CSRF protection needs a fixed secret shared by every server process.
        export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
        printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s/basic_auth.db\nadmin_username = %s\nadmin_password = %s\n' \
            "$PWD/$state" "${MLFLOW_ADMIN_USERNAME:-admin}" "${MLFLOW_ADMIN_PASSWORD:?set MLFLOW_ADMIN_PASSWORD}" \
            >"$MLFLOW_AUTH_CONFIG_PATH"
    fi
    mlflow server "${auth[@]}" --backend-store-uri "sqlite:///$PWD/$state/mlflow.db" \
        --artifacts-destination "s3://$bucket/artifacts" --serve-artifacts \
        --host 127.0.0.1 --port "$mlflow_port" >"$state/mlflow.log" 2>&1 &
    echo $! >"$state/mlflow.pid"
    for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$mlflow_port/health" >/dev/null && break; sleep 0.5; done
    curl -sf "http://127.0.0.1:$mlflow_port/health" >/dev/null || { echo "mlflow server did not start: $state/mlflow.log" >&2; exit 1; }
    echo "MLflow: http://127.0.0.1:$mlflow_port  (export MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port)"
}

stop() {
    for name in mlflow moto; do
        if [ -f "$state/$name.pid" ]; then
            kill "$(cat "$state/$name.pid")" 2>/dev/null || true
            rm -f "$state/$name.pid"
        fi
    done
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    *) echo "usage: scripts/stack.sh start [--auth] | stop" >&2; exit 2 ;;
esac
