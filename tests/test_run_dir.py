"""The run directory holds one run: identity checks, damaged checkpoints, stale leftovers, kill -9 mid-save.

Runs are one process on configs/tiny.yaml (a few seconds each); one finished run is trained per module and copied
into each test's folder, so each test starts from real checkpoints without training them again."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, FAST, REPO, TINY, cli, losses
from fsdp_ft.checkpoint import dcp_checkpoint, run_identity
from fsdp_ft.config import load_config
from fsdp_ft.errors import CheckpointError, ConfigError
from fsdp_ft.observability.metrics import read_metrics

RUN = [*FAST, "train.save_every=2", "train.keep_last=4"]  # 8 steps: checkpoints 2, 4, 6, 8


def _cfg(out: Path, *overrides: str):
    return load_config(TINY, [f"output_dir={out}", *RUN, *overrides])


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under folder."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    cli("train", str(TINY), f"output_dir={out}", *RUN)
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fsdp-ft: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


# ---------------------------------------------------------------- identity

def test_fresh_run_into_another_run_is_refused_and_leaves_it_untouched(run):
    before = snapshot(run)
    error = _one_line_error(cli("train", str(TINY), f"output_dir={run}", *RUN, "train.seed=1", "resume=none",
                                check=False))
    assert "already holds run" in error and "resume=auto" in error and "overwrite=true" in error
    assert snapshot(run) == before


def test_resume_auto_with_another_config_lists_the_keys_that_differ(run, tmp_path):
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(Path(_cfg(run).data.train).read_text()[:20000])
    with pytest.raises(ConfigError) as e:
        run_identity.decide(_cfg(run, "optim.lr=1e-3", f"data.train={other_data}", "train.micro_batch_size=2"), 1)
    msg = str(e.value)
    assert "optim.lr: 0.003 -> 0.001" in msg and "data.train:" in msg and run_identity.GLOBAL_BATCH in msg
    assert "train.seed" not in msg and "\n" not in msg
    # the same data moved to another path is the same input; a different rank count at the same global batch too
    moved = tmp_path / "moved.jsonl"
    shutil.copy(_cfg(run).data.train, moved)
    start = run_identity.decide(_cfg(run, f"data.train={moved}", "train.grad_accum=1"), 2)
    assert start.resume_from == str(run / "checkpoints" / "step-8")


def test_keys_that_may_change_exist_and_the_rest_are_identity():
    """Every key named free to change is a real config key (a typo would silently make a key identity), and a new
    key is identity unless named: a changed model dtype, method or schedule is refused."""
    from fsdp_ft.config import all_keys

    keys = {k for k, *_ in all_keys()}
    assert run_identity.MAY_CHANGE <= keys
    for key in ("model.dtype", "finetune.method", "finetune.lora.r", "optim.schedule", "train.seq_len", "task",
                "fsdp.mixed_precision", "data.packing", "optim.weight_decay"):
        assert key not in run_identity.MAY_CHANGE


def test_resume_auto_continues_with_allowed_changes(run):
    """More steps, other log/save intervals: the same run goes on from its newest checkpoint."""
    cli("train", str(TINY), f"output_dir={run}", *RUN, "train.max_steps=10", "train.log_every=2",
        "fsdp.prefetch=0")
    setups = [r for r in read_metrics(run) if r.get("split") == "setup"]
    assert [s["step"] for s in setups] == [0, 8] and setups[0]["run_id"] == setups[1]["run_id"]
    assert max(losses(run)) == 10


def test_overwrite_moves_the_old_run_aside(run):
    before = snapshot(run)
    old_id = json.loads((run / "run.json").read_text())["run_id"]
    cli("train", str(TINY), f"output_dir={run}", *RUN, "train.seed=1", "train.max_steps=2", "overwrite=true")
    moved = [p for p in run.parent.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and snapshot(moved[0]) == before
    assert json.loads((run / "run.json").read_text())["run_id"] != old_id
    assert [s for s, _ in dcp_checkpoint.list_checkpoints(run)] == [2]


# ---------------------------------------------------------------- damaged checkpoints

def _damage(ckpt: Path, how: str) -> None:
    if how == "missing shard":
        next(ckpt.glob("*.distcp")).unlink()
    elif how == "truncated shard":
        shard = next(ckpt.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:1000])
    elif how == "torn state.json":
        (ckpt / "state.json").write_text((ckpt / "state.json").read_text()[:40])
    elif how == "empty rng":
        (ckpt / "rng-rank0.pt").write_bytes(b"")
    elif how == "unfinished folder":  # a step-N holding only part of a save (a copy cut short, an older version)
        shutil.rmtree(ckpt)
        ckpt.mkdir()
        (ckpt / "__0_0.distcp").write_bytes(b"partial")


@pytest.mark.parametrize("how", ["missing shard", "truncated shard", "torn state.json", "empty rng",
                                 "unfinished folder"])
def test_damaged_checkpoint_is_detected(run, how):
    _damage(run / "checkpoints" / "step-8", how)
    found = dcp_checkpoint.problems(run / "checkpoints" / "step-8")
    assert found and all("\n" not in p for p in found)
    path, notes = dcp_checkpoint.newest_valid(run)
    assert path == run / "checkpoints" / "step-6" and "step-8" in notes[0]
    with pytest.raises(CheckpointError, match="step-8' is damaged"):
        dcp_checkpoint.resolve_explicit(str(run / "checkpoints" / "step-8"))


def test_resume_falls_back_past_a_damaged_checkpoint_and_continues_exactly(run):
    """The newest checkpoint lost a shard and the one before it is a leftover of an unfinished save: resume=auto
    warns, continues from step 4, saves steps 6 and 8 over the damaged folders, and trains exactly as before."""
    want = losses(run)
    ckpts = run / "checkpoints"
    older = {name: snapshot(ckpts / name) for name in ("step-2", "step-4")}
    _damage(ckpts / "step-8", "missing shard")
    _damage(ckpts / "step-6", "unfinished folder")
    (ckpts / ".tmp-step-8").mkdir()  # a save killed before its rename
    (ckpts / ".tmp-step-8" / "__0_0.distcp").write_bytes(b"partial")
    (run / "metrics.jsonl").write_text("")  # so the rows compared below are the resumed run's
    proc = cli("train", str(TINY), f"output_dir={run}", *RUN)
    assert "step-8' is damaged and skipped" in proc.stderr and "resumed from" in proc.stderr
    got = losses(run)
    assert sorted(got) == [5, 6, 7, 8]
    assert all(got[s] == want[s] for s in got), (got, want)
    assert {name: snapshot(ckpts / name) for name in older} == older
    assert [s for s, _ in dcp_checkpoint.list_checkpoints(run)] == [2, 4, 6, 8]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-4", "step-6", "step-8"]


def test_explicit_resume_of_a_damaged_checkpoint_is_one_line(run):
    _damage(run / "checkpoints" / "step-8", "torn state.json")
    before = snapshot(run)
    error = _one_line_error(cli("train", str(TINY), f"output_dir={run}", *RUN,
                                f"resume={run / 'checkpoints' / 'step-8'}", check=False))
    assert "step-8' is damaged" in error and "state.json" in error
    assert snapshot(run) == before


def test_checkpoint_of_another_model_is_one_line(run, tmp_path):
    """A checkpoint that names no run (as an older fsdp_ft wrote them) of a model with other shapes: DCP's own
    error (a BaseException) becomes one line."""
    ckpt = run / "checkpoints" / "step-8"
    state = json.loads((ckpt / "state.json").read_text())
    del state["run"]
    (ckpt / "state.json").write_text(json.dumps(state))
    error = _one_line_error(cli("train", str(TINY), f"output_dir={tmp_path / 'other'}", *RUN,
                                f"model.path={ASSETS / 'tiny-qwen2'}", f"resume={ckpt}", check=False))
    assert "does not fit this model" in error


def test_resume_path_of_another_run_lists_the_differences(run, tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.path: .*tiny-llama.* -> .*tiny-mistral"):
        run_identity.decide(_cfg(tmp_path / "new", f"model.path={ASSETS / 'tiny-mistral'}",
                                 f"resume={run / 'checkpoints' / 'step-4'}"), 1)


# ---------------------------------------------------------------- stale leftovers

def test_export_over_leftover_final_old_succeeds(run):
    """A leftover .final-old (an export that crashed between its two renames) made every later export fail
    while final/ stayed stale. Both ways it can be left: beside final/, and instead of it."""
    (run / ".final-old").mkdir()
    (run / ".final-old" / "junk").write_text("x")
    (run / "final" / "model.safetensors").unlink()  # so a final/ that was not rewritten shows
    cli("train", str(TINY), f"output_dir={run}", *RUN)
    assert (run / "final" / "model.safetensors").is_file() and not (run / ".final-old").exists()
    shutil.rmtree(run / "final")
    (run / ".final-new").mkdir()  # an export that did not finish
    cli("train", str(TINY), f"output_dir={run}", *RUN)
    assert (run / "final" / "model.safetensors").is_file() and not (run / ".final-new").exists()


# ---------------------------------------------------------------- fp16

def test_fp16_overflow_skips_the_step_and_halves_the_scale_on_cpu(tmp_path):
    """An initial loss scale of 2**100 overflows every step's gradients: each step must be skipped (AdamW never
    steps: its moments stay zero, its step count 0) and the scale halve. Before, the CPU scaler switched itself
    off: scale 1.0 logged, the overflowing steps applied."""
    from fsdp_ft.storage.weights_io import iter_dcp_tensors

    out = tmp_path / "fp16"
    cli("train", str(TINY), f"output_dir={out}", *FAST, "train.max_steps=3", "fsdp.mixed_precision=fp16",
        f"train.fp16_init_scale={2.0 ** 100}")
    rows = read_metrics(out)
    assert [r["loss_scale"] for r in rows if "loss_scale" in r] == [2.0 ** 99, 2.0 ** 98, 2.0 ** 97]
    optim = dict(iter_dcp_tensors(out / "checkpoints" / "step-3", prefix="optim.state."))
    steps = [v for k, v in optim.items() if k.endswith(".step")]
    moments = [v for k, v in optim.items() if k.endswith("exp_avg")]
    assert steps and all(float(s) == 0 for s in steps)
    assert moments and all(torch.count_nonzero(m) == 0 for m in moments)


# ---------------------------------------------------------------- kill -9 mid-save

def test_kill9_during_saves_never_leaves_an_unresumable_folder(tmp_path):
    """Kill -9 the run at a random point of a checkpoint save (the moment a save's temporary folder appears, plus
    0-40 ms), four times; each time resume=auto must find a valid checkpoint to continue from, and the final loss
    curve must equal an uninterrupted run's bit for bit."""
    run = [*FAST, "train.max_steps=12", "train.save_every=1", "train.keep_last=2"]
    ref = tmp_path / "reference"
    cli("train", str(TINY), f"output_dir={ref}", *run)
    out = tmp_path / "killed"
    rng = random.Random(0)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    kills = reached = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "fsdp_ft.cli", "train", str(TINY), f"output_dir={out}", *run],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        seen = {p.name for p in (out / "checkpoints").glob(".tmp-step-*")} if out.exists() else set()
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            saving = {p.name for p in (out / "checkpoints").glob(".tmp-step-*")} - seen if out.exists() else set()
            if saving:
                time.sleep(rng.uniform(0, 0.04))
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.001)
        proc.wait()
        path, notes = dcp_checkpoint.newest_valid(out)
        assert not notes, notes  # no step-N that looks finished and is not (None: killed in the first save)
        newest = dcp_checkpoint.read_state(path)["step"] if path else 0
        assert newest >= reached, (newest, reached)  # a kill never costs a checkpoint that was complete
        reached = newest
    assert kills >= 3 and reached > 0
    cli("train", str(TINY), f"output_dir={out}", *run)
    assert losses(out) == losses(ref)
