"""`fsdp-ft tune` under faults, with real trials (the tiny random-init Llama, real `fsdp-ft run` processes):
- a SIGTERMed or kill -9'd search resumes the same trial from its checkpoint with the loss curve of an
  uninterrupted run; a trial taken over before its first checkpoint fails and its parameters are asked again;
- trials whose config is refused, whose run fails at start-up, or whose loss turns NaN are FAIL with the reason,
  and the search goes on (a worker gives up after --max-failures in a row, exit 1).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from tune_helpers import env, rows, start_tune, states, study_of, train_losses, tune, write_config

pytestmark = pytest.mark.distributed
optuna = pytest.importorskip("optuna")


def wait_for_train_step(run, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (run / "metrics.jsonl").is_file() and any(s >= step for s in train_losses(run)):
            return
        time.sleep(0.2)
    raise AssertionError(f"{run} never reached step {step}")


def trial_processes(trial_yaml) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(trial_yaml)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


LONG = {"train": {"max_steps": 16, "log_every": 1, "eval_every": 4, "save_every": 4}}
ONE_TRIAL = {"objective": "loss", "pruner": "none",
             "space": {"optim.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the baseline trial's config, outside any search."""
    folder = tmp_path_factory.mktemp("tune-reference")
    config = write_config(folder, ONE_TRIAL, **LONG)
    res = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "train", str(config), f"output_dir={folder / 'ref'}"],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return train_losses(folder / "ref")


