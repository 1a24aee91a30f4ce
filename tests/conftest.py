"""Shared helpers: run the real CLI (in a subprocess, as users do) and read a run's metrics."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
ASSETS = REPO / "tests" / "assets"
# every process the tests start prints its Python stacks if it aborts or crashes (a rare gloo teardown abort in CI
# showed only "terminate called without an active exception", with no hint of where)
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

# Small and quick: equality tests compare per-step losses, not convergence.
FAST = ["train.max_steps=8", "train.log_every=1", "train.seq_len=64", "train.eval_every=0", "train.save_every=0",
        "train.progress_bar=false", "data.max_eval_samples=16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m fsdp_ft.cli ARGS` from the repo root; raises with the output if it fails and check is set."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fsdp-ft {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def train_1proc(out: Path, *overrides: str) -> Path:
    cli("train", str(TINY), f"output_dir={out}", *FAST, *overrides)
    return out


def train_nproc(n: int, out: Path, *overrides: str) -> Path:
    cli("run", "--nproc-per-node", str(n), "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TINY),
        f"output_dir={out}", *FAST, *overrides)
    return out


def losses(out: Path) -> dict[int, float]:
    """Training loss per step (the last row wins, so a resumed run's rows replace the killed run's)."""
    from fsdp_ft.observability.metrics import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(out) if "split" not in r}


def eval_rows(out: Path) -> list[dict]:
    from fsdp_ft.observability.metrics import read_metrics
    return [r for r in read_metrics(out) if r.get("split") == "eval"]


def assert_losses_close(got: dict, want: dict, rtol: float) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in want:
        rel = abs(got[step] - want[step]) / abs(want[step])
        assert rel <= rtol, f"step {step}: {got[step]} vs {want[step]} (relative {rel:.2e} > {rtol})"


@pytest.fixture(autouse=True)
def _one_slurm_test_at_a_time(request):
    """Tests on the local SLURM cluster (those that use the `slurm_cluster` fixture) take turns across pytest
    processes. They all live in test_slurm.py today, which keeps them in one process under `--dist loadfile`; a
    second file on the cluster would otherwise run its jobs beside them, waiting for the same nodes past their
    time-outs and taking the job ids that test_wait_ignores_an_older_job_with_the_same_id counts on."""
    if "slurm_cluster" not in request.fixturenames:
        yield
        return
    import fcntl

    with open(os.environ.get("FSDP_FT_SLURM_DIR", "/tmp/fsdp-ft-slurm") + ".tests.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, after the test
        yield


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def pytest_collection_modifyitems(config, items):
    """GPU tests skip where there is no CUDA device (CI, the development machines)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pretrained_q256(tmp_path_factory) -> Path:
    """A 'pretrained' Llama whose weights are saved by transformers itself, with 256-wide layers (every linear
    holds a multiple of 64 x 256 values and so does each row shard on 2 or 4 ranks: even a fixed
    finetune.quant.scaler_block_size=256 fits it)."""
    return save_tiny_llama(tmp_path_factory.mktemp("pretrained") / "llama-256", seed=11, hidden_size=256,
                           intermediate_size=512, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                           num_hidden_layers=2)


def save_tiny_llama(out: Path, seed: int, **changes) -> Path:
    """tests/assets/tiny-llama with `changes` to its config, random weights drawn under `seed` and saved by
    transformers itself (a 'pretrained' folder: the run loads it with model.random_init=false), and its tokenizer."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    cfg.update(changes)
    return save_pretrained_from_config(out, cfg, seed)


def save_pretrained_from_config(out: Path, cfg, seed: int) -> Path:
    """A causal LM drawn from `cfg` under `seed`, saved by transformers itself, with the tiny tokenizer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    for f in (ASSETS / "tiny-llama").iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def drop_leftover_process_group() -> None:
    """An in-process training test leaves its world-size-1 process group in the worker; the memory simulation
    (`memsim.fake_world`) needs a process without one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
