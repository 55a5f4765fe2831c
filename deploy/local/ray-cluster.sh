#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, for trying the cluster path and for the tests:
#   deploy/local/ray-cluster.sh start [--workers N] [--cpus-per-node C] [--dir DIR] [--port 6380] [--dashboard-port 8265]
#   deploy/local/ray-cluster.sh stop-node INDEX [--dir DIR]     # a worker node dies (as a lost machine would)
#   deploy/local/ray-cluster.sh start-node INDEX [--cpus-per-node C] [--dir DIR] [--port 6380]  # it comes back
#   deploy/local/ray-cluster.sh stop [--dir DIR]
# Every service the head starts for clients (the dashboard and Jobs API, the Ray client server) listens on
# 127.0.0.1. Ray's GCS port listens on all interfaces whatever it is told: firewall it on a shared host.
# Token authentication stays on (RAY_AUTH_MODE=token; the token lives in ~/.ray/auth_token, made by `start`
# where neither it nor RAY_AUTH_TOKEN exists); every process that talks to the cluster needs RAY_AUTH_MODE=token.
# The nodes run with the Python interpreter found first on PATH (activate the venv with labfleet first).
set -euo pipefail

command="${1:-}"; shift || true
workers=1; cpus=1; dir="${TMPDIR:-/tmp}/labfleet-ray"; port=6380; dashboard=8265; index=""
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) workers="$2"; shift 2 ;;
        --cpus-per-node) cpus="$2"; shift 2 ;;
        --dir) dir="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --dashboard-port) dashboard="$2"; shift 2 ;;
        *) if [[ "$command" == st*-node ]] && [ -z "$index" ]; then index="$1"; shift
           else echo "unknown argument: $1" >&2; exit 2; fi ;;
    esac
done

export RAY_AUTH_MODE=token
unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER  # set to 0 it forbids joining a second node
# 40 ports per node, from a base that depends on --port only (start-node finds the same ones), clear of
# other clusters on this machine, and below the kernel's ephemeral range (32768 and up on Linux), where
# ports the kernel hands out (the tests' --port and --dashboard-port) come from. The GCS port and the
# client server's (port + 1) must not fall among them: Ray refuses to start when two components share one.
span=$((40 * 64))
base=$((10000 + (port % 500) * 40))
if [ "$port" -ge "$base" ] && [ "$port" -lt $((base + span)) ]; then base=$((base + span + 40)); fi

node_ports() {  # every port of node K (0: the head) explicit, so that two clusters never collide
    local b=$((base + 40 * $1))
    echo "--min-worker-port $b --max-worker-port $((b + 29)) --node-manager-port $((b + 30))" \
         "--object-manager-port $((b + 31)) --runtime-env-agent-port $((b + 32))" \
         "--dashboard-agent-grpc-port $((b + 33)) --dashboard-agent-listen-port $((b + 34))" \
         "--metrics-export-port $((b + 35))"
}

started() {  # run a `ray start`, its output in LOG; where it fails, say so with the log's end
    local log="$1"; shift
    "$@" > "$log" 2>&1 && return 0
    echo "ray start failed (log: $log):" >&2
    tail -n 15 "$log" >&2
    exit 1
}

tree() {  # a process and all its descendants
    local pid="$1"
    echo "$pid"
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do tree "$child"; done
}

kill_tree() {
    local pids=("$@")
    [ ${#pids[@]} -eq 0 ] && return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 20); do
        alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && return 0
        sleep 0.5
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

case "$command" in
start)
    # Ray's sockets live under DIR/session_<timestamp>_<pid>/sockets/ and AF_UNIX paths stop at 107 bytes
    if [ ${#dir} -gt 44 ]; then
        echo "--dir $dir is too long (${#dir} characters): Ray's socket paths under it must fit in 107 bytes;" \
             "use a short directory such as /tmp/lf-ray" >&2
        exit 2
    fi
    mkdir -p "$dir"
    # `ray start` wants the token to exist; Ray makes one (~/.ray/auth_token) only where none does
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
        ray get-auth-token --generate > /dev/null
    fi
    # shellcheck disable=SC2046  # node_ports prints separate words on purpose
    started "$dir/head.log" ray start --head --node-ip-address 127.0.0.1 --port "$port" --dashboard-host 127.0.0.1 \
        --dashboard-port "$dashboard" --ray-client-server-port $((port + 1)) --num-cpus "$cpus" \
        --temp-dir "$dir" $(node_ports 0) --disable-usage-stats
    for i in $(seq 1 "$workers"); do
        # shellcheck disable=SC2046
        started "$dir/worker-$i.log" ray start --address "127.0.0.1:$port" --node-ip-address 127.0.0.1 \
            --num-cpus "$cpus" $(node_ports "$i") --disable-usage-stats
    done
    for _ in $(seq 120); do  # until the Jobs API answers (401 without the token counts as an answer)
        python - "$dashboard" <<'PY' 2>/dev/null && break
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=2)
except urllib.error.HTTPError:
    pass
PY
        sleep 1
    done
    echo "Ray cluster: head + $workers worker node(s), $cpus CPU each"
    echo "  jobs API / dashboard: http://127.0.0.1:$dashboard   (labfleet submit --address http://127.0.0.1:$dashboard)"
    echo "  GCS: 127.0.0.1:$port (listens on all interfaces)   session files: $dir"
    echo "  export RAY_AUTH_MODE=token   # for every client of this cluster"
    ;;
stop-node)
    [ -n "$index" ] || { echo "stop-node needs a worker index (1..N)" >&2; exit 2; }
    raylet=$(pgrep -f "raylet_socket_name=$dir/session_[^ ]*/sockets/raylet\.$index( |$)" || true)
    [ -n "$raylet" ] || { echo "no worker node $index under $dir" >&2; exit 1; }
    mapfile -t pids < <(tree "$raylet")
    kill -KILL "${pids[@]}" 2>/dev/null || true
    echo "worker node $index stopped (raylet $raylet)"
    ;;
start-node)
    [ -n "$index" ] || { echo "start-node needs a worker index (1..N)" >&2; exit 2; }
    # shellcheck disable=SC2046
    started "$dir/worker-$index.log" ray start --address "127.0.0.1:$port" --node-ip-address 127.0.0.1 \
        --num-cpus "$cpus" $(node_ports "$index") --disable-usage-stats
    echo "worker node $index started"
    ;;
stop)
    pids=()
    for p in $(pgrep -f -- "$dir/" || true); do mapfile -t -O "${#pids[@]}" pids < <(tree "$p"); done
    kill_tree "${pids[@]}"
    echo "Ray cluster under $dir stopped"
    ;;
*)
    echo "usage: $0 start|stop|stop-node INDEX|start-node INDEX [--workers N] [--cpus-per-node C] [--dir DIR] [--port P] [--dashboard-port P]" >&2
    exit 2 ;;
esac
