#!/bin/bash
# sbatch template for users who do not submit from Python: one `fsdp-ft run` (torchrun) per node, one rank per GPU.
# Copy it, edit the #SBATCH lines, then:   sbatch launch/sbatch_template.sh CONFIG.yaml [key=value ...]
# Before the time limit (--signal) every rank gets USR2: the ranks agree on a step, save a checkpoint and stop; the
# script then requeues the job, which resumes by itself (resume: auto). On `scontrol requeue` or preemption SLURM
# sends SIGTERM: the ranks checkpoint within KillWait the same way and SLURM requeues.
# Resources: one task per node holds the node's GPUs, --cpus-per-task its cores (fsdp-ft run gives each rank
# OMP_NUM_THREADS = cores / ranks) and --mem=0 the node's whole memory; srun restates --cpus-per-task, which
# Slurm 22.05-23.02's srun no longer takes from sbatch (all ranks would share one core).
# Network: across nodes fsdp-ft run sets GLOO_SOCKET_IFNAME (the CPU half of cpu:gloo,cuda:nccl) to the interface
# that reaches the head node's address below, unless you set it; NCCL picks its own interfaces (InfiniBand first).
# Where the wrong network is used, name them here, e.g.:
#   export GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0   # see `ip -br addr` on a compute node
#SBATCH --job-name=fsdp-ft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -uo pipefail
CONFIG=${1:?usage: sbatch launch/sbatch_template.sh CONFIG.yaml [key=value ...]}
shift
export FSDP_FT=${FSDP_FT:-fsdp-ft}
export GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# the address SLURM itself reaches the head node at (works where node names do not resolve)
head_addr=$(scontrol show node "$head_node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export RDZV="${head_addr:-$head_node}:$((20000 + SLURM_JOB_ID % 20000))"
srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} bash -c 'exec "$FSDP_FT" run --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" \
  --nproc-per-node "$GPUS" --rdzv-endpoint "$RDZV" "$@"' fsdp-ft "$CONFIG" "$@"
rc=$?
if [ "$rc" -eq 140 ]; then  # 128 + SIGUSR2: stopped at the time-limit warning after saving a checkpoint
  echo "fsdp-ft: checkpoint saved before the time limit; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
