#!/usr/bin/env bash
# Stop the cluster tests/slurm/start_cluster.sh started, by the pids in its pid files, and wipe its state.
set -uo pipefail
# Called from pytest (a test session's teardown), it leaves the cluster running while another pytest process that
# uses it is alive (start_cluster.sh notes them in $D/users, under the same lock); by hand it always stops.
D=${FSDP_FT_SLURM_DIR:-/tmp/fsdp-ft-slurm}
if [ "${FSDP_FT_SLURM_LOCKED:-}" != "$D" ]; then  # not already under the lock (start_cluster.sh restarting)
  exec env FSDP_FT_SLURM_LOCKED="$D" FSDP_FT_SLURM_CALLER="$PPID" flock -o "$D.lock" bash "$0" "$@"
fi
[ -d "$D" ] || exit 0
if [ -n "${PYTEST_CURRENT_TEST:-}" ] && [ -z "${FSDP_FT_SLURM_FORCE:-}" ]; then
  rm -f "$D/users/$FSDP_FT_SLURM_CALLER"
  for f in "$D"/users/*; do
    [ -e "$f" ] || continue
    if kill -0 "${f##*/}" 2>/dev/null; then
      echo "[slurm-cluster] still used by pytest process ${f##*/}: left running" >&2
      exit 0
    fi
    rm -f "$f"
  done
fi
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
