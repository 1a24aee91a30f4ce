"""Helpers of the `fsdp-ft tune` tests (test_tune.py, test_tune_faults.py): a search config on the tiny model, the
CLI in a clean environment, and reading the study and the trial folders back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ASSETS, REPO

BASE = {
    "task": "causal_lm",
    "model": {"path": str(ASSETS / "tiny-llama"), "random_init": True},
    "data": {"train": str(ASSETS / "data" / "tiny_text_train.jsonl"),
             "eval": str(ASSETS / "data" / "tiny_text_eval.jsonl"), "max_eval_samples": 16},
    "optim": {"lr": 3.0e-3, "warmup_steps": 2},
    "train": {"max_steps": 8, "micro_batch_size": 4, "seq_len": 64, "log_every": 1, "eval_every": 2,
              "progress_bar": False},
}


def write_config(folder: Path, tune: dict, **sections) -> Path:
    tree = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value) if isinstance(value, dict) else tree.__setitem__(key, value)
    tree["output_dir"] = str(folder / "search")
    tree["tune"] = tune
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FSDP_FT_TRIAL")
    out = {k: v for k, v in os.environ.items() if k not in drop}
    out.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return out


def tune(config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "tune", str(config), *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def start_tune(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fsdp_ft.cli", "tune", str(config), *args], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def study_of(out: Path):
    from fsdp_ft.tuning.study import load

    return load(out)[0]


def rows(run: Path) -> list[dict]:
    from fsdp_ft.observability.metrics import read_metrics

    return read_metrics(run)


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run) if "split" not in r}


def states(study) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
