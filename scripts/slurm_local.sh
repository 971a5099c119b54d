#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine (controller and node daemon on localhost), for CI and for
# trying hydra/launcher=submitit_slurm without a cluster. Needs root and Debian's packages:
#   apt-get install -y slurm-wlm munge
#   bash scripts/slurm_local.sh start  # writes /etc/slurm/slurm.conf, starts munged, slurmctld, slurmd; waits for idle
#   bash scripts/slurm_local.sh stop     # stops the three daemons this script started (by the pids it recorded)
# The partition is called "debug"; state and logs live under $SLURM_LOCAL_DIR (default /tmp/slurm-local).
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}

start() {
    for tool in munged mungekey slurmctld slurmd sinfo; do
        if ! command -v "$tool" >/dev/null; then
            echo "slurm_local.sh: $tool not found: apt-get install -y slurm-wlm munge" >&2
            exit 1
        fi
    done
    stop  # a cluster this script started before (a second `start`) gives way to the new one
    mkdir -p "$DIR"/{ctld,d,log} /etc/slurm /etc/munge /run/munge /var/lib/munge /var/log/munge
    [ -s /etc/munge/munge.key ] || mungekey -c -f
    # root-owned directories make munged refuse to start without --force; this is a throwaway single-user cluster
    /usr/sbin/munged --force --pid-file="$DIR/munged.pid"
    local mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 9 / 10 / 1024 ))
    cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
NodeName=localhost CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    setsid slurmctld -D -i > "$DIR/log/slurmctld.out" 2>&1 &
    echo $! > "$DIR/slurmctld.daemon.pid"
    setsid slurmd -D > "$DIR/log/slurmd.out" 2>&1 &
    echo $! > "$DIR/slurmd.daemon.pid"
    for _ in $(seq 60); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            sinfo
            return 0
        fi
        sleep 1
    done
    echo "slurm_local.sh: the node did not become idle in 60 s; logs in $DIR/log" >&2
    tail -20 "$DIR"/log/*.out "$DIR"/log/*.log >&2 || true
    exit 1
}

stop() {
    for name in slurmd.daemon slurmctld.daemon munged; do
        if [ -s "$DIR/$name.pid" ]; then
            local pid
            pid=$(cat "$DIR/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            rm -f "$DIR/$name.pid"
        fi
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
