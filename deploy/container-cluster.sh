#!/usr/bin/env bash
# Build the CPU image of deploy/Dockerfile and run a two-container Ray cluster from it (host networking, ports on
# 127.0.0.1 only where Ray allows), then submit a small spec through the Jobs API and check its runs in a local
# MLflow tracking server. Run from the repository root, as root for rootful podman (or with docker):
#   deploy/container-cluster.sh [--engine podman|docker] [--base IMAGE] [--wheels DIR] [--keep]
# --base: the image to build FROM (default: labfleet-base:bookworm, made here with debootstrap and `import` when
#   missing, so that no registry is needed; rayproject/ray:2.60.0-py311 where a registry is reachable).
# --wheels DIR: wheels to install first, and no index but the default one (a local torch wheel where
#   download.pytorch.org is not reachable).
# --keep: leave the containers and the server running (stop them with `$0 stop`).
# Too heavy for CI (a 2.5 GB image, minutes of pip); docs/cluster.md has a timed run.
set -euo pipefail

engine=podman; base=labfleet-base:bookworm; wheels=""; keep=0; image=labfleet:0.1.0
port=6390; dashboard=8275; mlflow_port=5095; dir="${TMPDIR:-/tmp}/labfleet-containers"
command="run"
while [ $# -gt 0 ]; do
    case "$1" in
        --engine) engine="$2"; shift 2 ;;
        --base) base="$2"; shift 2 ;;
        --wheels) wheels="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        stop) command=stop; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
mkdir -p "$dir"
engine_args=()
# podman's default runtime (crun) fails on hosts with hybrid cgroups; runc works there
if [ "$engine" = podman ] && command -v runc >/dev/null; then engine_args=(--runtime runc); fi
e() { "$engine" "${engine_args[@]}" "$@"; }
stamp() { date +%s.%N; }

stop_all() {
    for name in lf-ray-head lf-ray-worker; do e rm -f "$name" >/dev/null 2>&1 || true; done
    bash deploy/local/mlflow-server.sh stop --dir "$dir/mlflow" >/dev/null 2>&1 || true
}
if [ "$command" = stop ]; then stop_all; echo "stopped"; exit 0; fi

t0=$(stamp)
# The host's CA bundle goes into builds: a machine behind a TLS-inspecting proxy needs it to reach the index.
ca=/etc/ssl/certs/ca-certificates.crt
build_mounts=(); [ -f "$ca" ] && build_mounts=(--volume "$ca:$ca:ro")
if ! e image exists "$base" 2>/dev/null && [ "$base" = labfleet-base:bookworm ]; then
    command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install debootstrap" >&2; exit 2; }
    rootfs="$dir/rootfs"
    rm -rf "$rootfs"; mkdir -p "$rootfs"
    echo "building the base image from Debian bookworm (debootstrap)"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian >"$dir/debootstrap.log" 2>&1
    tar -C "$rootfs" -c . | e import - "$base" >/dev/null
    rm -rf "$rootfs"
