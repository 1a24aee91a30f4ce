"""Weights & Biases logging, read back from what W&B itself wrote (the offline run's record file, read by
tests/wandb_records.py) and compared with the run's metrics.jsonl."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, cli, free_port
from launch_helpers import kill9_job, wait_for_step
from test_errors import assert_user_error
from wandb_records import history, isolated_wandb, items, offline_runs, read_records, summary

from fsdp_ft.observability.metrics import read_metrics

pytest.importorskip("wandb")

RUN = ["train.max_steps=30", "train.log_every=1", "train.eval_every=10", "train.save_every=0", "train.seq_len=64",
       "train.progress_bar=false", "data.max_eval_samples=16", "wandb.project=fsdp-ft-test", "wandb.mode=offline",
       "wandb.tags=[a,b]"]


def _run(out: Path, *overrides: str, check: bool = True):
    return cli("run", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TINY),
               f"output_dir={out}", *RUN, *overrides, check=check, timeout=240)


def _expected(rows: list[dict], split: str) -> list[dict]:
    """metrics.jsonl's rows of a split as W&B should hold them: numbers under `split/`, against the global step."""
    want = []
    for row in rows:
        if row.get("split", "train") != split:
            continue
        numbers = {f"{split}/{k}": v for k, v in row.items() if k not in ("split", "step")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        want.append({**numbers, "train/global_step": row["step"]})
    return want


def _plotted(got: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith("_")} for h in got]


def test_two_ranks_log_one_wandb_run_that_a_preemption_and_resume_continue(tmp_path, monkeypatch):
    """A 2-rank run stopped by SIGUSR2 (SLURM's time-limit warning) and resumed: one W&B run (rank 0's, with the
    fsdp_ft run id), marked preempted with exit code 140 and then continued. Its rows, across both processes, are
    exactly metrics.jsonl's numbers against the global step; its config is the resolved config plus the set-up
    facts; the summary says which step final/ holds."""
    isolated_wandb(monkeypatch, tmp_path)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fsdp_ft.cli", "run", "--nproc-per-node", "2", "--rdzv-endpoint",
                             f"127.0.0.1:{free_port()}", str(TINY), f"output_dir={out}", *RUN], cwd=REPO,
                            env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(out, 1, alive=lambda: proc.poll() is None)
        proc.send_signal(signal.SIGUSR2)
        output = proc.communicate(timeout=120)[0]
    finally:
        kill9_job(proc)
    assert proc.returncode == 128 + signal.SIGUSR2, output[-3000:]
    first = offline_runs(out)
    assert len(first) == 1, first  # rank 0 alone
    records = read_records(first[0])
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "preempting" in kinds and [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [
        128 + signal.SIGUSR2]

    run = [r.run for r in records if r.WhichOneof("record_type") == "run"][0]
    assert (run.run_id, run.project, run.display_name, list(run.tags)) == (run_id, "fsdp-ft-test", "run", ["a", "b"])
    config = items(run.config.update)
    assert config["optim"]["lr"] == 3.0e-3 and config["train"]["max_steps"] == 30
    assert config["wandb"]["mode"] == "offline"
    updates = [items(r.config.update) for r in records if r.WhichOneof("record_type") == "config"]
    setup = [u["setup"] for u in updates if "setup" in u]
    assert len(setup) == 1 and setup[0]["world_size"] == 2 and setup[0]["run_id"] == run_id
    assert setup[0]["trainable_params"] == read_metrics(out)[0]["trainable_params"]

    # the resume: a second W&B process log under the same run id, which ends finished (exit code 0)
    _run(out)
    second = [p for p in offline_runs(out) if p not in first]
    assert len(second) == 1
    records2 = read_records(second[0])
    assert [r.run.run_id for r in records2 if r.WhichOneof("record_type") == "run"] == [run_id]
    assert [r.exit.exit_code for r in records2 if r.WhichOneof("record_type") == "exit"] == [0]

    rows = read_metrics(out)
    got = _plotted(history(records) + history(records2))
    want_train, want_eval = _expected(rows, "train"), _expected(rows, "eval")
    assert [h["train/global_step"] for h in want_train] == list(range(1, 31))  # stopped at k, resumed at k + 1
    assert [h["train/global_step"] for h in want_eval] == [10, 20, 30]
    assert [h for h in got if "train/loss" in h] == want_train
    assert [h for h in got if "eval/loss" in h] == want_eval
    final = [row for row in rows if row.get("split") == "final"]
    assert len(final) == 1 and summary(records2)["final/final_from_step"] == final[0]["final_from_step"] == 30


def test_wandb_that_cannot_log_in_stops_every_rank_in_one_line(tmp_path, monkeypatch):
    """Online without credentials: both ranks stop before the model is built, exit 2, one line saying how to log
    in; nothing is trained and no rank waits for rank 0 until a timeout."""
    isolated_wandb(monkeypatch, tmp_path)
    out = tmp_path / "run"
    proc = _run(out, "wandb.mode=online", check=False)
    assert_user_error(proc, "config key 'wandb.project'='fsdp-ft-test': W&B did not start (No API key configured",
                      "`wandb login`", "wandb.mode=offline")
    assert not (out / "checkpoints").exists() and not read_metrics(out)


def test_trials_are_grouped_by_their_study(tmp_path, monkeypatch):
    from fsdp_ft.config import load_config
    from fsdp_ft.observability.wandb_run import init_args

    trial = tmp_path / "trials" / "0007"  # fsdp-ft tune's folder of trial 7
    cfg = load_config(TINY, [f"output_dir={trial}", "wandb.project=p"])
    args = init_args(cfg, trial, "rid", study="lr-search")
    assert (args["group"], args["name"], args["id"], args["resume"], args["mode"]) == (
        "lr-search", "trial-0007", "rid", "allow", None)
    assert (init_args(cfg, trial, "rid")["group"], init_args(cfg, trial, "rid")["name"]) == (None, "0007")
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B ignores `resume` offline and says so: not asked for then
    cfg.wandb.group, cfg.wandb.name = "mine", "n"
    args = init_args(cfg, trial, "rid", study="lr-search")
    assert (args["group"], args["name"], args["resume"]) == ("mine", "n", None)
