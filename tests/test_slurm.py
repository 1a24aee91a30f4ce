"""`fsdp-ft submit` on a real SLURM cluster (tests/slurm/start_cluster.sh: slurmctld + slurmdbd + two simulated
nodes on this machine): 2 nodes train like a local 2-rank run; `scontrol requeue` (SIGTERM) and the preemption /
time-limit signal (USR2, requeued by submitit) checkpoint, requeue, resume, and end on the same loss curve; bad
input and crashing ranks fail loudly and fast. `fsdp-ft submit --tune`: a job array of one-node search workers shares
one study and spends its budget exactly; an array task stopped mid-trial (scontrol requeue, or USR2) is requeued and
the same trial number resumes from its checkpoint on the loss curve of an uninterrupted run. A search's study on the
cluster's own MariaDB server (Optuna's RDB storage)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ASSETS, FAST, REPO, TINY, assert_losses_close, cli, losses
from launch_helpers import RUN, rank_pid, reference_losses, setup_rows, wait_for_step
from test_launch import rank_env
from tune_helpers import states, tune, write_config
from fsdp_ft.runtime.rank_env import DUMP_TEMP_FILE, TRACE_BUFFER_SIZE

pytestmark = pytest.mark.distributed
SCRIPTS = REPO / "tests" / "slurm"
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


def cluster_unavailable(euid: int, env: dict, which=shutil.which) -> tuple[str, str] | None:
    """Why the local cluster cannot start here, as ("skip" | "fail", message); None when it can.

    Only a non-root run outside CI skips (a developer's machine: start_cluster.sh needs root). CI runs as root
    (.ci/run: the README's test command), so there a non-root run, or root without SLURM and without apt-get to
    install it, fails: these tests hold README promises (submit on 2 nodes, requeue, the sbatch template) that
    nothing else checks, and a skip would hide them. FSDP_FT_SKIP_SLURM=1 skips on purpose (never in CI)."""
    ci = bool(env.get("CI"))
    if env.get("FSDP_FT_SKIP_SLURM") == "1" and not ci:
        return "skip", "FSDP_FT_SKIP_SLURM=1"
    if euid != 0:
        if ci:
            return "fail", ("CI is set but the tests do not run as root: the SLURM tests start a local cluster "
                            "(tests/slurm/start_cluster.sh) and need root; run CI as root")
        return "skip", "the local SLURM cluster needs root (tests/slurm/start_cluster.sh); CI runs these as root"
    if not (which("slurmctld") or which("apt-get")):
        return "fail", ("running as root, but SLURM is not installed and there is no apt-get to install it: install "
                        "slurm-wlm slurmctld slurmd slurm-client munge slurmdbd mariadb-server (Debian/Ubuntu "
                        "names), or set FSDP_FT_SKIP_SLURM=1 outside CI to skip these tests")
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Start the local cluster (installing the Debian packages if needed) for the session; stop it afterwards."""
    why = cluster_unavailable(os.geteuid(), os.environ)
    if why is not None:
        (pytest.skip if why[0] == "skip" else pytest.fail)(why[1])
    state = os.environ.get("FSDP_FT_SLURM_DIR", "/tmp/fsdp-ft-slurm")
    ours = not (Path(state) / "slurmctld.pid").exists()
    res = subprocess.run(["bash", str(SCRIPTS / "start_cluster.sh")], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    os.environ["SLURM_CONF"] = str(Path(state) / "slurm.conf")
    yield
    if ours:
        subprocess.run(["bash", str(SCRIPTS / "stop_cluster.sh")], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_losses(tmp_path_factory)


def submit(out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return cli("submit", str(TINY), "--nodes", "2", "--time", "10", f"output_dir={out}", *RUN, *args,
               check=check, timeout=300)


def job_id(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.split("submitted job ", 1)[1].split(":", 1)[0]


# Accounting keeps jobs of earlier sessions whose ids repeat (the controller starts with fresh state): the tests
# ask sacct only for jobs since this module loaded (5 minutes of clock skew allowed).
SINCE = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 300))


def sacct(jid: str, field: str) -> list[str]:
    return subprocess.run(["sacct", "-n", "-X", "-P", "-S", SINCE, "-o", field, "-j", jid], capture_output=True,
                          text=True).stdout.split()


def wait_job(jid: str, timeout: float = 240) -> str:
    """Wait until the job has left the queue (requeues included); its final accounting state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not subprocess.run(["squeue", "-h", "-j", jid], capture_output=True, text=True).stdout.strip():
            break
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", jid])
        raise AssertionError(f"job {jid} still queued after {timeout} s")
    for _ in range(20):  # accounting lags the queue by a moment
        states = sacct(jid, "State")
        if states and states[-1].split()[0] in DONE:
            return states[-1]
        time.sleep(0.5)
    return states[-1] if states else "UNKNOWN"


def test_submit_two_nodes_equals_a_local_two_rank_run(slurm_cluster, tmp_path, reference):
    """Besides the losses: each rank gets its node's cores (the simulated nodes have 2; SLURM's default is 1 per
    task) with OMP_NUM_THREADS to match, and the launcher defaults a GPU run expects."""
    res = submit(tmp_path, "--wait")
    assert "rank logs" in res.stdout and "resources:  2 CPUs per rank (2 CPUs per node / 1 ranks)" in res.stdout
    assert_losses_close(losses(tmp_path), reference, 1e-6)
    nodes = {r: (tmp_path / "logs" / f"rank-{r}.log").read_text() for r in (0, 1)}
    assert "rank 0 of 2 on node node1" in nodes[0] and "rank 1 of 2 on node node2" in nodes[1]
    assert (tmp_path / "final" / "config.json").is_file()
    alloc = sacct(job_id(res), "AllocCPUS")
    assert alloc == ["4"], alloc  # 2 nodes x 1 rank x 2 CPUs
    for rank in (0, 1):
        env = rank_env(tmp_path, rank)
        assert env["SLURM_CPUS_PER_TASK"] == env["OMP_NUM_THREADS"] == "2", env
        assert env["PYTORCH_ALLOC_CONF"] == env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True", env
        assert env[TRACE_BUFFER_SIZE] == "2000" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1", env
        assert env[DUMP_TEMP_FILE] == str(tmp_path / "logs" / "nccl-trace-rank-"), env
        assert env["GLOO_SOCKET_IFNAME"] == "lo", env  # the interface toward rank 0's node (127.0.0.1 here)


@pytest.mark.parametrize("how", ["scontrol_requeue", "usr2_signal"])
def test_requeue_checkpoints_resumes_and_matches(slurm_cluster, tmp_path, reference, how):
    """scontrol requeue (SLURM sends SIGTERM and requeues) or the time-limit/preemption signal USR2 (the job
    checkpoints and submitit requeues it): the job resumes by itself and ends on the uninterrupted loss curve."""
    jid = job_id(submit(tmp_path))
    wait_for_step(tmp_path, 1, timeout=120)
    if how == "scontrol_requeue":
        subprocess.run(["scontrol", "requeue", jid], check=True)
    else:
        subprocess.run(["scancel", "--signal=USR2", jid], check=True)  # what submitit's job._interrupt() sends
    assert wait_job(jid) == "COMPLETED"
    rows = setup_rows(tmp_path)
    assert len(rows) == 2 and 1 <= rows[1]["step"] < 24, rows  # ran twice, the second time from a checkpoint
    sig = "SIGTERM" if how == "scontrol_requeue" else "SIGUSR2"
    assert f"stopped on {sig} at step {rows[1]['step']}" in (tmp_path / "logs" / "rank-0.log").read_text()
    assert_losses_close(losses(tmp_path), reference, 1e-6)
    assert (tmp_path / "final" / "config.json").is_file()


def test_dry_run_is_a_valid_batch_script(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(submit(tmp_path, "--dry-run", "--partition", "debug", "--sbatch", "comment=x").stdout)
    assert "#SBATCH --nodes=2" in script.read_text() and "#SBATCH --signal=USR2@120" in script.read_text()
    # the node's 2 cores and its whole memory per task (from sinfo), restated to srun (Slurm 22.05-23.02 needs it)
    assert "#SBATCH --cpus-per-task=2\n" in script.read_text() and "#SBATCH --mem=0\n" in script.read_text()
    srun = next(line for line in script.read_text().splitlines() if line.startswith("srun "))
    assert " --cpus-per-task=2 " in srun, srun
    res = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
    assert res.returncode == 0 and "to start at" in res.stderr, res.stderr
    assert not list(tmp_path.glob("**/*_submitted.pkl"))  # nothing was submitted


def test_sbatch_template_runs_srun_fsdp_ft_run(slurm_cluster, tmp_path, reference):
    """launch/sbatch_template.sh (one `fsdp-ft run` per node through srun) passes --test-only, then trains on
    node1 + node2 like the local 2-rank run; each rank gets the task's 2 CPUs as OMP_NUM_THREADS (torchrun alone
    leaves it unset for one rank, 1 for more), GLOO_SOCKET_IFNAME toward the head node, and a user's own allocator
    setting instead of the default."""
    template = REPO / "launch" / "sbatch_template.sh"
    srun = next(line for line in template.read_text().splitlines() if line.startswith("srun "))
    # restated for Slurm 22.05-23.02 (the version here); this cluster binds no CPUs (TaskPlugin=task/none), so a
    # step shows the same CPUs with or without it and only the line itself can be checked
    assert "--cpus-per-task=$SLURM_CPUS_PER_TASK" in srun, srun
    args = ["--gpus-per-node=0", "--cpus-per-task=2", f"--output={tmp_path}/slurm-%j.out",
            str(template), str(TINY), f"output_dir={tmp_path}", *RUN]
    env = {**os.environ, "FSDP_FT": str(Path(sys.executable).parent / "fsdp-ft"),
           "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
    res = subprocess.run(["sbatch", "--test-only", *args], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "to start at" in res.stderr, res.stderr
    jid = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert wait_job(jid) == "COMPLETED", (tmp_path / f"slurm-{jid}.out").read_text()[-3000:]
    assert_losses_close(losses(tmp_path), reference, 1e-6)
    assert "on node node2" in (tmp_path / "logs" / "rank-1.log").read_text()
    for rank in (0, 1):
        env = rank_env(tmp_path, rank)
        assert env["OMP_NUM_THREADS"] == "2" and env["GLOO_SOCKET_IFNAME"] == "lo", env
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64" and "PYTORCH_ALLOC_CONF" not in env, env
        assert env[TRACE_BUFFER_SIZE] == "2000", env


@pytest.mark.parametrize("args,message", [(["--partition", "nosuchpartition"], "invalid partition"),
                                          (["--sbatch", "nosuchoption=1"], "unrecognized option")])
def test_unknown_partition_or_option_fails_in_one_line(slurm_cluster, tmp_path, args, message):
    """SLURM's own reason, in one line, exit 2, and nothing queued (sbatch --test-only refused it first)."""
    res = submit(tmp_path, *args, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and message in res.stderr.lower(), res.stderr
    assert "submitted job" not in res.stdout and not list(tmp_path.glob("**/*_submitted.pkl"))


MYSQL = ["mysql", "--socket=/run/mysqld/mysqld.sock", "-N", "-B", "slurm_acct_db", "-e"]


def plant_old_job_with_id(source: str, new_id: int) -> None:
    """Copy job `source`'s accounting row to id `new_id`, ten minutes older: what accounting holds after a
    controller restarted with fresh state (or ids that wrapped) numbers new jobs from 1 again. For a job id sacct
    shows the newest record, so the copy wins over jobs of older cluster runs and loses to the job to come."""
    cols = subprocess.run([*MYSQL, "SELECT column_name FROM information_schema.columns WHERE table_schema="
                           "'slurm_acct_db' AND table_name='fsdpft_job_table' AND column_name<>'job_db_inx'"],
                          capture_output=True, text=True, check=True).stdout.split()
    shifted = {"id_job": str(new_id), **{c: f"IF({c}>0,{c}-600,0)" for c in
                                          ("time_submit", "time_eligible", "time_start", "time_end")}}
    subprocess.run([*MYSQL, f"INSERT INTO fsdpft_job_table ({','.join(f'`{c}`' for c in cols)}) SELECT "
                    f"{','.join(shifted.get(c, f'`{c}`') for c in cols)} FROM fsdpft_job_table WHERE id_job={int(source)} "
                    "ORDER BY job_db_inx DESC LIMIT 1"], check=True, capture_output=True, text=True)


def test_wait_ignores_an_older_job_with_the_same_id(slurm_cluster, tmp_path):
    """Job ids repeat across controller restarts while accounting keeps the old jobs, and `sacct -j ID` returns
    them all: an old COMPLETED record of the next id made `submit --wait` call a job done before it started and
    fail 15 s later ("has not produced any output (state: RUNNING)"), as it did once in CI. --wait must wait for
    the job it submitted and exit 0 with the run's final export."""
    probe = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true"], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert wait_job(probe) == "COMPLETED"
    upcoming = [int(probe) + k for k in (1, 2, 3)]  # `sbatch --test-only` takes an id too
    for new_id in upcoming:
        plant_old_job_with_id(probe, new_id)
    # the premise: before the job's own record reaches accounting (the window CI hit: slurmdbd lagging under load,
    # or an array task that has just started), submitit's watcher reads the old record; ours asks only for jobs
    # since the submission (time.time() here, less the clock-skew margin of 300 s)
    from submitit.slurm.slurm import SlurmInfoWatcher

    from fsdp_ft.launchers.slurm import _sacct_since

    theirs, ours = SlurmInfoWatcher(delay_s=60), _sacct_since(time.time())
    assert all(theirs.is_done(str(i), mode="force") for i in upcoming)  # accounting calls the next ids done
    assert [ours.get_state(str(i), mode="force") for i in upcoming] == ["UNKNOWN"] * 3
    assert not any(ours.is_done(str(i), mode="force") for i in upcoming)
    res = cli("submit", str(TINY), "--nodes", "1", "--time", "10", "--wait", "--setup", "sleep 25",
              f"output_dir={tmp_path}", *FAST, "train.max_steps=2", "data.eval=null", check=False, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert int(job_id(res)) in upcoming and " finished" in res.stdout, res.stdout
    assert sorted(losses(tmp_path)) == [1, 2] and (tmp_path / "final" / "config.json").is_file()


def test_sweep_runs_each_combination_in_its_folder(slurm_cluster, tmp_path):
    """A 2-task job array on the cluster: each task trains with its own value, in output_dir/KEY=VALUE."""
    res = cli("submit", str(TINY), "--nodes", "1", "--time", "10", "--wait", "--sweep", "optim.lr=1e-3,4e-3",
              f"output_dir={tmp_path}", *FAST, "train.max_steps=2", "data.eval=null", check=True, timeout=300)
    from fsdp_ft.config import load_config

    runs = {lr: tmp_path / f"optim.lr={lr}" for lr in ("1e-3", "4e-3")}
    assert res.stdout.count("submitted job ") == 2 and res.stdout.count(" finished") == 2, res.stdout
    for lr, out in runs.items():
        assert f": {out}\n" in res.stdout
        assert load_config(out / "config.yaml").optim.lr == float(lr)
        assert sorted(losses(out)) == [1, 2] and (out / "final" / "config.json").is_file()
    a, b = (losses(out) for out in runs.values())
    assert a[1] == b[1] and a[2] != b[2]  # the same start; the second step shows the learning rates differ


def test_without_slurm_submit_says_so(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no sbatch on PATH
    res = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "submit", str(TINY), f"output_dir={tmp_path}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "`sbatch` is not on PATH" in res.stderr, res.stderr


def test_a_crashing_rank_ends_the_job_with_its_traceback(slurm_cluster, tmp_path):
    """SIGINT to rank 1 raises KeyboardInterrupt there: srun --kill-on-bad-exit ends rank 0 at once, the job fails,
    and rank 1's log holds the traceback."""
    jid = job_id(submit(tmp_path, "train.max_steps=400"))
    wait_for_step(tmp_path, 1, timeout=120)
    os.kill(rank_pid(tmp_path, 1), signal.SIGINT)
    t0 = time.time()
    assert wait_job(jid, timeout=90).startswith("FAILED")
    assert time.time() - t0 < 60
    log = (tmp_path / "logs" / "rank-1.log").read_text()
    assert "Traceback" in log and "KeyboardInterrupt" in log


@pytest.mark.parametrize("args,cpus", [([], "8"), (["--cpus-per-task", "3"], "3"),
                                       (["--sbatch", "cpus-per-task=5"], "5")])
def test_dry_run_without_sinfo_asks_cpus_for_each_rank(tmp_path, args, cpus):
    """Away from the cluster (no sinfo): 8 CPUs per GPU rank instead of SLURM's 1, memory left to the cluster; the
    user's --cpus-per-task (or --sbatch cpus-per-task) wins; srun restates the value either way."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no SLURM commands on PATH
    res = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "submit", str(TINY), "--dry-run", "--nodes", "2",
                          "--gpus-per-node", "8", *args, f"output_dir={tmp_path}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(f"#SBATCH --cpus-per-task={cpus}\n") == 1 and "--mem" not in res.stdout, res.stdout
    srun = next(line for line in res.stdout.splitlines() if line.startswith("srun "))
    assert f" --cpus-per-task={cpus} " in srun, srun


SINFO = """gpu*|96|1031000|gpu:h100:8(S:0-1)
gpu*|112|2063000|gpu:h100:8
big|128|2063000|gpu:h200:8,nvme:1
cpu|64|256000|(null)
"""


@pytest.mark.parametrize("opts,want", [
    (dict(gpus_per_node=8), (12, "0")),                          # the whole node: its smallest node's cores / 8
    (dict(gpus_per_node=2), (12, "257750M")),                    # 2 of 8 GPUs: a quarter of cores and memory
    (dict(gpus_per_node=2, exclusive=True), (48, "0")),          # --exclusive: the whole node anyway
    (dict(gpus_per_node=8, cpus_per_task=4, mem_gb=100.0), (4, None)),   # the user's
    (dict(gpus_per_node=8, sbatch=["mem-per-gpu=80G"]), (12, None)),
    (dict(gpus_per_node=8, partition="big"), (16, "0")),
    (dict(tasks_per_node=2, partition="cpu"), (32, "0")),        # CPU nodes: their cores over the ranks
])
def test_default_cpus_and_memory_from_sinfo(opts, want):
    from fsdp_ft.launchers.slurm import SubmitOptions, parse_sinfo, resources

    opts = SubmitOptions(**opts)
    assert resources(opts, parse_sinfo(SINFO, opts.partition))[:2] == want
    assert parse_sinfo(SINFO, "nosuchpartition") is None
    assert resources(opts, None)[:2] == (opts.cpus_per_task or 8, None)  # no sinfo


def test_sweep_dry_run_is_one_job_array(tmp_path):
    res = cli("submit", str(TINY), "--dry-run", "--sweep", "optim.lr=1e-3,2e-3", "--sweep", "train.seed=1,2",
              f"output_dir={tmp_path}")
    assert "#SBATCH --array=0-3%4" in res.stdout


def test_sweep_submits_each_combination_into_output_dir_key_value(tmp_path, monkeypatch, capsys):
    """--sweep A=a1,a2 --sweep B=b1,b2: one array of 4 tasks, each task's config the base config with its own
    values, in output_dir/A=a_B=b (what submitit would pickle; sbatch itself is replaced here)."""
    from fsdp_ft.cli import main
    from fsdp_ft.config import load_config
    from fsdp_ft.launchers import slurm

    submitted, arrays = [], []

    class Executor:  # stands in for submitit's: records what would be pickled and queued
        def batch(self):
            return contextlib.nullcontext()

        def submit(self, job):
            submitted.append(job)
            return type("Job", (), {"job_id": f"7_{len(submitted) - 1}"})()

    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(slurm, "node_shape", lambda partition: None)
    monkeypatch.setattr(slurm, "build_executor", lambda opts, folder, shape=None: Executor())
    monkeypatch.setattr(slurm, "batch_script", lambda ex, size=None: arrays.append(size) or "")
    monkeypatch.setattr(slurm, "_test_only", lambda script, folder: None)
    assert main(["submit", str(TINY), "--sweep", "optim.lr=1e-3,2e-3", "--sweep", "train.seed=1,2",
                 f"output_dir={tmp_path}", "train.max_steps=5"]) == 0
    out = capsys.readouterr().out
    base = load_config(TINY, [f"output_dir={tmp_path}", "train.max_steps=5"]).to_dict()
    want = [(lr, seed) for lr in ("1e-3", "2e-3") for seed in (1, 2)]
    assert arrays == [4] and len(submitted) == 4
    for job, (lr, seed) in zip(submitted, want):
        folder = tmp_path / f"optim.lr={lr}_train.seed={seed}"
        config = job.config
        assert config["output_dir"] == str(folder) and f": {folder}\n" in out
        assert config["optim"]["lr"] == float(lr) and config["train"]["seed"] == seed
        assert config["train"]["max_steps"] == 5  # the command line's other overrides reach every task
        rest = {k: v for k, v in config.items() if k not in ("output_dir", "optim", "train")}
        assert rest == {k: v for k, v in base.items() if k not in ("output_dir", "optim", "train")}
        assert {k: v for k, v in config["optim"].items() if k != "lr"} == \
            {k: v for k, v in base["optim"].items() if k != "lr"}


def _dry_run(capsys, *args: str) -> tuple[int, str, str]:
    from fsdp_ft.cli import main

    code = main(["submit", str(TINY), "--dry-run", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_renders_every_submit_option(tmp_path, capsys):
    """Each option of `fsdp-ft submit` becomes its sbatch line (values differ from every default, so a dropped
    option shows); --setup lines run, in order, before srun; srun restates the CPUs per task."""
    code, script, _ = _dry_run(capsys, "--nodes", "3", "--gpus-per-node", "4", "--tasks-per-node", "2",
                               "--cpus-per-task", "6", "--mem-gb", "100", "--account", "acc1", "--qos", "high",
                               "--constraint", "h100", "--exclusive", "--setup", "module load cuda", "--setup",
                               "export FOO=1", "--signal-delay-s", "300", "--time", "30", "--job-name", "jn",
                               "--partition", "gpu", "--sbatch", "comment=x", f"output_dir={tmp_path}")
    assert code == 0
    lines = script.splitlines()
    for want in ("--nodes=3", "--gpus-per-node=4", "--ntasks-per-node=2", "--cpus-per-task=6", "--mem=100GB",
                 "--account=acc1", "--qos=high", "--constraint=h100", "--exclusive", "--signal=USR2@300",
                 "--time=30", "--job-name=jn", "--partition=gpu", "--comment=x"):
        assert lines.count(f"#SBATCH {want}") == 1, (want, script)
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    setup = [i for i, line in enumerate(lines) if line in ("module load cuda", "export FOO=1")]
    assert len(setup) == 2 and setup[0] < setup[1] < srun and lines[setup[0]] == "module load cuda"
    assert " --cpus-per-task=6 " in lines[srun]

    code, plain, _ = _dry_run(capsys, "--cpus-per-task", "6", "--mem-gb", "100", f"output_dir={tmp_path}")
    assert code == 0  # the defaults: none of the lines above but --cpus-per-task / --mem
    for absent in ("--account", "--qos", "--constraint", "--exclusive", "--gpus-per-node", "--partition",
                   "module load"):
        assert absent not in plain, absent
    assert "#SBATCH --signal=USR2@120" in plain and "#SBATCH --nodes=1" in plain and "#SBATCH --time=60" in plain


@pytest.mark.parametrize("args,message", [(["--sbatch", "comment"], "--sbatch 'comment' must look like KEY=VALUE"),
                                          (["--sweep", "optim.lr"], "--sweep 'optim.lr' must look like KEY=VALUE")])
def test_a_malformed_option_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    """No cluster needed: the option is refused before anything is written or asked of SLURM."""
    code, out, err = _dry_run(capsys, *args, f"output_dir={tmp_path}")
    assert code == 2 and out == "" and err == f"fsdp-ft: error: {message}\n", err
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("euid,env,installed,want", [
    (1000, {}, True, "skip"),                              # a developer's machine: no root
    (1000, {"CI": "true"}, True, "fail"),                  # CI without root: the cluster tests would not run
    (0, {}, False, "fail"),                                # root, nothing to install SLURM with
    (0, {"CI": "1"}, False, "fail"),
    (0, {}, True, None),                                   # root and SLURM (or apt-get): they run
    (0, {"FSDP_FT_SKIP_SLURM": "1"}, True, "skip"),        # skipped on purpose
    (0, {"FSDP_FT_SKIP_SLURM": "1", "CI": "1"}, True, None),  # ... but never in CI
])
def test_cluster_tests_skip_only_off_ci_without_root(euid, env, installed, want):
    why = cluster_unavailable(euid, env, which=lambda name: f"/usr/bin/{name}" if installed else None)
    assert (why[0] if why else None) == want


class _LaggingJob:
    """A submitit job whose result files appear `lag` reads after SLURM's state says `state` (submitit raises
    UncompletedJobError meanwhile), as seen once under load."""

    job_id = "7"

    def __init__(self, state: str, lag: int):
        self.state, self.lag, self.reads = state, lag, 0
        self.watcher = self

    def get_state(self, job_id: str, mode: str) -> str:
        assert job_id == self.job_id and mode == "force"  # a fresh sacct call, not submitit's cached state
        return self.state

    def results(self):
        from submitit.core.utils import UncompletedJobError

        self.reads += 1
        if self.reads <= self.lag:
            raise UncompletedJobError("has not produced any output")
        return ["done"]


@pytest.mark.parametrize("state", ["COMPLETED", "RUNNING", "PENDING", "REQUEUED", "UNKNOWN"])
def test_results_are_read_again_while_the_job_lives_or_completed(state):
    from fsdp_ft.launchers.slurm import results_when_ready

    job = _LaggingJob(state, lag=2)
    assert results_when_ready(job, patience_s=30, poll_s=0) == ["done"] and job.reads == 3


def test_a_live_job_is_waited_for_past_the_patience():
    from fsdp_ft.launchers.slurm import results_when_ready

    job = _LaggingJob("RUNNING", lag=3)
    assert results_when_ready(job, patience_s=0, poll_s=0) == ["done"] and job.reads == 4


@pytest.mark.parametrize("state,patience", [("FAILED", 30), ("COMPLETED", 0), ("CANCELLED by 0", 30)])
def test_results_of_a_failed_job_or_after_the_patience_raise(state, patience):
    from submitit.core.utils import UncompletedJobError

    from fsdp_ft.launchers.slurm import results_when_ready

    job = _LaggingJob(state, lag=100)
    with pytest.raises(UncompletedJobError):
        results_when_ready(job, patience_s=patience, poll_s=0)
    assert job.reads == 1


@pytest.mark.parametrize("args", [["submit", str(TINY), "--nosuch"], ["run", "--nproc-per-node", "1", "--bogus", "x"],
                                  ["train", str(TINY), "--nosuch"]])
def test_unknown_option_is_one_line_exit_2(args):
    res = cli(*args, check=False, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "unrecognized arguments" in lines[0], res.stderr
    assert [a for a in args if a.startswith("--")][-1] in lines[0], res.stderr


# ---------------------------------------------------------------- fsdp-ft submit --tune: a job array of search workers
# (one file with the rest of the cluster tests: they take turns on the one cluster, and in one file they do so in one
# pytest process instead of leaving the other one waiting)

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


def array_states(job: str, since: float, *options: str) -> list[tuple[str, str]]:
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
        final = dict(array_states(jid, since))  # the newest row of each task
        if final and all(s.split()[0] in DONE for s in final.values()):
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


# USR2 (the time-limit warning) takes the same release-and-resume path as scontrol's SIGTERM; the plain-run requeue
# test above runs both signals in the default run, this one only in the slow one (CI's time budget)
@pytest.mark.parametrize("how", ["scontrol_requeue", pytest.param("usr2_signal", marks=pytest.mark.slow)])
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
    history = [state for _, state in array_states(task, since, "-D")]
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
    optuna = pytest.importorskip("optuna")
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


def test_submit_verbose_reaches_the_job(tmp_path, capsys, monkeypatch):
    """`submit -v` exports FSDP_FT_VERBOSE=1 in the job script before srun, so the ranks show everything whatever
    the cluster exports of the submitting shell; without -v the script does not."""
    monkeypatch.setenv("FSDP_FT_VERBOSE", "")  # restored after: -v sets it in this process too
    code, script, _ = _dry_run(capsys, "-v", f"output_dir={tmp_path}")
    lines = script.splitlines()
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert code == 0 and lines.index("export FSDP_FT_VERBOSE=1") < srun
    monkeypatch.setenv("FSDP_FT_VERBOSE", "")
    code, plain, _ = _dry_run(capsys, f"output_dir={tmp_path}")
    assert code == 0 and "FSDP_FT_VERBOSE" not in plain