fi
t_base=$(stamp)
rm -f deploy/wheels/*.whl
[ -n "$wheels" ] && cp "$wheels"/*.whl deploy/wheels/
echo "building $image from $base"
index_args=(); [ -n "$wheels" ] && index_args=(--build-arg TORCH_INDEX=)
e build "${build_mounts[@]}" --network host --build-arg "RAY_IMAGE=$base" "${index_args[@]}" -f deploy/Dockerfile \
    -t "$image" . \
    >"$dir/build.log" 2>&1 || { tail -30 "$dir/build.log"; exit 1; }
rm -f deploy/wheels/*.whl
t_built=$(stamp)

stop_all  # what an earlier run left
trap '[ "$keep" = 1 ] || stop_all' EXIT
mkdir -p "$dir"
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
export RAY_AUTH_TOKEN  # passed to the containers by name (--env RAY_AUTH_TOKEN), never on a command line
node_ports() {  # every port of node K explicit: both containers share the host's network
    local b=$((11000 + 40 * $1))
    echo "--min-worker-port $b --max-worker-port $((b + 29)) --node-manager-port $((b + 30))" \
         "--object-manager-port $((b + 31)) --runtime-env-agent-port $((b + 32))" \
         "--dashboard-agent-grpc-port $((b + 33)) --dashboard-agent-listen-port $((b + 34))" \
         "--metrics-export-port $((b + 35))"
}
# Limits the container may set: an engine's defaults (or the host's own hard limits) can be refused inside
# another container or a restricted host ("error setting rlimits ... operation not permitted").
run_args=(-d --network host --env RAY_AUTH_TOKEN --env RAY_AUTH_MODE=token --shm-size 1g
          --ulimit nofile=16384:16384 --ulimit nproc=16384:16384)
# shellcheck disable=SC2046
e run "${run_args[@]}" --name lf-ray-head "$image" ray start --head --block --node-ip-address 127.0.0.1 \
    --port "$port" --dashboard-host 127.0.0.1 --dashboard-port "$dashboard" --ray-client-server-port $((port + 1)) \
    --num-cpus 1 $(node_ports 0) --disable-usage-stats >/dev/null
# shellcheck disable=SC2046
e run "${run_args[@]}" --name lf-ray-worker "$image" ray start --block --address "127.0.0.1:$port" \
    --node-ip-address 127.0.0.1 --num-cpus 1 $(node_ports 1) --disable-usage-stats >/dev/null
rm -rf "$dir/mlflow"  # a fresh store each time
bash deploy/local/mlflow-server.sh start --dir "$dir/mlflow" --port "$mlflow_port" >/dev/null
for _ in $(seq 120); do  # until the Jobs API answers (401 without the token counts as an answer)
    code=$(python3 -c "import sys, urllib.request, urllib.error
try: urllib.request.urlopen('http://127.0.0.1:$dashboard/api/version', timeout=2); print(200)
except urllib.error.HTTPError as e: print(e.code)
except Exception: print(0)")
    [ "$code" != 0 ] && break
    sleep 1
done
t_cluster=$(stamp)

work="$dir/job"; rm -rf "$work"; mkdir -p "$work"
cp experiments/cartpole_ppo.yaml "$work/"
echo "submitting cartpole_ppo.yaml (2 seeds, 20000 steps) to the containers' cluster"
python -m labfleet submit "$work/cartpole_ppo.yaml" --address "http://127.0.0.1:$dashboard" \
    --tracking-uri "http://127.0.0.1:$mlflow_port" --python /opt/venv/bin/python --wait \
    --set 'seeds=[0,1]' --set budget.env_steps=20000 --set 'eval={episodes: 5, every_steps: 10000}' \
    --set name=container-check >"$dir/submit.log" 2>&1 || { tail -30 "$dir/submit.log"; exit 1; }
t_done=$(stamp)
python - "http://127.0.0.1:$mlflow_port" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
runs = client.search_runs([client.get_experiment_by_name("cartpole").experiment_id])
roles = sorted(r.data.tags["labfleet.role"] for r in runs)
assert roles == ["seed", "seed", "trial"] and {r.info.status for r in runs} == {"FINISHED"}, (roles, runs)
nodes = {r.data.tags["labfleet.node"] for r in runs if r.data.tags["labfleet.role"] == "seed"}
print(f"runs FINISHED: {len(runs)}; seed runs on {len(nodes)} node(s)")
PY
size=$(e image inspect "$image" --format '{{.Size}}')
python3 - "$t0" "$t_base" "$t_built" "$t_cluster" "$t_done" "$size" <<'PY'
import sys
t0, base, built, cluster, done, size = map(float, sys.argv[1:])
print(f"base image {base - t0:.0f} s, build {built - base:.0f} s, cluster up {cluster - built:.0f} s, "
      f"submit to FINISHED {done - cluster:.0f} s; image {size / 1e9:.2f} GB")
PY
