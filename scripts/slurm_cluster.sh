#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the test suite and for trying the SLURM launcher:
#   scripts/slurm_cluster.sh start  [STATE_DIR]   # install (apt) if needed, start; last stdout line: export SLURM_CONF=...
#   scripts/slurm_cluster.sh status [STATE_DIR]   # exit 0 and print sinfo if up, else exit 1
#   scripts/slurm_cluster.sh stop   [STATE_DIR]   # cancel jobs, stop slurmd and slurmctld (munged is left running)
#   eval "$(scripts/slurm_cluster.sh start | tail -1)"; sbatch --wrap 'echo hi'
# STATE_DIR (default ${SLURM_CLUSTER_DIR:-/tmp/dl-slurm}) holds slurm.conf, spool, logs and pid files; `start` wipes
# the spool, so job ids restart at 1. SLURM_CLUSTER_PORT (default 6817) moves slurmctld's port (slurmd: port + 1).
# Settings follow facts measured on Debian 12, Slurm 22.05, as root, no systemd (local-slurm.md in shared/docs).
# Exit codes: 0 ok, 1 failed to start (log tails on stderr), 2 usage, 3 cannot run a cluster here (reason on stderr).
set -euo pipefail

cmd=${1:-}
dir=${2:-${SLURM_CLUSTER_DIR:-/tmp/dl-slurm}}
case $dir in /*) ;; *) dir=$PWD/$dir ;; esac
conf=$dir/slurm.conf
export SLURM_CONF=$conf PATH=$PATH:/usr/sbin:/sbin   # daemons live in /usr/sbin, often not on a user's PATH

die() { echo "slurm_cluster.sh: $2" >&2; exit "$1"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }
can_root() { [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; }
# Is process PID (still) NAME, and not a zombie? /proc works for other users' processes, kill -0 does not.
running() { [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
# Print the pid in STATE_DIR/DAEMON.pid if that process is running.
alive() {
  local pid
  pid=$(cat "$dir/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && running "$pid" "$1" && echo "$pid"
}
# Both daemons alive and the node usable (idle, or busy with jobs: then `start` must not restart anything).
is_up() {
  alive slurmctld >/dev/null && alive slurmd >/dev/null \
    && timeout 5 sinfo -h -o %T 2>/dev/null | grep -Eqx 'idle|mixed|allocated|completing'
}
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
# One start/stop at a time per STATE_DIR (e.g. parallel pytest workers); flock is in util-linux. A user who
# cannot write the lock file (a cluster root started) goes without.
lock() { { exec 9>>"$dir/.lock"; } 2>/dev/null || return 0; if command -v flock >/dev/null; then flock -w 60 9; fi; }

stop() {
  local d pid jobs
  if alive slurmctld >/dev/null; then
    # Jobs outlive slurmd (their slurmstepd keeps running), so cancel them first; KillWait=5 bounds the wait.
    read -ra jobs <<<"$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')"
    if [ "${#jobs[@]}" -gt 0 ]; then
      as_root scancel "${jobs[@]}" 2>/dev/null || true
      for _ in $(seq 30); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  for d in slurmd slurmctld; do
    pid=$(alive $d) || continue
    as_root kill "$pid" 2>/dev/null || true
    # Wait on the pid, not the pid file: the daemons delete their pid file before they are done exiting.
    for _ in $(seq 50); do running "$pid" $d || break; sleep 0.1; done
    if running "$pid" $d; then as_root kill -9 "$pid" 2>/dev/null || true; fi
  done
  if alive slurmctld >/dev/null || alive slurmd >/dev/null; then die 1 "could not stop the cluster in $dir (not root?)"; fi
}

start() {
  if is_up; then echo "export SLURM_CONF=$conf"; return; fi
  if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
     || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die 3 "cannot start a local SLURM cluster: no apt-get and slurm-wlm/munge are not installed"
    can_root || die 3 "cannot start a local SLURM cluster: slurm-wlm is not installed, and not root and no passwordless sudo"
    echo "slurm_cluster.sh: installing slurm-wlm and munge with apt-get (9 packages, 4 MB)" >&2
    export DEBIAN_FRONTEND=noninteractive
    # apt output goes to stderr: stdout's last line must stay the export line.
    # --no-install-recommends: 9 packages, 14 MB, instead of 43 and 56 MB (the recommended plugins are not needed).
    local apt=(apt-get install -y -q --no-install-recommends slurm-wlm munge)
    { as_root "${apt[@]}" || { as_root apt-get update -q && as_root "${apt[@]}"; }; } >&2 \
      || die 3 "cannot start a local SLURM cluster: apt-get install slurm-wlm munge failed"
  fi
  can_root || die 3 "cannot start a local SLURM cluster: not root and no passwordless sudo (slurmctld/slurmd run as root)"
  stop   # whatever is left of an earlier cluster in this STATE_DIR

  # munged runs as the munge user with its socket in /run/munge (the package creates /etc/munge/munge.key).
  if ! munge_ok; then
    as_root install -d -o munge -g munge -m 0755 /run/munge
    as_root runuser -u munge -- /usr/sbin/munged 9>&-   # 9>&-: daemons must not inherit (and hold) the lock
    for _ in $(seq 25); do munge_ok && break; sleep 0.2; done
    munge_ok || die 1 "munged did not start (see /var/log/munge/munged.log)"
  fi

  local node cpus mem port p
  node=$(hostname -s); cpus=$(nproc --all)  # --all: nproc alone honours OMP_NUM_THREADS
  # RealMemory: at least 1 TiB, so that --mem requests bigger than this machine (say submitit's mem_gb=64) run
  # instead of failing at sbatch with "Requested node configuration is not available".
  mem=$(awk '/^MemTotal:/ {m = int($2 / 1024); print (m > 1048576 ? m : 1048576)}' /proc/meminfo)   # MB
  port=${SLURM_CLUSTER_PORT:-6817}
  for p in "$port" $((port + 1)); do   # e.g. a cluster started from another STATE_DIR
    if (: <>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      die 1 "port $p is in use (a cluster from another STATE_DIR?): stop it or set SLURM_CLUSTER_PORT"
    fi
  done
  as_root rm -rf "$dir/spool" "$dir/log"   # fresh job ids, no jobs from an earlier run
  mkdir -p "$dir/spool/ctld" "$dir/spool/d" "$dir/log"
  cat >"$conf" <<EOF
# Written by scripts/slurm_cluster.sh: a one-node cluster on $node, no systemd, no cgroups, no slurmdbd.
ClusterName=dl-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No systemd/cgroups here: track job processes through /proc, no task binding, no accounting, no mail.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
MpiDefault=none
# The node comes back to service by itself after a restart.
ReturnToService=2
# A batch job starts 0.35-0.6 s after sbatch (1.5-2.6 s with the defaults).
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
# A requeued job waits cred_expire (120 s by default) before it may start again: about 6 s with 5.
# Only read when slurmctld starts (scontrol reconfigure does not apply it).
AuthInfo=cred_expire=5
JobRequeue=1
# SIGTERM -> SIGKILL after 5 s (30 s by default) when a job is cancelled, preempted or out of time.
KillWait=5
# CPUs are the only consumable: two 1-CPU jobs run at once on 2 cores; --mem is accepted, not enforced
# (config_overrides: the node keeps the RealMemory below instead of being drained for having less).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
# Partition-priority preemption: a job in 'high' requeues a 'low' job, which first gets its --signal
# (e.g. --signal=B:USR1@90) at once, then GraceTime seconds before it is stopped and requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=low Nodes=$node Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=high Nodes=$node MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  as_root slurmctld -f "$conf" 9>&-
  as_root slurmd -f "$conf" 9>&-
  for i in $(seq 100); do
    is_up && { echo "export SLURM_CONF=$conf"; return; }
    # A daemon that exits at once ends the wait early.
    if [ "$i" -gt 5 ] && ! { alive slurmctld && alive slurmd; } >/dev/null; then break; fi
    sleep 0.2
  done
  {
    echo "slurm_cluster.sh: the cluster did not come up; the ends of its logs in $dir/log:"
    tail -n 15 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" 2>/dev/null || true
  } >&2
  exit 1
}

case $cmd in
  start) mkdir -p "$dir"; lock; start ;;
  stop) if [ -d "$dir" ]; then lock; fi; stop ;;
  status) if is_up; then sinfo; else echo "slurm_cluster.sh: no cluster running in $dir" >&2; exit 1; fi ;;
  *) die 2 "usage: scripts/slurm_cluster.sh start|stop|status [STATE_DIR]" ;;
esac
