#!/usr/bin/env bash
# Stop the cluster tests/slurm/start_cluster.sh started, by the pids in its pid files, and wipe its state.
set -uo pipefail
D=${FSDP_FT_SLURM_DIR:-/tmp/fsdp-ft-slurm}
[ -d "$D" ] || exit 0
stop() {  # stop PIDFILE: TERM, wait up to 5 s, then KILL
  local f=$1; [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f" 2>/dev/null) || return 0
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}
for f in "$D"/slurmd-*.pid; do stop "$f"; done
stop "$D/slurmctld.pid"
stop "$D/slurmdbd.pid"
stop "$D/mariadb.pid"
if [ -f "$D/munge.started" ]; then stop /run/munge/munged.pid; fi
rm -rf "$D"
echo "[slurm-cluster] stopped" >&2
