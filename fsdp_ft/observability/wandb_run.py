"""Weights & Biases: rank 0 mirrors the run's metrics rows to a W&B run, where most teams already compare runs.

metrics.jsonl stays the record. W&B is a copy that may lag or fail mid-run without stopping training: a failed
log is reported once and W&B is left alone for the rest of the run.

- The W&B run id is the fsdp_ft run id, so a resume (after a preemption, on other nodes, with another number of
  ranks) continues the same W&B run. Steps that a resume trains again are logged again at the same global step.
- Train and eval rows become `train/<key>` and `eval/<key>` plotted against `train/global_step`, the optimizer
  step; lists (per-rank readings, the confusion matrix) stay in metrics.jsonl only.
- A run stopped by a signal (a preemption, a time limit) is marked preempted with its exit code, not finished.
- The resolved config is the W&B config, with the set-up row's scalar facts (ranks, device, parameter counts,
  batch) under `setup`; the final row (where `final/` is, the best step) goes to the summary.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError

STEP = "train/global_step"
PLOTTED = ("train", "eval")  # row splits that become time series; setup and final rows are not


def init_args(cfg: Config, out: Path, run_id: str, study: str | None = None) -> dict:
    """wandb.init's arguments for this run. `study`: the search a trial belongs to, its default group."""
    w = cfg.wandb
    mode = None if w.mode == "auto" else w.mode  # auto: WANDB_MODE, `wandb offline`, else online
    offline = (mode or os.environ.get("WANDB_MODE", "")) in ("offline", "dryrun")
    name = w.name or (f"trial-{out.name}" if study else out.name)  # a trial's folder is trials/NNNN
    return dict(project=w.project, entity=w.entity, name=name, group=w.group or study,
                tags=list(w.tags) or None, id=run_id, resume=None if offline else "allow", dir=str(out),
                mode=mode, job_type="train", config=cfg.to_dict())


def scalars(row: dict, prefix: str = "", skip: tuple = ("split",)) -> dict:
    """The row's numbers, strings and booleans (lists and dicts left out), keys prefixed."""
    return {f"{prefix}{k}": v for k, v in row.items() if isinstance(v, (int, float, str, bool)) and k not in skip}


class WandbRun:
    """Rank 0's W&B run; `log` takes metrics.jsonl's rows as they are written."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def start(cls, cfg: Config, out: Path, run_id: str, study: str | None, verbose: bool) -> "WandbRun":
        """Start or continue the run's W&B run; any failure is one line naming the key and the way out."""
        import wandb

        try:
            run = wandb.init(**init_args(cfg, out, run_id, study), settings=wandb.Settings(silent=not verbose))
            run.define_metric(STEP)
            run.define_metric("*", step_metric=STEP)
        except Exception as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"config key 'wandb.project'={cfg.wandb.project!r}: W&B did not start ({why}); log in "
                              "with `wandb login` or WANDB_API_KEY, or set wandb.mode=offline and upload later with "
                              "`wandb sync`") from None
        offline = run.settings.mode in ("offline", "dryrun")
        where = f"offline in {run.settings.sync_dir}, upload with `wandb sync`" if offline else run.url
        print(f"[fsdp_ft] W&B run {run.id}: {where}", file=sys.stderr, flush=True)
        return cls(run)

    def log(self, row: dict) -> None:
        if self.run is None:
            return
        split = row.get("split", "train")
        try:
            if split in PLOTTED:
                values = {k: v for k, v in scalars(row, f"{split}/", skip=("split", "step")).items()
                          if not isinstance(v, (str, bool))}  # the step is train/global_step
                self.run.log({**values, STEP: row["step"]})
            elif split == "setup":
                self.run.config.update({"setup": scalars(row)}, allow_val_change=True)
            else:
                self.run.summary.update(scalars(row, f"{split}/"))
        except Exception as e:  # training goes on; metrics.jsonl has every row
            print(f"[fsdp_ft] warning: W&B logging stopped at step {row.get('step')} "
                  f"({type(e).__name__}: {e}); metrics.jsonl keeps every row", file=sys.stderr, flush=True)
            self.run = None

    def finish(self, stop_signal: int = 0) -> None:
        """Close the W&B run: finished, or preempted (W&B's state for a run that will be resumed) when training
        stopped on a signal and saved, with the exit code the rank leaves with."""
        if self.run is None:
            return
        if stop_signal:
            self.run.mark_preempting()
        self.run.finish(exit_code=128 + stop_signal if stop_signal else 0)
        self.run = None
