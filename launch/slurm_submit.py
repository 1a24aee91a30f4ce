#!/usr/bin/env python
"""Submit fsdp_ft training to SLURM from Python: what `fsdp-ft submit` does, as a script to copy and adapt.

    python launch/slurm_submit.py CONFIG.yaml [key=value ...]            # options below, or from the environment
    NODES=2 GPUS_PER_NODE=8 PARTITION=gpu TIME_MIN=240 python launch/slurm_submit.py configs/tiny.yaml --dry-run

Jobs run through submitit (one task per GPU); before the time limit or on preemption they checkpoint and requeue
themselves, and resume from the newest checkpoint. Logs: output_dir/logs/rank-N.log and output_dir/logs/slurm/.
Without CPUS_PER_TASK / MEM_GB each rank gets its share of the node's cores and memory (from sinfo) and
OMP_NUM_THREADS to match.
"""
import os
import sys

from fsdp_ft.errors import UserError
from fsdp_ft.launchers.slurm import SubmitOptions, submit


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    env = os.environ.get
    opts = SubmitOptions(
        nodes=int(env("NODES", "1")),
        gpus_per_node=int(env("GPUS_PER_NODE", "0")),
        cpus_per_task=int(env("CPUS_PER_TASK")) if env("CPUS_PER_TASK") else None,
        mem_gb=float(env("MEM_GB")) if env("MEM_GB") else None,
        partition=env("PARTITION"), account=env("ACCOUNT"), qos=env("QOS"), constraint=env("CONSTRAINT"),
        time=int(env("TIME_MIN", "60")),
        setup=[line for line in env("SETUP", "").split(";") if line.strip()],   # e.g. "module load cuda"
        dry_run="--dry-run" in argv, wait="--wait" in argv,
    )
    try:
        return submit(args[0], args[1:], opts)
    except UserError as e:
        print(f"fsdp-ft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
