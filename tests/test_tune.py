"""`fsdp-ft tune`: searches of real trials (the tiny random-init Llama, real `fsdp-ft run` processes over gloo),
read back from the study and the trial folders.

- 2-rank trials get the same parameters on every rank; a pruned 2-rank trial stops all ranks at the eval that
  pruned it, and the search goes on;
- two workers on one journal spend the budget exactly; best.yaml reruns to its trial's value;
- a SIGTERMed search resumes the same trial from its checkpoint with the same loss curve as an uninterrupted run;
  a kill -9'd worker's trial is taken over by a re-run; one taken over before its first checkpoint fails and its
  parameters are asked again;
- trials whose config is refused or whose loss turns NaN are FAIL with the reason, and the search goes on.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ASSETS, REPO

pytestmark = pytest.mark.distributed
optuna = pytest.importorskip("optuna")

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


def wait_for_train_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (run / "metrics.jsonl").is_file() and any(s >= step for s in train_losses(run)):
            return
        time.sleep(0.2)
    raise AssertionError(f"{run} never reached step {step}")


def trial_processes(trial_yaml: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(trial_yaml)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


# ---------------------------------------------------------------- 2 ranks, pruning


def test_two_rank_trials_share_params_and_a_pruned_trial_stops_every_rank(tmp_path):
    """The baseline (trial 0, lr 3e-3) completes; trial 1's lr of at most 1e-7 cannot beat it at the first eval, so
    the median pruner stops it at step 2 on both ranks, and the search still ends with its budget spent."""
    config = write_config(tmp_path, {
        "objective": "loss", "pruner": "median", "pruner_startup_trials": 1,
        "space": {"optim.lr": {"type": "float", "low": 1.0e-8, "high": 1.0e-7, "log": True}}})
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


# ---------------------------------------------------------------- faults


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


# ---------------------------------------------------------------- a real database server


MYSQL_SOCKET = "/run/mysqld/mysqld.sock"


@pytest.fixture(scope="module")
def mariadb_url(slurm_cluster):
    """A database and user on the MariaDB server that the local SLURM cluster runs for its accounting."""
    pytest.importorskip("pymysql")
    db = "fsdp_ft_tune_test"
    sql = (f"DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db}; "
           "CREATE USER IF NOT EXISTS 'tuner'@'localhost' IDENTIFIED BY 'tune-pw'; "
           f"GRANT ALL ON {db}.* TO 'tuner'@'localhost'; FLUSH PRIVILEGES;")
    subprocess.run(["mysql", f"--socket={MYSQL_SOCKET}", "-e", sql], check=True, capture_output=True, timeout=60)
    return f"mysql+pymysql://tuner:tune-pw@localhost/{db}?unix_socket={MYSQL_SOCKET}"


def test_two_workers_share_a_study_on_a_mariadb_server(tmp_path, mariadb_url):
    from fsdp_ft.tuning.study import Record

    config = write_config(tmp_path, {
        "objective": "loss", "sampler": "tpe", "pruner": "median", "pruner_startup_trials": 1,
        "space": {"optim.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}}})
    res = tune(config, "--trials", "3", "--parallel", "2", "--storage", mariadb_url)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tune-pw" not in res.stdout + res.stderr  # the password never reaches the terminal
    record = Record.read(tmp_path / "search")
    assert record.storage == mariadb_url
    study = optuna.load_study(study_name=record.study_name, storage=mariadb_url)  # straight from the server
    got = states(study)
    assert sum(s in ("COMPLETE", "PRUNED") for s in got.values()) == 3 and "RUNNING" not in got.values()
    count = subprocess.run(["mysql", f"--socket={MYSQL_SOCKET}", "-N", "-e",
                            "SELECT COUNT(*) FROM fsdp_ft_tune_test.trials"], capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    assert int(count) == len(got)  # the rows live in the server's tables, not in a local file
    assert not (tmp_path / "search" / "study.journal").exists()
