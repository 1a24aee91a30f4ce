"""`fsdp-ft submit --tune` on the local SLURM cluster (tests/slurm/start_cluster.sh): a job array of one-node
workers shares one study and spends its budget exactly; an array task stopped mid-trial (scontrol requeue, or the
preemption / time-limit signal USR2) is requeued and the same trial number resumes from its checkpoint on the loss
curve of an uninterrupted run; the dry run is one array script and creates nothing; bad combinations fail in one
line before anything is written or queued."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import test_slurm
from conftest import ASSETS, assert_losses_close, cli, losses
from launch_helpers import setup_rows

pytestmark = pytest.mark.distributed
slurm_cluster = test_slurm.slurm_cluster  # the session's local cluster, shared with test_slurm.py

LAUNCH = "=== "  # each launch of a trial starts its console.log section with this line (fsdp_ft.tuning.worker)


def search_config(folder: Path, *, max_steps: int, eval_every: int, save_every: int, pruner: str) -> Path:
    """A search over the learning rate of the tiny random-init Llama, its output_dir folder/search."""
    tree = {"output_dir": str(folder / "search"), "task": "causal_lm",
            "model": {"path": str(ASSETS / "tiny-llama"), "random_init": True},
            "data": {"train": str(ASSETS / "data" / "tiny_text_train.jsonl"),
                     "eval": str(ASSETS / "data" / "tiny_text_eval.jsonl"), "max_eval_samples": 16},
            "optim": {"lr": 3.0e-3, "warmup_steps": 2},
            "train": {"max_steps": max_steps, "micro_batch_size": 4, "seq_len": 64, "log_every": 1,
                      "eval_every": eval_every, "save_every": save_every, "progress_bar": False},
            "tune": {"objective": "loss", "pruner": pruner, "pruner_startup_trials": 1,
                     "space": {"optim.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}}}}
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def submit_tune(config: Path, *args: str) -> subprocess.CompletedProcess:
    return cli("submit", str(config), "--tune", "--time", "10", *args, timeout=600)


def array_id(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.split("submitted job ", 1)[1].split(":", 1)[0]


def sacct(job: str, since: float, *options: str) -> list[tuple[str, str]]:
    """(task id, state) rows of array `job`'s tasks (or of the one task ARRAY_TASK) since `since`, oldest first:
    job ids repeat across cluster restarts, and test_slurm.py plants old records under the ids to come."""
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60))
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-S", start, *options, "-j", job],
                         capture_output=True, text=True).stdout
    rows = [tuple(line.split("|", 1)) for line in out.splitlines() if "|" in line]
    return [(i, state) for i, state in rows if (i == job if "_" in job else i.startswith(job + "_"))]


def wait_array(jid: str, since: float, timeout: float = 480) -> list[str]:
    """Wait until every task of array `jid` has left the queue (requeues included); their final states."""
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", jid], capture_output=True, text=True).stdout.strip():
        if time.time() > deadline:
            subprocess.run(["scancel", jid])
            raise AssertionError(f"array {jid} still queued after {timeout} s")
        time.sleep(1)
    for _ in range(40):  # accounting lags the queue by a moment
        final = dict(sacct(jid, since))  # the newest row of each task
        if final and all(s.split()[0] in test_slurm.DONE for s in final.values()):
            break
        time.sleep(0.5)
    return [final[k] for k in sorted(final)]


def launches(folder: Path) -> list[str]:
    """The worker name of each launch of a trial, from its console.log headers ('=== DATE TIME NAME: cmd')."""
    lines = (folder / "console.log").read_text(errors="replace").splitlines()
    return [line.split()[3].rstrip(":") for line in lines
            if line.startswith(LAUNCH) and "fsdp_ft.tuning.child" in line]


def study_trials(out: Path) -> dict[int, object]:
    from fsdp_ft.tuning.study import load

    study, _ = load(out)
    return {t.number: t for t in study.get_trials(deepcopy=False)}


def trial_folders(out: Path) -> dict[int, Path]:
    return {int(p.name): p for p in sorted((out / "trials").iterdir()) if p.is_dir()}


def test_two_task_array_shares_one_study_and_spends_the_budget_exactly(slurm_cluster, tmp_path):
    """--parallel 2 --trials 4: one array, two one-node workers, one study created before they start; each
    worker ran trials (its name slurm-ARRAY_TASK on their claims and console.log), every trial number ran once,
    and the study ends with exactly 4 COMPLETE + PRUNED and nothing left RUNNING; --wait returns 0 after both."""
    from optuna.trial import TrialState

    config = search_config(tmp_path, max_steps=8, eval_every=2, save_every=0, pruner="median")
    out = tmp_path / "search"
    since = time.time()
    res = submit_tune(config, "--parallel", "2", "--trials", "4", "--wait")
    jid = array_id(res)
    assert f"array of 2 tasks ({jid}_0..1)" in res.stdout and f"trials:     {out}/trials/NNNN" in res.stdout, res.stdout
    assert "4 trials (COMPLETE + PRUNED)" in res.stdout and "2 CPUs per task" in res.stdout, res.stdout
    assert f"job {jid}_0 finished" in res.stdout and f"job {jid}_1 finished" in res.stdout, res.stdout
    assert wait_array(jid, since) == ["COMPLETED", "COMPLETED"]
    trials, folders = study_trials(out), trial_folders(out)
    states = {n: t.state for n, t in trials.items()}
    assert sorted(states) == sorted(folders) == [0, 1, 2, 3], (states, folders)
    assert set(states.values()) <= {TrialState.COMPLETE, TrialState.PRUNED}, states
    workers = {f"slurm-{jid}_0", f"slurm-{jid}_1"}
    ran = {}
    for number, folder in folders.items():
        names = launches(folder)
        assert len(names) == 1 and names[0] in workers, (number, names)  # ran once, by one of the array's tasks
        ran[number] = names[0]
        assert json.loads((folder / "claim.json").read_text())["worker"] == f"{names[0]}/0"
        assert json.loads((folder / "trial.json").read_text())["number"] == number
        assert json.loads((folder / "trial.json").read_text())["params"] == trials[number].params
    assert set(ran.values()) == workers, ran  # both tasks pulled trials from the one study
    assert (out / "best.yaml").is_file()


@pytest.mark.parametrize("how", ["scontrol_requeue", "usr2_signal"])
def test_a_requeued_task_resumes_its_trial_on_the_same_curve(slurm_cluster, tmp_path, how):
    """A task stopped mid-trial (scontrol requeue: SIGTERM from SLURM, which requeues; USR2: the trial saves and
    submitit requeues the task): the trial keeps its number and parameters and resumes from its checkpoint (its
    console.log shows two launches, its second run starts at the saved step), no other trial ran twice, the budget
    ends exact (2 COMPLETE, nothing FAIL or RUNNING), and its losses equal an uninterrupted run of its trial.yaml.
    Whichever task resumes the trial (its own after the requeue, or the other one when it is free first), both
    tasks end COMPLETED."""
    from optuna.trial import TrialState

    config = search_config(tmp_path, max_steps=100, eval_every=100, save_every=5, pruner="none")
    out = tmp_path / "search"
    since = time.time()
    jid = array_id(submit_tune(config, "--parallel", "2", "--trials", "2"))
    folder = wait_for_trial_step(out, step=8, timeout=300)
    task = json.loads((folder / "claim.json").read_text())["worker"].split("/")[0].removeprefix("slurm-")
    params = json.loads((folder / "trial.json").read_text())["params"]
    if how == "scontrol_requeue":
        subprocess.run(["scontrol", "requeue", task], check=True)
    else:
        subprocess.run(["scancel", "--signal=USR2", task], check=True)  # what SLURM sends before the time limit
    assert wait_array(jid, since) == ["COMPLETED", "COMPLETED"]
    history = [state for _, state in sacct(task, since, "-D")]
    assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history

    trials, folders = study_trials(out), trial_folders(out)
    assert sorted(trials) == sorted(folders) == [0, 1], (trials, folders)
    assert {t.state for t in trials.values()} == {TrialState.COMPLETE}, {n: t.state for n, t in trials.items()}
    number = int(folder.name)
    for n, f in folders.items():
        assert len(launches(f)) == (2 if n == number else 1), (n, launches(f))
    assert all(name.startswith(f"slurm-{jid}_") for name in launches(folder)), launches(folder)
    assert json.loads((folder / "trial.json").read_text())["params"] == params == trials[number].params
    signum = 15 if how == "scontrol_requeue" else 12
    assert f"stopped by signal {signum} after step" in (folder / "console.log").read_text()
    rows = setup_rows(folder)
    assert len(rows) == 2 and 5 <= rows[1]["step"] < 100, rows  # the second run started from a checkpoint

    rerun = tmp_path / "rerun"
    cli("train", str(folder / "trial.yaml"), f"output_dir={rerun}", timeout=300)
    assert_losses_close(losses(folder), losses(rerun), 1e-5)


def wait_for_trial_step(out: Path, step: int, timeout: float) -> Path:
    """The folder of the first trial whose run has logged `step` and saved a checkpoint."""
    from fsdp_ft.tuning.trial_dir import has_checkpoint

    deadline = time.time() + timeout
    while time.time() < deadline:
        for folder in sorted((out / "trials").glob("[0-9]*")):
            metrics = folder / "metrics.jsonl"
            if not metrics.is_file() or not has_checkpoint(folder):
                continue
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            if any("split" not in r and r.get("step", 0) >= step for r in rows):
                return folder
        time.sleep(0.2)
    raise AssertionError(f"no trial in {out}/trials reached step {step} with a checkpoint in {timeout} s")


def test_tune_dry_run_is_one_array_script_and_creates_nothing(slurm_cluster, tmp_path):
    """--tune --parallel 3 --dry-run: one array of 3 one-node tasks, one process each with the node's 2 cores (sinfo);
    SLURM accepts the script (sbatch --test-only); no study, no search folder, nothing queued."""
    config = search_config(tmp_path, max_steps=8, eval_every=2, save_every=0, pruner="median")
    res = submit_tune(config, "--parallel", "3", "--dry-run")
    script = res.stdout
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --signal=USR2@120"):
        assert script.count(line + "\n") == 1, (line, script)
    assert script.count("srun ") == 1 and "submitted job" not in script
    (tmp_path / "job.sh").write_text(script)
    test = subprocess.run(["sbatch", "--test-only", str(tmp_path / "job.sh")], capture_output=True, text=True)
    assert test.returncode == 0 and "to start at" in test.stderr, test.stderr
    assert not (tmp_path / "search").exists()  # no tune.json, no study.journal, no submitit pickles


def test_tune_dry_run_gives_each_task_the_node_and_its_ranks_cpus(tmp_path):
    """Away from the cluster: each array task is one process on one node with all its GPUs (the trial's ranks) and
    --cpus-per-task for each of them; the study is not created."""
    config = search_config(tmp_path, max_steps=8, eval_every=2, save_every=0, pruner="median")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no SLURM commands on PATH
    res = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "submit", str(config), "--tune", "--dry-run",
                          "--parallel", "2", "--gpus-per-node", "4", "--cpus-per-task", "3"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=12"):
        assert res.stdout.count(line + "\n") == 1, (line, res.stdout)
    srun = next(line for line in res.stdout.splitlines() if line.startswith("srun "))
    assert " --cpus-per-task=12 " in srun, srun
    assert not (tmp_path / "search").exists()


@pytest.mark.parametrize("args,message", [
    (["--tune", "--nodes", "2"], "--tune runs each trial on one node, so --nodes must be 1 (got 2)"),
    (["--tune", "--sweep", "optim.lr=1e-3,2e-3"], "--sweep and --tune do not go together"),
    (["--tune", "--parallel", "0"], "--parallel must be at least 1 (got 0)"),
    (["--tune", "--parallel", "2", "--storage", "sqlite:///study.db"], "SQLite takes one writer at a time"),
    (["--tune", "--space", "no-such-space.yaml"], "no-such-space.yaml' does not exist"),
    (["--parallel", "2"], "--parallel belongs to a search: add --tune"),
    (["--trials", "5"], "--trials belongs to a search: add --tune"),
])
def test_bad_tune_submissions_fail_in_one_line(tmp_path, args, message):
    """Refused before SLURM is asked (no sbatch on PATH here) and before anything is written: exit 2, one line."""
    config = search_config(tmp_path, max_steps=8, eval_every=2, save_every=0, pruner="median")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no SLURM commands on PATH
    res = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "submit", str(config), *args], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("fsdp-ft: error: ") and message in res.stderr, \
        res.stderr
    assert not (tmp_path / "search").exists() and not (tmp_path / "study.db").exists()
