#!/usr/bin/env bash
# A throwaway SLURM cluster on this machine: slurmctld and N slurmd daemons, each a logical node with its own
# port, all on 127.0.0.1, started without systemd (Debian's slurm-wlm; run as root, which slurmd needs):
#   deploy/local/slurm-cluster.sh start [--nodes 2] [--cpus-per-node 2] [--dir DIR] [--port 16817]
#   deploy/local/slurm-cluster.sh stop [--dir DIR]
#   export SLURM_CONF=DIR/slurm.conf     # then sbatch, squeue, scontrol and `labfleet submit --slurm` use it
# For trying `labfleet submit --slurm` and for the tests only: it uses auth/none, so anyone on this machine can
# submit jobs as any user, and it shares nothing with a real cluster. `stop` ends the daemons it started (by
# their pid files under DIR) and every process of their jobs, nothing else.
set -euo pipefail

command="${1:-}"; shift || true
nodes=2; cpus=2; dir="${TMPDIR:-/tmp}/labfleet-slurm"; port=16817
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes="$2"; shift 2 ;;
        --cpus-per-node) cpus="$2"; shift 2 ;;
        --dir) dir="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

pids_of() {  # the daemons this cluster started
    cat "$dir"/*.pid 2>/dev/null || true
}

tree() {  # a process and all its descendants
    local pid="$1"
    echo "$pid"
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do tree "$child"; done
}

case "$command" in
start)
    command -v slurmctld >/dev/null || { echo "slurmctld not found: apt-get install slurm-wlm" >&2; exit 2; }
    mkdir -p "$dir/state"
    host="$(hostname -s)"
    node_lines=""
    for i in $(seq 1 "$nodes"); do
        node_lines+="NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus Port=$((port + i)) State=UNKNOWN"$'\n'
    done
    cat > "$dir/slurm.conf" <<EOF
# Written by deploy/local/slurm-cluster.sh: a throwaway one-host cluster (auth/none: never on a shared host)
ClusterName=labfleet$port
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# SIGKILL this long after SIGTERM (preemption, requeue, scancel): time for a driver to end its runs
KillWait=60
MinJobAge=3600
JobRequeue=1
${node_lines}PartitionName=debug Nodes=n[1-$nodes] Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF" -i
    for i in $(seq 1 "$nodes"); do slurmd -f "$SLURM_CONF" -N "n$i"; done
    for _ in $(seq 100); do
        idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
        [ "$idle" -ge "$nodes" ] && break
        sleep 0.2
    done
    [ "$idle" -ge "$nodes" ] || { echo "the nodes did not become idle (logs in $dir)" >&2; exit 1; }
    echo "SLURM cluster: $nodes node(s) of $cpus CPU(s), slurmctld on 127.0.0.1:$port"
    echo "  export SLURM_CONF=$SLURM_CONF"
    ;;
stop)
    export SLURM_CONF="$dir/slurm.conf"
    if [ -f "$SLURM_CONF" ] && [ -n "$(pids_of)" ]; then  # its jobs first: they end as scancel ends them
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 180); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
        fi
    fi
    daemons=$(pids_of)
    all=()
    for p in $daemons; do mapfile -t -O "${#all[@]}" all < <(tree "$p"); done  # jobs run under the slurmds
    [ ${#all[@]} -eq 0 ] && { echo "no SLURM cluster under $dir"; exit 0; }
    kill -TERM "${all[@]}" 2>/dev/null || true
    for _ in $(seq 40); do
        alive=0; for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.25
    done
    kill -KILL "${all[@]}" 2>/dev/null || true
    rm -f "$dir"/*.pid
    echo "SLURM cluster under $dir stopped"
    ;;
*)
    echo "usage: $0 start|stop [--nodes N] [--cpus-per-node C] [--dir DIR] [--port P]" >&2
    exit 2 ;;
esac
