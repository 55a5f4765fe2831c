#!/usr/bin/env bash
# An MLflow tracking server on 127.0.0.1 with a SQLite or Postgres backend and an artifact directory
# (served through the server's artifact proxy, so clients need no shared filesystem):
#   deploy/local/mlflow-server.sh start [--backend sqlite:///DIR/mlflow.db | postgresql+psycopg2://user@127.0.0.1/db]
#                                       [--artifacts DIR] [--port 5001] [--dir DIR]
#   deploy/local/mlflow-server.sh stop [--dir DIR]
# --host 0.0.0.0 (or another address) is needed to serve other machines; put authentication in front of it
# (deploy/mlflow/ shows basic auth). Backend credentials belong in the URL's environment (~/.pgpass), not here.
set -euo pipefail

command="${1:-}"; shift || true
dir="${TMPDIR:-/tmp}/labfleet-mlflow"; port=5001; host=127.0.0.1; backend=""; artifacts=""
while [ $# -gt 0 ]; do
    case "$1" in
        --backend) backend="$2"; shift 2 ;;
        --artifacts) artifacts="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --host) host="$2"; shift 2 ;;
        --dir) dir="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

case "$command" in
start)
    mkdir -p "$dir"
    backend="${backend:-sqlite:///$dir/mlflow.db}"
    artifacts="${artifacts:-$dir/artifacts}"
    mkdir -p "$artifacts"
    setsid python -m mlflow server --host "$host" --port "$port" --backend-store-uri "$backend" \
        --artifacts-destination "$artifacts" --serve-artifacts --workers 1 > "$dir/server.log" 2>&1 &
    echo $! > "$dir/server.pid"
    for _ in $(seq 240); do
        if python - "$host" "$port" <<'PY' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/health", timeout=2)
PY
            echo "MLflow tracking server: http://$host:$port  (artifacts: $artifacts)"
            exit 0
        fi
        kill -0 "$(cat "$dir/server.pid")" 2>/dev/null || { echo "the server exited; see $dir/server.log" >&2; exit 1; }
        sleep 0.5
    done
    echo "the server did not answer on http://$host:$port/health; see $dir/server.log" >&2
    exit 1
    ;;
stop)
    [ -f "$dir/server.pid" ] || { echo "no server under $dir"; exit 0; }
    pid=$(cat "$dir/server.pid")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$dir/server.pid"
    echo "MLflow server under $dir stopped"
    ;;
*)
    echo "usage: $0 start|stop [--backend URI] [--artifacts DIR] [--port P] [--host H] [--dir DIR]" >&2
    exit 2 ;;
esac