@pytest.mark.parametrize("how", ["sigterm", "kill-9"])
def test_a_stopped_search_resumes_the_same_trial_with_the_same_losses(tmp_path, reference, how):
    config = write_config(tmp_path, ONE_TRIAL, **LONG)
    out = tmp_path / "search"
    run = out / "trials" / "0000"
    proc = start_tune(config, "--trials", "1")
    wait_for_train_step(run, 5, proc)
    os.kill(proc.pid, signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode == (128 + signal.SIGTERM if how == "sigterm" else -signal.SIGKILL)
    deadline = time.time() + 120  # kill -9: the trial gets SIGTERM from the kernel (its parent died) and saves
    while trial_processes(run / "trial.yaml") and time.time() < deadline:
        time.sleep(0.5)
    assert not trial_processes(run / "trial.yaml")
    assert states(study_of(out)) == {0: "RUNNING"}
    assert (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step-*"))
    claim = json.loads((run / "claim.json").read_text())
    assert claim["state"] == ("released" if how == "sigterm" else "running")
    stopped_at = max(train_losses(run))
    assert stopped_at < 16

    res = tune(config, "--trials", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    why = "released by" if how == "sigterm" else "its worker (pid"
    assert f"trial 0 resumes ({why}" in res.stderr
    study = study_of(out)
    assert states(study) == {0: "COMPLETE"}
    assert study.trials[0].params == {"optim.lr": 3.0e-3}
    assert (run / "console.log").read_text().count("=== ") == 2  # two launches of the same trial
    got = train_losses(run)
    assert sorted(got) == list(range(1, 17))
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    final_eval = [r for r in rows(run) if r.get("split") == "eval"][-1]
    assert study.trials[0].value == pytest.approx(final_eval["loss"])


def test_a_trial_taken_over_before_its_first_checkpoint_fails_and_its_params_are_asked_again(tmp_path):
    """A RUNNING trial whose worker process is gone and that never saved: FAIL with the reason, and the same
    parameters come back as a new trial (no training needed to check the bookkeeping)."""
    from fsdp_ft.tuning import trial_dir
    from fsdp_ft.tuning.search import TuneOptions, prepare
    from fsdp_ft.tuning.worker import Search, WorkerOptions

    config = write_config(tmp_path, ONE_TRIAL)
    spec, study, record = prepare(str(config), [], TuneOptions(trials=3))
    out = tmp_path / "search"
    trial = study.ask()
    spec.suggest(trial)  # the enqueued baseline: lr 3e-3
    folder = trial_dir.trial_path(out, trial.number)
    folder.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    trial_dir.write_json(folder / "claim.json", {"worker": "gone", "host": os.uname().nodename, "pid": dead.pid,
                                                  "state": "running"})
    search = Search(spec, out, record, WorkerOptions(trials=3))
    job = search.next_job(study, study._storage, 0)
    failed = study.trials[0]
    assert failed.state.name == "FAIL"
    assert "before the first checkpoint" in failed.user_attrs["fail_reason"]
    assert job.number == 1 and job.params == failed.params == {"optim.lr": 3.0e-3}
    assert study.trials[1].user_attrs["retry_of"] == 0
    assert yaml.safe_load((out / "trials" / "0001" / "trial.yaml").read_text())["optim"]["lr"] == 3.0e-3


@pytest.mark.slow  # CI time (docs/testing.md, "What the default run leaves out")
def test_refused_configs_and_nan_losses_fail_with_their_reason_and_the_search_goes_on(tmp_path):
    """A grid of (finetune.method x freeze_embeddings): method full with a frozen embedding is refused by the
    config check and recorded FAIL; the other three train. Then a search whose only lr makes the loss NaN: each
    trial FAIL with the step, and the worker gives up after --max-failures of them, exit 1."""
    config = write_config(tmp_path, {
        "objective": "loss", "sampler": "grid", "pruner": "none",
        "space": {"finetune.method": {"type": "categorical", "choices": ["partial", "full"]},
                  "finetune.freeze_embeddings": {"type": "categorical", "choices": [False, True]}}},
        finetune={"method": "partial"}, train={"max_steps": 4, "eval_every": 4})
    res = tune(config, "--trials", "4")  # three can complete: the grid runs out first
    assert res.returncode == 0, res.stderr[-3000:]
    study = study_of(tmp_path / "search")
    by_params = {(t.params["finetune.method"], t.params["finetune.freeze_embeddings"]): t for t in study.trials}
    assert len(by_params) == 4 and len(study.trials) == 4
    refused = by_params[("full", True)]
    assert refused.state.name == "FAIL"
    assert "config refused" in refused.user_attrs["fail_reason"] and "finetune" in refused.user_attrs["fail_reason"]
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3 + ["FAIL"]

    crash_dir = tmp_path / "crash"  # a config the run itself refuses once started (its first eval has no accuracy)
    crash_dir.mkdir()
    config = write_config(crash_dir, {
        "objective": "loss", "sampler": "grid", "pruner": "none",
        "space": {"train.best_metric": {"type": "categorical", "choices": ["loss", "accuracy"]}}},
        train={"max_steps": 4, "eval_every": 2})
    res = tune(config, "--trials", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    study = study_of(crash_dir / "search")
    got = {t.params["train.best_metric"]: t for t in study.trials}
    assert got["loss"].state.name == "COMPLETE" and got["accuracy"].state.name == "FAIL"
    assert "config key 'train.best_metric'" in got["accuracy"].user_attrs["fail_reason"]
    assert got["accuracy"].user_attrs["step"] == 2  # the step it reached, kept with the reason

    nan_dir = tmp_path / "nan"
    nan_dir.mkdir()
    config = write_config(nan_dir, {
        "objective": "loss", "sampler": "grid", "pruner": "none",
        "space": {"optim.lr": {"type": "categorical", "choices": [1.0e30]}}},
        optim={"lr": 1.0e30, "warmup_steps": 0}, train={"max_steps": 4, "eval_every": 4})
    res = tune(config, "--trials", "1", "--max-failures", "1")
    assert res.returncode == 1, res.stderr[-3000:]
    study = study_of(nan_dir / "search")
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert "training loss is nan" in study.trials[0].user_attrs["fail_reason"]
    assert "failed in a row" in res.stderr


