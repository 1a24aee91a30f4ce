#!/usr/bin/env bash
# Workstation launcher: N local ranks of `fsdp-ft train` through torchrun (`fsdp-ft run`), with per-rank logs in
# output_dir/logs/rank-N.log, signals forwarded to the ranks (SHUTDOWN_GRACE_S to save after SIGTERM/USR1/USR2),
# exit 128 + S when every rank saved and stopped on signal S, else the failing rank's code. Each rank gets, unless
# already set here: OMP_NUM_THREADS (cores / ranks), PYTORCH_ALLOC_CONF=expandable_segments:True, the NCCL flight
# recorder (dumps to output_dir/logs/ on a timeout) and, across machines, GLOO_SOCKET_IFNAME (README: GPU and cluster).
#
#   launch/torchrun.sh CONFIG.yaml [key=value ...]                 # all local GPUs (or 1 process on CPU)
#   NPROC=2 launch/torchrun.sh configs/tiny.yaml output_dir=runs/x  # two ranks
#   # two machines: run on each, NODE_RANK=0 on the one whose address is in RDZV_ENDPOINT
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=10.0.0.1:29500 launch/torchrun.sh CONFIG.yaml
#   SHUTDOWN_GRACE_S=900 launch/torchrun.sh CONFIG.yaml   # seconds the ranks get to save after SIGTERM (default 600)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
fsdp_ft=${FSDP_FT:-$( [ -x "$here/.venv/bin/fsdp-ft" ] && echo "$here/.venv/bin/fsdp-ft" || echo fsdp-ft )}
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
opts=()
[ -n "${RDZV_ENDPOINT:-}" ] && opts=(--rdzv-endpoint "$RDZV_ENDPOINT")  # unset on one machine: a free port
[ -n "${SHUTDOWN_GRACE_S:-}" ] && opts+=(--shutdown-grace-s "$SHUTDOWN_GRACE_S")  # unset: fsdp-ft run's default
exec "$fsdp_ft" run --nproc-per-node "${NPROC:-$(( gpus > 0 ? gpus : 1 ))}" --nnodes "${NNODES:-1}" \
  --node-rank "${NODE_RANK:-0}" "${opts[@]}" "$@"
