"""Run under torchrun (2 gloo ranks): fsdp_ft.runtime.distributed's process-group timeouts, set-up and steps apart.

Set-up timeout 60 s, step timeout STEP_S. Rank 0 prepares the data (main_process_first) for SLOW_S > STEP_S while
rank 1 waits in the barrier; then, inside step_timeout(), rank 0 is as slow before a barrier, which rank 1 must give
up on after STEP_S. Writes argv[1]/rankN.json: what the barriers did, how long rank 1 waited, and the timeouts (s)
of every process group of the rank (the default one and a 2-D mesh's sub-groups) at set-up, in and after the steps.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from fsdp_ft.runtime import distributed

STEP_S, SLOW_S = 1.0, 2.0


def timeouts() -> list[float]:
    groups = dist.distributed_c10d._world.pg_map
    return sorted({g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups})


env = distributed.init_distributed(setup_timeout_minutes=1.0, timeout_minutes=STEP_S / 60)
distributed.build_mesh(env, hybrid_replicas=2)  # (replicate 2, shard 1): size-1 sub-groups made by new_group
report = {"groups": len(dist.distributed_c10d._world.pg_map), "setup": timeouts()}
t0 = time.monotonic()
with distributed.main_process_first(env):
    if env.is_main:
        time.sleep(SLOW_S)  # rank 0 tokenizes a large dataset
report["prepared_after_s"] = time.monotonic() - t0
with distributed.step_timeout():
    report["steps"] = timeouts()
report["after_steps"] = timeouts()
with distributed.step_timeout():  # last: a timed-out gloo group is not used again
    if env.is_main:
        time.sleep(SLOW_S)
    t0 = time.monotonic()
    try:
        distributed.barrier()
        report["slow_step"] = "passed"
    except RuntimeError as e:
        report["slow_step"] = "timed out" if "timed out" in str(e).lower() or "timeout" in str(e).lower() else str(e)
    report["slow_step_waited_s"] = time.monotonic() - t0
with open(os.path.join(sys.argv[1], f"rank{env.rank}.json"), "w") as f:
    json.dump(report, f)
sys.stdout.flush()
os._exit(0)  # no teardown of a group whose last collective failed
