#!/usr/bin/env bash
# Stop the single-node SLURM that start-local-slurm.sh started: its jobs (scancel), then its slurmd,
# slurmctld and munged, each by the pid in its pid file. The packages, the folder and its logs stay.
# Idempotent: a daemon that is not running is skipped. GENECORPUS_SLURM_DIR as for the start script.
set -euo pipefail

DIR=${GENECORPUS_SLURM_DIR:-/tmp/genecorpus-slurm}
export SLURM_CONF=$DIR/slurm.conf

pid_of() {  # pid_of NAME: the pid in $DIR/NAME.pid if that process runs and is NAME, else nothing
  local file=$DIR/$1.pid pid
  [[ -s $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]; then
    echo "$pid"
  fi
}

if [[ -n $(pid_of slurmctld) && -n $(pid_of slurmd) ]]; then  # jobs first, so that no worker lingers
  scancel --full --nodelist=localhost 2>/dev/null || true
  for _ in $(seq 100); do
    if [[ -z $(squeue -h -w localhost 2>/dev/null) ]]; then break; fi
    sleep 0.1
  done
fi
pids=()
for name in slurmd slurmctld munged; do
  pid=$(pid_of "$name")
  if [[ -n $pid ]]; then pids+=("$pid"); fi
done
if [[ ${#pids[@]} -gt 0 ]]; then
  kill -TERM "${pids[@]}"
  for _ in $(seq 150); do  # each takes ~2 s to shut down; together too
    alive=()
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi
    done
    if [[ ${#alive[@]} -eq 0 ]]; then break; fi
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
  done
fi
rm -f "$DIR"/{slurmd,slurmctld,munged}.pid
echo "stop-local-slurm: stopped (logs in $DIR/log)" >&2
