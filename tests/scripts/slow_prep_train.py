"""`fsdp-ft train ARGS` as a torchrun rank whose rank 0 prepares the data for SLOW_S seconds (longer than the
step timeout the test configures) while the other ranks wait. Records the timeouts (s) of the rank's process groups
while training and, on rank 0, while exporting final/ after it, in output_dir/timeouts-rankN.json."""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from fsdp_ft import cli
from fsdp_ft.training import run_setup, scaffold, trainer

SLOW_S = float(os.environ["SLOW_PREP_S"])
seen = {}
load_splits, fit, export_final = run_setup.load_splits, trainer.Trainer.fit, scaffold.export_final


def timeouts() -> list[float]:
    groups = dist.distributed_c10d._world.pg_map
    return sorted({g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups})


def record(key: str, out_dir: str) -> None:
    seen[key] = timeouts()
    with open(os.path.join(out_dir, f"timeouts-rank{dist.get_rank()}.json"), "w") as f:
        json.dump(seen, f)


def slow_load_splits(cfg, task):
    if dist.get_rank() == 0:
        time.sleep(SLOW_S)
        seen["prepared_s"] = SLOW_S
    return load_splits(cfg, task)


def recording_fit(self):
    record("training", self.cfg.output_dir)
    return fit(self)


def recording_export_final(out, tokenizer):
    record("exporting", str(out))
    return export_final(out, tokenizer)


run_setup.load_splits, trainer.Trainer.fit = slow_load_splits, recording_fit
scaffold.export_final = recording_export_final
sys.exit(cli.main(["train", *sys.argv[1:]]))
