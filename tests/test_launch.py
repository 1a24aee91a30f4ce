"""`fsdp-ft run` and launch/torchrun.sh: several launchers rendezvous, per-rank logs, signals forwarded to the ranks
(checkpoint, stop, resume to the same loss curve), the shutdown grace, an exit code that tells a saved stop (128 + S)
from a failed one, and one-line errors for bad sizes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, assert_losses_close, free_port, losses
import launch_helpers
from launch_helpers import RUN, kill9_job, rank_pid, reference_losses, setup_rows, wait_for_step
from fsdp_ft.runtime.rank_env import DUMP_TEMP_FILE, TRACE_BUFFER_SIZE

pytestmark = pytest.mark.distributed
FSDP_FT = str(Path(sys.executable).parent / "fsdp-ft")


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}


def rank_env(out: Path, rank: int) -> dict[str, str]:
    """The environment a rank reported in the newest header of its log (`=== cpus N KEY=VALUE ... ===`)."""
    line = [ln for ln in (out / "logs" / f"rank-{rank}.log").read_text().splitlines() if ln.startswith("=== cpus ")][-1]
    return dict(item.split("=", 1) for item in line.strip("= ").split()[2:])


def _output_of_ended(proc: subprocess.Popen) -> str:
    """What a launcher printed, once it and its ranks are ended (for a failure's message)."""
    kill9_job(proc)
    return proc.communicate()[0]


def _run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fsdp_ft.cli", "run", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_losses(tmp_path_factory)


@pytest.fixture(scope="module")
def reference_rows(tmp_path_factory):
    return launch_helpers.reference_rows(tmp_path_factory)


def test_two_launchers_as_two_nodes_equal_one_launcher(tmp_path, reference):
    """--nnodes 2: two launchers (one rank each) meet on 127.0.0.1 and train like one 2-rank run: node 0 is
    `fsdp-ft run --nnodes 2 --node-rank 0`, node 1 is launch/torchrun.sh with NNODES=2 NODE_RANK=1 (a script that
    ignored either would start a 1-node run or a second node 0, and the rendezvous would fail).
    Each rank gets the launcher's defaults: its launcher's cores as OMP_NUM_THREADS (torchrun leaves one rank's
    unset), the allocator's expandable segments, the NCCL flight recorder dumping into logs/, and GLOO_SOCKET_IFNAME
    toward the rendezvous host (lo for 127.0.0.1)."""
    endpoint = f"127.0.0.1:{free_port()}"
    node0 = _run("--nnodes", "2", "--node-rank", "0", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint,
                 str(TINY), f"output_dir={tmp_path}", *RUN)
    env = {**_env(), "NPROC": "1", "NNODES": "2", "NODE_RANK": "1", "RDZV_ENDPOINT": endpoint, "FSDP_FT": FSDP_FT}
    node1 = subprocess.Popen(["bash", "launch/torchrun.sh", str(TINY), f"output_dir={tmp_path}", *RUN], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = [node0, node1]
    try:
        deadline = time.time() + 300
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):  # one node failed: the other would wait for it
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                kill9_job(p)
    outs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_losses_close(losses(tmp_path), reference, 1e-6)
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"rank-{rank}.log").read_text()
        assert f"rank {rank} of 2" in log
        env = rank_env(tmp_path, rank)
        assert env["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0))), env
        assert env["PYTORCH_ALLOC_CONF"] == env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True", env
        assert env[TRACE_BUFFER_SIZE] == "2000" and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1", env
        assert env[DUMP_TEMP_FILE] == str(tmp_path / "logs" / "nccl-trace-rank-"), env
        assert env["GLOO_SOCKET_IFNAME"] == "lo", env
    assert "[train] step=24" in (tmp_path / "logs" / "rank-0.log").read_text()


def test_sigterm_checkpoints_and_the_rerun_continues_the_same_curve(tmp_path, reference):
    """SIGTERM to the launcher reaches every rank; they stop after the same step with a checkpoint (exit 143), and
    launch/torchrun.sh with the same config resumes: the loss curve equals the uninterrupted run's. The ranks keep
    the user's own allocator and flight-recorder settings instead of the launcher's defaults."""
    proc = _run("--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TINY),
                f"output_dir={tmp_path}", *RUN)
    wait_for_step(tmp_path, 1, alive=lambda: proc.poll() is None)
    slow = rank_pid(tmp_path, 1)
    os.kill(slow, signal.SIGSTOP)  # rank 1 slow to stop: paused past the 3 s grace of the test below
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(5)
        assert proc.poll() is None, "the launcher gave up on a rank within the default shutdown grace"
    finally:
        os.kill(slow, signal.SIGCONT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    from fsdp_ft.checkpoint.dcp_checkpoint import list_checkpoints
    (stopped_at, _), = list_checkpoints(tmp_path)
    assert f"stopped by signal 15 after step {stopped_at}; checkpoint saved" in out  # the stop step's checkpoint
    assert 1 <= stopped_at < 24
    assert not (tmp_path / "final").exists()  # exported only when the run really ends
    env = {**_env(), "NPROC": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "FSDP_FT": FSDP_FT,
           "PYTORCH_ALLOC_CONF": "max_split_size_mb:64", "TORCH_FR_BUFFER_SIZE": "50"}
    res = subprocess.run(["bash", "launch/torchrun.sh", str(TINY), f"output_dir={tmp_path}", *RUN], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    for rank in (0, 1):
        seen = rank_env(tmp_path, rank)
        assert seen["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:64" and "PYTORCH_CUDA_ALLOC_CONF" not in seen, seen
        assert seen["TORCH_FR_BUFFER_SIZE"] == "50" and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in seen, seen
        assert seen["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and "GLOO_SOCKET_IFNAME" not in seen, seen  # one machine
        assert seen["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2)), seen
    assert [r["step"] for r in setup_rows(tmp_path)] == [0, stopped_at]
    assert_losses_close(losses(tmp_path), reference, 1e-6)
    assert (tmp_path / "final" / "config.json").is_file()


def test_a_killed_rank_stops_the_run_with_its_exit_code(tmp_path):
    """kill -9 of rank 1: torchrun stops rank 0 too, and `fsdp-ft run` exits 128 + 9 quickly (no hang)."""
    proc = _run("--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TINY),
                f"output_dir={tmp_path}", *RUN, "train.max_steps=200")
    wait_for_step(tmp_path, 1, alive=lambda: proc.poll() is None)
    os.kill(rank_pid(tmp_path, 1), signal.SIGKILL)
    t0 = time.time()
    out = proc.communicate(timeout=90)[0]
    assert proc.returncode == 128 + signal.SIGKILL, out
    assert time.time() - t0 < 60
    assert "exitcode: -9) local_rank: 1" in out  # torchrun names the rank that failed first


def test_sigusr2_stops_the_run_like_sigterm(tmp_path):
    """SIGUSR2, SLURM's time-limit warning (`#SBATCH --signal=USR2@S` in launch/sbatch_template.sh, which requeues on
    exit 140), reaches the ranks through `fsdp-ft run`: they save and the launcher exits 128 + 12."""
    from fsdp_ft.checkpoint.dcp_checkpoint import list_checkpoints

    proc, _ = _start_at_step_1(tmp_path, sys.executable, "-m", "fsdp_ft.cli", "run", "--nproc-per-node", "2",
                               "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    try:
        proc.send_signal(signal.SIGUSR2)
        out = proc.communicate(timeout=90)[0]
    finally:
        kill9_job(proc)  # ranks the launcher failed to stop would train on
    assert proc.returncode == 128 + signal.SIGUSR2, out
    (stopped_at, _), = list_checkpoints(tmp_path)
    assert f"stopped by signal 12 after step {stopped_at}; checkpoint saved" in out


def test_sigusr1_to_one_rank_stops_every_rank_at_the_same_step_and_flushes_the_log_window(tmp_path, reference_rows):
    """SIGUSR1 sent to rank 1 alone (not through the launcher, which would forward it to every rank): rank 0 learns
    of it only through the per-step agreement, so both ranks save the same step N (each its own shard and RNG
    file in checkpoints/step-N, the only checkpoint) and the launcher exits 128 + 10. With train.log_every=20 the
    stop falls inside the first logging window, whose steps 1..N are flushed as one row at step N: its `tokens`
    and token-weighted loss are those of steps 1..N of the uninterrupted log_every=1 reference run."""
    from fsdp_ft.checkpoint.dcp_checkpoint import list_checkpoints
    from fsdp_ft.observability.metrics import read_metrics

    # eval rows every step show the run's progress while no training row is written (evaluation changes no
    # training number: no dropout, no RNG drawn, the same batches)
    proc = _run("--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TINY),
                f"output_dir={tmp_path}", *RUN, "train.log_every=20", "train.eval_every=1")
    try:
        deadline = time.time() + 240
        while not any(r.get("split") == "eval" and r["step"] >= 2 for r in read_metrics(tmp_path)):
            assert proc.poll() is None and time.time() < deadline, _output_of_ended(proc)[-3000:]
            time.sleep(0.05)
        os.kill(rank_pid(tmp_path, 1), signal.SIGUSR1)
        out = proc.communicate(timeout=120)[0]  # a rank that stopped alone would leave the other in a collective
    finally:
        kill9_job(proc)
    assert proc.returncode == 128 + signal.SIGUSR1, out
    (stopped_at, path), = list_checkpoints(tmp_path)
    assert 2 <= stopped_at < 20, stopped_at  # inside the first window (20 steps), after at least 2 steps
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [f"step-{stopped_at}"]
    assert f"stopped by signal {int(signal.SIGUSR1)} after step {stopped_at}; checkpoint saved" in out
    assert json.loads((path / "state.json").read_text())["step"] == stopped_at
    for rank in (0, 1):  # both ranks saved this step: each its RNG state and its shard of the model
        assert (path / f"rng-rank{rank}.pt").is_file() and (path / f"__{rank}_0.distcp").is_file()
    assert not (tmp_path / "final").exists()
    (row,) = [r for r in read_metrics(tmp_path) if "split" not in r]  # only the flushed partial window
    ref = reference_rows  # step -> row of the uninterrupted run
    steps = range(1, stopped_at + 1)
    assert row["step"] == stopped_at and row["tokens"] == ref[stopped_at]["tokens"], (row, ref[stopped_at])
    # the window's loss: the loss sums of its steps over the tokens that carry loss, i.e. each step's tokens less
    # one per sample (causal LM, loss_on=all: every token but a row's first), 16 samples a step (micro 4 x accum 2
    # x 2 ranks of configs/tiny.yaml)
    step_tokens = {s: ref[s]["tokens"] - (ref[s - 1]["tokens"] if s > 1 else 0) for s in steps}
    carry = {s: step_tokens[s] - 16 for s in steps}
    want = sum(ref[s]["loss"] * carry[s] for s in steps) / sum(carry.values())
    assert row["loss"] == pytest.approx(want, rel=1e-6), (row["loss"], want)


# A stand-in rank for the launcher's own work: it records the first signal it gets (O_EXCL: torchrun's SIGTERM to
# the ranks left once one has exited cannot overwrite it), then exits as `fsdp-ft train` does on it: 128 + S after
# saving for the stop signals (TERM, USR1, USR2), killed by the signal itself for the others.
STAND_IN_RANK = """
import os, signal, sys, time
out, rank = sys.argv[1], os.environ["RANK"]
def got(signum, frame):
    try:
        fd = os.open(os.path.join(out, f"got-{rank}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, str(signum).encode())
        os.close(fd)
    except FileExistsError:
        pass
    if signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        os._exit(128 + signum)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, got)
open(os.path.join(out, f"ready-{rank}"), "w").close()
time.sleep(60)  # a signal never forwarded: the rank ends normally, the launcher exits 0
"""
LAUNCHER = "import sys; from fsdp_ft.launchers import torchrun; sys.exit(torchrun.run(sys.argv[2:], sys.argv[1], 30))"


def test_every_stop_and_quit_signal_reaches_every_rank_and_sets_the_exit_code(tmp_path):
    """The launcher (fsdp_ft.launchers.torchrun.run, what `fsdp-ft run` and launch/torchrun.sh run) forwards each of SIGTERM,
    SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to both ranks and exits 128 + S. Stand-in ranks (a few lines, no
    torch) keep it to a few seconds for all six at once. Real ranks: TERM and USR2 through the launcher in the tests
    above, USR1 in test_sigusr1_to_one_rank_...; a real rank does not catch INT/HUP/QUIT (Python's defaults end it),
    which the stand-in copies."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
    (tmp_path / "rank.py").write_text(STAND_IN_RANK)
    runs = {}
    for sig in signals:
        out = tmp_path / sig.name
        out.mkdir()
        argv = ["--nproc-per-node=2", "--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}", str(tmp_path / "rank.py"), str(out)]
        runs[sig] = (out, subprocess.Popen([sys.executable, "-c", LAUNCHER, str(out), *argv], cwd=REPO, env=_env(),
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.time() + 120
        for sig, (out, proc) in runs.items():
            while not all((out / f"ready-{rank}").exists() for rank in (0, 1)):
                assert proc.poll() is None and time.time() < deadline, (sig.name, _output_of_ended(proc)[-3000:])
                time.sleep(0.05)
        for sig, (out, proc) in runs.items():
            proc.send_signal(sig)
        results = {sig: (out, proc, proc.communicate(timeout=60)[0]) for sig, (out, proc) in runs.items()}
    finally:
        for out, proc in runs.values():
            kill9_job(proc)
    for sig, (out, proc, text) in results.items():
        got = [(out / f"got-{rank}").read_text() if (out / f"got-{rank}").exists() else None for rank in (0, 1)]
        assert got == [str(int(sig))] * 2, (sig.name, got, text[-2000:])
        assert proc.returncode == 128 + sig, (sig.name, proc.returncode, text[-2000:])


def _start_at_step_1(tmp_path, *launcher: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """A 2-rank run of RUN started by `launcher` (argv), once at step 1: the launcher, and rank 1's pid."""
    proc = subprocess.Popen([*launcher, str(TINY), f"output_dir={tmp_path}", *RUN, "train.max_steps=200"], cwd=REPO,
                            env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path, 1, alive=lambda: proc.poll() is None)
    return proc, rank_pid(tmp_path, 1)


def test_a_rank_dying_during_the_stop_fails_the_run(tmp_path):
    """SIGTERM, then rank 1 dies before it has saved: the exit code is rank 1's failure (128 + 9), not 143 (which
    says 'saved and stopped'), and one line names the rank and warns that the newest checkpoint may be older."""
    proc, victim = _start_at_step_1(tmp_path, sys.executable, "-m", "fsdp_ft.cli", "run", "--nproc-per-node", "2",
                                    "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    try:
        proc.send_signal(signal.SIGTERM)
        os.kill(victim, signal.SIGKILL)
        out = proc.communicate(timeout=90)[0]
    finally:
        kill9_job(proc)
    assert proc.returncode == 128 + signal.SIGKILL, out
    assert "fsdp-ft: rank 1 was killed by SIGKILL while stopping on SIGTERM; the newest checkpoint may not be from " \
           "this stop" in out


def test_a_rank_still_busy_after_the_shutdown_grace_is_killed(tmp_path):
    """launch/torchrun.sh with SHUTDOWN_GRACE_S=3 (`fsdp-ft run --shutdown-grace-s 3`): a rank that has not stopped
    3 s after SIGTERM (here: paused) is killed then, not after torchrun's fixed 30 s, and the run fails (137)."""
    from fsdp_ft.checkpoint.dcp_checkpoint import list_checkpoints

    env = {**_env(), "NPROC": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "FSDP_FT": FSDP_FT,
           "SHUTDOWN_GRACE_S": "3"}
    proc, slow = _start_at_step_1(tmp_path, "bash", "launch/torchrun.sh", env=env)
    try:
        os.kill(slow, signal.SIGSTOP)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=90)[0]
        took = time.time() - t0
    finally:
        kill9_job(proc)
    assert proc.returncode == 128 + signal.SIGKILL, out
    assert 3 <= took < 20, (took, out)
    assert "was killed by SIGKILL after the 3 s shutdown grace (--shutdown-grace-s) while stopping on SIGTERM" in out
    assert list_checkpoints(tmp_path) == []  # nothing was saved, and the exit code does not claim otherwise


@pytest.mark.parametrize("args, option", [
    (["--nproc-per-node", "0"], "--nproc-per-node"),
    (["--nproc-per-node", "-2"], "--nproc-per-node"),
    (["--nnodes", "0"], "--nnodes"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29400"], "--node-rank"),
    (["--node-rank", "-1"], "--node-rank"),
    (["--shutdown-grace-s", "-5"], "--shutdown-grace-s"),
])
def test_bad_sizes_are_one_line_errors(tmp_path, args, option):
    """Out-of-range counts and indices: exit 2 and one line naming the option (torchrun alone exits 1 silently, or
    waits for a rendezvous that never completes)."""
    from conftest import cli

    proc = cli("run", *args, str(TINY), f"output_dir={tmp_path}", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and option in proc.stderr, proc.stderr
    assert proc.stderr.startswith("fsdp-ft: error: ")
    assert not (tmp_path / "logs").exists()  # no rank was started


def test_bad_data_found_by_rank_0_is_the_last_line_and_no_rank_crashes(tmp_path):
    """Rank 0 reads the data while the others wait for it (distributed.main_process_first). A bad row was one line
    from rank 0, then rank 1's 40-line gloo traceback (connection closed by peer) and torchrun's report of the
    failed rank. Now every rank raises the same error: one line naming the file and line, and it is the last."""
    from conftest import cli
    from test_errors import assert_user_error

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello world"}\n{"text": 5\n')
    proc = cli("run", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TINY),
               f"output_dir={tmp_path / 'run'}", f"data.train={bad}", check=False)
    assert_user_error(proc, f"config key 'data.train': cannot read '{bad}': line 2 is not valid JSON")
    assert "[rank1]" not in proc.stderr and "exitcode" not in proc.stderr, proc.stderr[-3000:]


def test_an_error_that_does_not_pickle_still_reaches_the_other_ranks():
    """Rank 0 sends its error to the others; one whose class cannot be rebuilt from its pickle (a constructor with
    other arguments) goes as a RuntimeError saying the same, instead of failing the send itself."""
    from fsdp_ft.errors import DataError
    from fsdp_ft.runtime.distributed import _shareable

    class Odd(Exception):
        def __init__(self, row, why):
            super().__init__(f"row {row}: {why}")

    plain = DataError("config key 'data.train': line 2")
    assert _shareable(plain) is plain
    sent = _shareable(Odd(2, "bad"))
    assert type(sent) is RuntimeError and str(sent) == "rank 0 failed: Odd: row 2: bad"


def test_rdzv_port_in_use_is_a_one_line_error(tmp_path):
    """torchrun alone exits 1 without a word when node 0's port is taken; we name the port."""
    import socket

    from conftest import TINY, cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = cli("run", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", str(TINY),
                   f"output_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"port {port} is already in use" in proc.stderr.strip().splitlines()[-1]


def test_run_without_endpoint_picks_a_free_port(tmp_path):
    """On one machine no --rdzv-endpoint is needed, even while torchrun's usual 29500 is taken; losses equal the
    1-process run with the same global batch."""
    import socket

    from conftest import FAST, TINY, cli, losses

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 29500))
            s.listen()
        except OSError:
            pass  # already taken by someone else: the point stands
        cli("run", "--nproc-per-node", "2", str(TINY), f"output_dir={tmp_path / 'two'}", *FAST, "train.max_steps=3",
            "train.micro_batch_size=2", "train.grad_accum=1")
    cli("train", str(TINY), f"output_dir={tmp_path / 'one'}", *FAST, "train.max_steps=3", "train.micro_batch_size=2",
        "train.grad_accum=2")
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(two) == [1, 2, 3]
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5)


def test_rank_env_defaults_leave_the_users_own_settings():
    """What the launchers add to a rank's environment (fsdp_ft.runtime.rank_env.rank_env_defaults): nothing the user set,
    under either the old or the new name of a variable; GLOO_SOCKET_IFNAME only across machines."""
    from fsdp_ft.runtime.rank_env import interface_to, rank_env_defaults

    cores = len(os.sched_getaffinity(0))
    got = rank_env_defaults("/r/logs", 1, "127.0.0.1", 2, environ={})
    assert got == {"OMP_NUM_THREADS": str(cores), "PYTORCH_ALLOC_CONF": "expandable_segments:True",
                   "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", TRACE_BUFFER_SIZE: "2000",
                   "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", DUMP_TEMP_FILE: "/r/logs/nccl-trace-rank-",
                   "GLOO_SOCKET_IFNAME": "lo"}
    assert interface_to("127.0.0.1") == "lo" and interface_to("no-such-host.invalid") is None
    users = {"OMP_NUM_THREADS": "3", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64", "TORCH_FR_BUFFER_SIZE": "9",
             "TORCH_NCCL_DUMP_ON_TIMEOUT": "0", "TORCH_FR_DUMP_TEMP_FILE": "/x/fr-", "GLOO_SOCKET_IFNAME": "ib0"}
    assert rank_env_defaults("/r/logs", 1, "127.0.0.1", 2, environ=users) == {}
    # one machine: no interface; SLURM's CPUs per task bound the cores shared by the ranks
    assert rank_env_defaults("/r/logs", 2, "127.0.0.1", 1, environ={"SLURM_CPUS_PER_TASK": "1"}) == {
        **{k: v for k, v in got.items() if k != "GLOO_SOCKET_IFNAME"}, "OMP_NUM_THREADS": "1"}
