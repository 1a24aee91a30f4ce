"""Checkpoints: kill -9 mid-run, resume, and the loss curve continues exactly (damaged and half-written saves: test_run_dir.py)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import ASSETS, FAST, REPO, TINY, cli, free_port, losses, train_nproc
from fsdp_ft.observability.metrics import read_metrics
from launch_helpers import assert_stays_dead, kill9_job

pytestmark = pytest.mark.distributed

RUN = ["train.micro_batch_size=2", "train.grad_accum=1", "train.save_every=3", "train.keep_last=2",
       "train.max_steps=10"]


def _launch(out, *overrides):
    cmd = [sys.executable, "-m", "fsdp_ft.cli", "run", "--nproc-per-node", "2", "--rdzv-endpoint",
           f"127.0.0.1:{free_port()}", str(TINY), f"output_dir={out}", *FAST, *RUN, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_step(out, step: int, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if step in losses(out):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def dropout_llama(tmp_path_factory):
    """tiny-llama with attention dropout 0.1 (random init from model.path's config), so that a resume that did not
    restore each rank's RNG state would draw other dropout masks than the uninterrupted run."""
    import shutil

    out = tmp_path_factory.mktemp("dropout") / "tiny-llama-dropout"
    shutil.copytree(ASSETS / "tiny-llama", out)
    config = json.loads((out / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_kill9_then_resume_continues_exactly(session_tmp, pretrained_q256, dropout_llama, method):
    """For QLoRA only the adapters and their optimizer state are in the checkpoint; the 4-bit base is rebuilt
    from model.path on resume, so it must come back bit-identical too. Both cases train with dropout (full: the
    model's attention dropout, QLoRA: the adapters' dropout), so the steps after the checkpoint equal the
    uninterrupted run's only if each rank's RNG state was saved and restored."""
    extra = ([f"model.path={dropout_llama}"] if method == "full" else
             [f"model.path={pretrained_q256}", "model.random_init=false", "finetune.method=qlora", "optim.lr=1e-2",
              "finetune.lora.dropout=0.1"])
    full = train_nproc(2, session_tmp / f"uninterrupted-{method}", *RUN, *extra)
    out = session_tmp / f"killed-{method}"
    proc = _launch(out, *extra)
    _wait_for_step(out, 7, proc)  # the step-6 checkpoint is complete once step 7 is logged
    killed_at = assert_stays_dead(out, kill9_job(proc), ranks=2)
    assert killed_at < 9, "the run got too far before the kill"
    assert sorted(p.name for p in (out / "checkpoints" / "step-6").glob("rng-rank*.pt")) == [
        "rng-rank0.pt", "rng-rank1.pt"]  # each rank's RNG state, restored on resume
    cli("run", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TINY),
        f"output_dir={out}", *FAST, *RUN, *extra)  # resume: auto is the default
    resumed, want = losses(out), losses(full)
    assert sorted(resumed) == list(range(1, 11))
    assert [r["step"] for r in read_metrics(out) if r.get("split") == "setup"] == [0, 6]  # resumed at step 6
    for step in range(7, 11):  # steps after the checkpoint were trained again, and equal bit for bit
        assert resumed[step] == want[step], (step, resumed[step], want[step])
    state = json.loads((out / "checkpoints" / "step-10" / "state.json").read_text())
    assert state["step"] == 10 and state["world_size"] == 2
    # keep_last=2: only the two newest complete checkpoints remain
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-9"]


@pytest.mark.parametrize("method", ["full", "lora", pytest.param("qlora", marks=pytest.mark.slow)])
def test_resume_with_other_world_size_reshards(session_tmp, method):
    """DCP reshards on load: a 2-rank checkpoint resumes in one process (same global batch) and continues.
    LoRA's 2 ranks hold every weight whole (FSDP on the size-1 shard dimension of a 2 x 1 mesh). QLoRA's base,
    rebuilt on resume, must be the same 4-bit bits on 1 rank as on 2 (the default layout depends on the shapes
    alone)."""
    extra = [] if method == "full" else [f"finetune.method={method}", "optim.lr=1e-2"]  # lr: adapters that move
    ref = train_nproc(2, session_tmp / f"reshard-ref-{method}", *RUN, "train.max_steps=8", *extra)
    if method == "lora":
        assert next(r for r in read_metrics(ref) if r.get("split") == "setup")["replicas"] == 2
    out = session_tmp / f"reshard-1proc-{method}"
    cli("train", str(TINY), f"output_dir={out}", *FAST, *RUN, "train.max_steps=8", "train.grad_accum=2",
        f"resume={ref / 'checkpoints' / 'step-6'}", *extra)
    got = losses(out)
    assert sorted(got) == [7, 8]
    for step in (7, 8):
        assert got[step] == pytest.approx(losses(ref)[step], rel=1e-5)


# made by the code before the package move (commit 18d7d10), with
#   fsdp-ft train configs/tiny.yaml output_dir=... <UPGRADE_RUN>
# keeping run.json, config.yaml, metrics.jsonl and checkpoints/step-2 (LoRA, so the folder is under 1 MB)
UPGRADE_RUN = ["finetune.method=lora", "train.log_every=1", "train.seq_len=64", "train.eval_every=0",
               "train.save_every=2", "train.progress_bar=false", "data.eval=null"]


def test_a_run_folder_from_before_the_package_move_resumes(tmp_path):
    """Nothing in a run directory names a module, so a checkpoint written before fsdp_ft's modules moved into
    packages resumes after it: its 2 steps are the 2 steps today's code trains (the move changed no number), and
    resumed to step 4 it gives the losses and adapters of today's own 2-step checkpoint resumed to 4."""
    import shutil

    from safetensors.torch import load_file

    from cls_helpers import train_here

    old = tmp_path / "old"
    shutil.copytree(ASSETS / "run_before_layout", old)
    new = tmp_path / "new"
    train_here(new, *UPGRADE_RUN, "train.max_steps=2")
    assert losses(new) == losses(old)  # step 1 and 2 of 2, as the old code logged them
    for out in (old, new):
        train_here(out, *UPGRADE_RUN, "train.max_steps=4", "resume=auto")
    resumed = [r for r in read_metrics(old) if r.get("split") == "setup"][-1]
    assert resumed["resumed_from"] == str(old / "checkpoints" / "step-2")
    # the old checkpoint's bits come from the machine that wrote the asset, and another CPU's kernels may round
    # step 2's update differently: on an AMX Xeon step 3's loss differs by 1e-7 and, two Adam steps on, the
    # adapters by up to 8e-5 of their norm. A resume that lost the optimizer state or the data position misses
    # by orders more, so the resumed run must agree to rounding, not bit for bit
    assert sorted(losses(old)) == [1, 2, 3, 4]
    for step, loss in losses(new).items():
        assert losses(old)[step] == pytest.approx(loss, rel=1e-6, abs=0), step
    a, b = (load_file(out / "final" / "adapter_model.safetensors") for out in (old, new))
    assert a.keys() == b.keys()
    for k in a:
        assert ((a[k] - b[k]).norm() / b[k].norm()).item() <= 1e-3, k
