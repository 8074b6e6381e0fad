#!/usr/bin/env bash
# A single-node SLURM on this machine, reachable on loopback only: what tests/test_slurm.py builds a corpus
# on, and a way to try the manifest's `[cluster] kind = "slurm"` without a cluster (docs/scale-out.md).
#
# Idempotent: installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (as root,
# with apt-get), writes a munge key and a minimal slurm.conf into a folder of its own (never /etc/slurm or
# /etc/munge), starts munged, slurmctld and slurmd on that configuration unless they already run, and
# waits until `sinfo` shows the node up. Then it prints the one line to use it: export SLURM_CONF=...
#
# Loopback only: the node is `localhost` (127.0.0.1), the controller `localhost(127.0.0.1)`, and
# CommunicationParameters=NoCtldInAddrAny,NoInAddrAny makes slurmctld and slurmd bind the address their
# host name resolves to instead of 0.0.0.0. That name is the machine's unless they run in a UTS namespace
# of their own named `localhost` (unshare --uts), as here: so they listen on 127.0.0.1 whatever the
# machine's name resolves to, and the script stops them if `ss -ltn` shows otherwise. munged answers on a
# Unix socket in the folder. No cgroups: processes are tracked from /proc (proctrack/linuxproc), tasks
# are not bound (task/none), nothing is accounted.
#
#   GENECORPUS_SLURM_DIR   the folder (default /tmp/genecorpus-slurm): config, key, state, logs, pid files
#   GENECORPUS_SLURM_PORT  slurmctld's port (default 16817; slurmd takes the next one), away from a real
#                          SLURM's 6817/6818
# Stop it with scripts/slurm/stop-local-slurm.sh (same variables).
set -euo pipefail

DIR=${GENECORPUS_SLURM_DIR:-/tmp/genecorpus-slurm}
PORT=${GENECORPUS_SLURM_PORT:-16817}
CONF=$DIR/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)
COMMANDS=(munged slurmctld slurmd sbatch squeue sinfo scontrol scancel)

say() { echo "start-local-slurm: $*" >&2; }
die() { say "$*"; exit 1; }

alive() {  # alive NAME: the process in $DIR/NAME.pid runs and is NAME
  local file=$DIR/$1.pid
  [[ -s $file ]] && [[ $(cat "/proc/$(cat "$file")/comm" 2>/dev/null) == "$1" ]]
}

install_packages() {  # Debian's packages, unless every command is there already
  local c missing=()
  for c in "${COMMANDS[@]}"; do
    if ! command -v "$c" >/dev/null; then missing+=("$c"); fi
  done
  if [[ ${#missing[@]} -eq 0 ]]; then return; fi
  if [[ $(id -u) -ne 0 ]]; then
    die "${missing[*]} not found, and installing ${PACKAGES[*]} needs root"
  fi
  if ! command -v apt-get >/dev/null; then
    die "${missing[*]} not found, and there is no apt-get to install ${PACKAGES[*]}"
  fi
  say "installing ${PACKAGES[*]} (apt-get)"
  # the packages' scripts would start the system's own munge/slurm services: a policy-rc.d forbids it
  # during the install (one the machine has already stays as it is)
  local policy=/usr/sbin/policy-rc.d own_policy='' rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
  fi
  { DEBIAN_FRONTEND=noninteractive apt-get update -q >"$DIR/apt.log" 2>&1 \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
         >>"$DIR/apt.log" 2>&1; } || rc=$?
  if [[ -n $own_policy ]]; then rm -f "$policy"; fi
  if [[ $rc -ne 0 ]]; then die "apt-get install ${PACKAGES[*]} failed: $(tail -n 1 "$DIR/apt.log")"; fi
}

write_config() {
  mkdir -p "$DIR"/{munge,ctld,spool,log}
  chmod 700 "$DIR" "$DIR/munge"
  if [[ ! -s $DIR/munge/munge.key ]]; then
    (umask 077 && head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
  fi
  local mem_mb
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
  cat >"$CONF.new" <<EOF
# written by scripts/slurm/start-local-slurm.sh: one node, loopback only, no cgroups, no accounting
ClusterName=genecorpus
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.new" "$CONF"
}

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

choose_namespace() {  # UTS: how slurmctld and slurmd are started so that their host name is `localhost`
  UTS=()
  if unshare --uts true 2>/dev/null; then
    UTS=(unshare --uts sh -c 'hostname localhost && exec "$@"' sh)
  elif getent ahostsv4 "$(hostname)" | awk '{print $1}' | grep -qv '^127\.'; then
    die "unshare --uts is not permitted here, and $(hostname) resolves to an address other than" \
      "127.0.0.x: slurmctld and slurmd would listen on it"
  else
    say "unshare --uts is not permitted here; $(hostname) resolves to 127.0.0.x: started as they are"
  fi
}

check_loopback() {  # every TCP port slurmctld and slurmd listen on is on 127.0.0.1
  local outside
  outside=$(ss -Hltnp | grep -E '"slurm(ctld|d)"' | awk '$4 !~ /^127\./ {print $4, $6}' || true)
  if [[ -n $outside ]]; then
    bash "$(dirname "$0")/stop-local-slurm.sh"
    die "stopped: a daemon listens outside loopback: $outside"
  fi
}

node_up() {  # idle, or running jobs: not down, drained or unknown
  [[ $(sinfo -h -n localhost -o %T 2>/dev/null) =~ ^(idle|mixed|allocated|completing)$ ]]
}

start_daemons() {
  export SLURM_CONF=$CONF
  choose_namespace
  if ! alive munged; then
    rm -f "$DIR/munge/munge.socket"
    setsid munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
      --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
      </dev/null >>"$DIR/log/munged.log" 2>&1 || die "munged did not start: $(tail -n 1 "$DIR/log/munged.log")"
    wait_for 10 test -S "$DIR/munge/munge.socket" || die "munged made no socket: $DIR/log/munged.log"
  fi
  if ! alive slurmctld; then
    setsid "${UTS[@]}" slurmctld -c </dev/null >>"$DIR/log/slurmctld.out" 2>&1 \
      || die "slurmctld did not start: $(tail -n 1 "$DIR/log/slurmctld.log" 2>/dev/null)"
    wait_for 20 scontrol ping \
      || die "slurmctld does not answer: $(tail -n 1 "$DIR/log/slurmctld.log" 2>/dev/null)"
  fi
  if ! alive slurmd; then
    setsid "${UTS[@]}" slurmd -N localhost </dev/null >>"$DIR/log/slurmd.out" 2>&1 \
      || die "slurmd did not start: $(tail -n 1 "$DIR/log/slurmd.log" 2>/dev/null)"
  fi
  wait_for 30 node_up \
    || die "node localhost is not up after 30 s: $(sinfo -h -N -o '%N %T %E' 2>&1 | head -n 1); see $DIR/log"
}

mkdir -p "$DIR"
install_packages
if ! { alive munged && alive slurmctld && alive slurmd; }; then
  if [[ $(id -u) -ne 0 ]]; then
    die "no local SLURM of $DIR runs (that this user can see), and starting one needs root"
  fi
  write_config  # only while something is down: running daemons keep the file they read
fi
start_daemons
check_loopback
say "node localhost up; use it with:"
echo "export SLURM_CONF=$CONF"
