"""`fsdp-ft tune`: searches of real trials (the tiny random-init Llama, real `fsdp-ft run` processes over gloo),
read back from the study and the trial folders (faults: test_tune_faults.py).

- 2-rank trials get the same parameters on every rank; a pruned 2-rank trial stops all ranks at the eval that
  pruned it, and the search goes on;
- two workers on one journal spend the budget exactly; best.yaml reruns to its trial's value;
- two objectives give a Pareto front; --timeout ends the asking;
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from tune_helpers import env, rows, start_tune, states, study_of, tune, write_config
from wandb_records import isolated_wandb, offline_runs, read_records, summary

pytestmark = pytest.mark.distributed
optuna = pytest.importorskip("optuna")
WANDB = importlib.util.find_spec("wandb") is not None  # W&B is checked where it is installed (the dev extra)

# ---------------------------------------------------------------- 2 ranks, pruning


def test_two_rank_trials_share_params_and_a_pruned_trial_stops_every_rank(tmp_path, monkeypatch):
    """The baseline (trial 0, lr 3e-3) completes; trial 1's lr of at most 1e-7 cannot beat it at the first eval, so
    the median pruner stops it at step 2 on both ranks, and the search still ends with its budget spent. With W&B
    on (offline), each trial is one W&B run named after its folder, in a group named after the study."""
    config = write_config(tmp_path, {
        "objective": "loss", "pruner": "median", "pruner_startup_trials": 1,
        "space": {"optim.lr": {"type": "float", "low": 1.0e-8, "high": 1.0e-7, "log": True}}},
        wandb={"project": "tune-test", "mode": "offline"} if WANDB else {})
    if WANDB:
        isolated_wandb(monkeypatch, tmp_path, home=False)
    started = time.monotonic()
    res = tune(config, "--trials", "2", "--nproc-per-node", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "search"
    study = study_of(out)
    trials = {t.number: t for t in study.get_trials()}
    assert [t.state.name for t in trials.values()].count("COMPLETE") == 1
    pruned = [t for t in trials.values() if t.state.name == "PRUNED"]
    assert len(pruned) == 1 and 1.0e-8 <= pruned[0].params["optim.lr"] <= 1.0e-7
    assert trials[0].params == {"optim.lr": 3.0e-3} and trials[0].state.name == "COMPLETE"
    for number, t in trials.items():
        run = out / "trials" / f"{number:04d}"
        setup = next(r for r in rows(run) if r.get("split") == "setup")
        assert setup["world_size"] == 2
        hashes = setup["config_sha256_per_rank"]
        assert len(hashes) == 2 and hashes[0] == hashes[1]  # both ranks trained the same config
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == t.params["optim.lr"]
    run = out / "trials" / f"{pruned[0].number:04d}"
    got = rows(run)
    assert [r["step"] for r in got if r.get("split") == "pruned"] == [2]
    assert max(r["step"] for r in got if "split" not in r) == 2  # no step after the eval that pruned it
    assert pruned[0].intermediate_values.keys() == {2}
    assert not (run / "final").exists()
    assert "PRUNED at step 2" in res.stderr
    if WANDB:
        for number in trials:
            (log,) = offline_runs(out / "trials" / f"{number:04d}")
            records = read_records(log)
            (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
            assert (run.display_name, run.run_group) == (f"trial-{number:04d}", study.study_name)
            assert summary(records).get("pruned/step") == (2 if number == pruned[0].number else None)
    assert time.monotonic() - started < 300


# ---------------------------------------------------------------- two workers, the budget, best.yaml, report


def test_two_workers_on_one_journal_spend_the_budget_exactly_and_best_yaml_reruns(tmp_path):
    config = write_config(tmp_path, {
        "objective": "loss", "sampler": "random", "seed": 3, "pruner": "none",
        "space": {"optim.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}}})
    first, second = start_tune(config, "--trials", "4"), None
    time.sleep(3)  # the first one creates the study; the second continues it
    second = start_tune(config, "--trials", "4")
    outs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [o[1][-2000:] for o in outs]
    out = tmp_path / "search"
    study = study_of(out)
    assert sorted(states(study).values()) == ["COMPLETE"] * 4  # none lost, none extra, none left running
    finished = [line for o in outs for line in o[1].splitlines() if " COMPLETE " in line and line.startswith("[tune] trial")]
    assert len(finished) == 4 and len({line.split()[2] for line in finished}) == 4  # each told once
    workers = {json.loads((out / "trials" / f"{n:04d}" / "claim.json").read_text())["pid"] for n in range(4)}
    assert workers == {first.pid, second.pid}  # both pulled trials
    baseline = study.trials[0]
    assert baseline.params == {"optim.lr": 3.0e-3} and baseline.user_attrs["baseline"]
    for t in study.trials:
        for key in ("seed", "config_hash", "versions", "sampler_seed", "git"):
            assert key in t.user_attrs
    best = study.best_trial
    assert (out / "best").resolve() == (out / "trials" / f"{best.number:04d}" / "final").resolve()
    rerun = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "train", str(out / "best.yaml")], cwd=REPO,
                           env=env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    last_eval = [r for r in rows(out / "best-run") if r.get("split") == "eval"][-1]
    assert last_eval["loss"] == pytest.approx(best.value, rel=1e-6)
    page = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "report", str(out)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert page.returncode == 0 and (out / "report.html").is_file(), page.stderr


def test_two_objectives_give_a_pareto_front_and_a_timeout_ends_the_asking(tmp_path):
    """Loss and tokens/s: every complete trial carries both values, the table marks the front, and there is no
    single best to link. --timeout 1 lets only the first trial start (it finishes; nothing new is asked)."""
    config = write_config(tmp_path, {
        "objective": "loss", "second_objective": "tokens_per_s", "pruner": "none", "sampler": "random",
        "space": {"optim.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}}},
        train={"max_steps": 4, "eval_every": 4})
    res = tune(config, "--trials", "5", "--timeout", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "search"
    study = study_of(out)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    trial = study.trials[0]
    run_rows = rows(out / "trials" / "0000")
    speeds = [r["tokens_per_s"] for r in run_rows if "split" not in r]
    final_eval = [r for r in run_rows if r.get("split") == "eval"][-1]
    assert trial.values == pytest.approx([final_eval["loss"], sum(speeds) / len(speeds)])
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert "* on the Pareto front" in res.stdout and "0*" in res.stdout
    assert not (out / "best.yaml").exists() and not (out / "best").exists()
