#!/usr/bin/env bash
# A one-node Slurm cluster on localhost (slurmctld + slurmd + munged), for tests and CI.
#
#   launch/slurm/localhost_cluster.sh start   # idempotent; prints SLURM_CONF=<path> on success
#   launch/slurm/localhost_cluster.sh stop    # stops the daemons this script started
#   launch/slurm/localhost_cluster.sh status  # exit 0 when the node is up
#
# Then: export SLURM_CONF=<path>; srun -n 2 --overcommit ...; sbatch ...
#
# Needs root (slurmd runs jobs as their user) and Debian's slurm-wlm + munge. With
# PFC_SLURM_INSTALL=1, `start` installs them with apt-get when missing. Knobs: PFC_SLURM_DIR
# (state, logs, config; default /tmp/pfc-slurm), PFC_SLURM_TIMEOUT (seconds to wait for the node,
# default 30), PFC_SLURM_APT_TIMEOUT (seconds per apt-get run, default 120). Every failure ends
# with exit 1 and one line on stderr saying what is missing.
# Single node only; no cgroups (task/none), no accounting (no sacct).
set -euo pipefail

DIR=${PFC_SLURM_DIR:-/tmp/pfc-slurm}
CONF=$DIR/slurm.conf
# Bumped when the generated slurm.conf changes, so that `start` replaces an older running cluster.
CONF_VERSION="pfc-localhost-cluster 2"
TIMEOUT=${PFC_SLURM_TIMEOUT:-30}
APT_TIMEOUT=${PFC_SLURM_APT_TIMEOUT:-120}

fail() {
    echo "localhost_cluster: $*" >&2
    exit 1
}

node_name() {
    local h
    h=$(hostname -s 2>/dev/null || true)
    # slurmd must find its own NodeName; a host name that does not resolve cannot be used.
    if [ -n "$h" ] && getent hosts "$h" >/dev/null 2>&1; then echo "$h"; else echo localhost; fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

alive() {  # alive PIDFILE
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_idle() {
    local st
    st=$(SLURM_CONF=$CONF timeout 5 sinfo -h -N -o %T 2>/dev/null | head -n 1) || return 1
    case "$st" in idle|mixed|allocated) return 0 ;; *) return 1 ;; esac
}

install_packages() {
    command -v apt-get >/dev/null 2>&1 || fail "slurm-wlm is not installed and apt-get is not available"
    local log=$DIR/apt.log
    echo "localhost_cluster: installing slurm-wlm and munge with apt-get (log: $log)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout "$APT_TIMEOUT" apt-get install -y -q --no-install-recommends slurm-wlm munge >"$log" 2>&1; then
        # A fresh image has no package lists yet.
        timeout "$APT_TIMEOUT" apt-get update -q >>"$log" 2>&1 \
            && timeout "$APT_TIMEOUT" apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$log" 2>&1 \
            || fail "apt-get install slurm-wlm munge failed (no network or no Debian repository?); see $log"
    fi
}

start_munge() {
    # munged is shared by everything on the machine; reuse a running one.
    if command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    [ -f /etc/munge/munge.key ] || fail "/etc/munge/munge.key is missing (reinstall munge or run mungekey)"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    su -s /bin/sh munge -c "munged --force" >/dev/null 2>&1 || runuser -u munge -- munged --force \
        || fail "munged did not start (see /var/log/munge/munged.log)"
    local i
    for i in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    fail "munged started but does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
    local node=$1 cpus
    cpus=$(nproc)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<CONF
# Written by launch/slurm/localhost_cluster.sh: one node on 127.0.0.1, no cgroups, no accounting.
# $CONF_VERSION
ClusterName=pfc-localhost
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120); starting it
# sooner on the same node fails with "Job credential revoked".
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
# More tasks than CPUs is rejected at once instead of pending forever (use --overcommit).
EnforcePartLimits=ALL
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    [ "$(id -u)" = 0 ] || fail "must run as root (slurmd runs jobs as their owner); current uid $(id -u)"
    mkdir -p "$DIR"
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
        [ "${PFC_SLURM_INSTALL:-0}" = 1 ] \
            || fail "slurm-wlm/munge not installed (apt-get install slurm-wlm munge, or set PFC_SLURM_INSTALL=1)"
        install_packages
    fi
    local node
    node=$(node_name)
    if [ -f "$CONF" ] && grep -qF "# $CONF_VERSION" "$CONF" && alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_idle; then
        echo "SLURM_CONF=$CONF"
        return 0
    fi
    stop_daemons
    start_munge
    write_conf "$node"
    export SLURM_CONF=$CONF
    # -c: a clean start (no jobs from an earlier run); -i: ignore state it cannot recover.
    slurmctld -c -i -f "$CONF" || fail "slurmctld did not start; see $DIR/log/slurmctld.log"
    slurmd -N "$node" -f "$CONF" || fail "slurmd did not start; see $DIR/log/slurmd.log"
    local t0=$SECONDS
    until node_idle; do
        if [ $((SECONDS - t0)) -ge "$TIMEOUT" ]; then
            fail "node $node not idle after ${TIMEOUT}s (sinfo: $(SLURM_CONF=$CONF sinfo -h -N -o '%T %E' 2>&1 | head -n 1)); see $DIR/log/"
        fi
        sleep 0.2
    done
    echo "SLURM_CONF=$CONF"
}

stop_daemons() {
    local f pid
    for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        if alive "$f"; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$f"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop_daemons ;;
    status) [ -f "$CONF" ] && alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && node_idle \
                && echo "SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
