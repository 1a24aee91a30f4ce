"""`fsdp-ft train --debug`: one process, deterministic, anomaly detection, per-step rows, the first batch dumped
(text and which tokens carry loss) — and the same losses as a normal run; the Colab QLoRA recipe parses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, FAST, REPO, TINY, assert_losses_close, cli, losses, train_1proc


def test_debug_run_dumps_the_first_batch_and_trains_like_a_normal_run(tmp_path):
    from fsdp_ft.training.debug import MARKER

    out = tmp_path / "debug"
    out.mkdir()
    (out / MARKER).write_text("made by an earlier debug run\n")
    (out / "stale.txt").write_text("left by the earlier debug run")  # wiped: the marker says a debug run made it
    res = cli("train", str(TINY), "--debug", f"output_dir={tmp_path}", *FAST)
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()
    dump = (out / "first_batch.txt").read_text()
    samples = dump.split("--- sample ")[1:]
    assert dump.startswith("first batch: 4 samples x") and len(samples) == 4  # micro_batch_size of tiny.yaml
    train_text = {json.loads(line)["text"] for line in (ASSETS / "data" / "tiny_text_train.jsonl").open()}
    for sample in samples:
        head, text, tokens = sample.splitlines()[:3]
        n, carry = int(head.split(": ")[1].split()[0]), int(head.split(", ")[1].split()[0])
        assert carry == n - 1  # causal LM: every token but the first carries loss
        assert tokens.startswith("tokens: «<s>» ") and tokens.count("«") == 1
        body = text.removeprefix("text: <s>").removesuffix("</s>")
        assert any(row.startswith(body) for row in train_text), body  # decoded text is a real training row
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "split" not in r] == [1, 2, 3, 4, 5]  # few steps, each logged
    assert "[train] step=5" in res.stdout
    ref = train_1proc(tmp_path / "normal", "train.max_steps=5")
    assert_losses_close(losses(out), losses(ref), 1e-6)  # deterministic algorithms change no number on CPU
    assert not (tmp_path / "checkpoints").exists()  # a debug run never touches the real run's checkpoints


def test_debug_refuses_several_ranks(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    res = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "train", str(TINY), "--debug", f"output_dir={tmp_path}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--debug runs one process" in res.stderr, res.stderr


def test_debug_refuses_a_debug_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "debug" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("my notes")
    res = cli("train", str(TINY), "--debug", f"output_dir={tmp_path}", *FAST, check=False)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [  # today: the folder is wiped, the run goes on
        f"fsdp-ft: error: --debug writes to '{tmp_path / 'debug'}', which exists and was not made by a debug run "
        "(no .fsdp-ft-debug file in it): move or delete it yourself, or set output_dir elsewhere; nothing was deleted"]
    assert mine.read_text() == "my notes" and sorted(p.name for p in mine.parent.iterdir()) == ["notes.txt"]


def test_debug_setup_is_deterministic_with_anomaly_detection_and_wipes_the_previous_run(tmp_path):
    from fsdp_ft.config import load_config
    from fsdp_ft.training import debug

    flags = torch.are_deterministic_algorithms_enabled(), torch.is_anomaly_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        torch.autograd.set_detect_anomaly(False)
        cfg = debug.prepare(load_config(TINY, [f"output_dir={tmp_path}"]), 5)
        # what --debug promises besides its folder: deterministic algorithms and autograd anomaly detection
        assert torch.are_deterministic_algorithms_enabled() and torch.is_anomaly_enabled()
        out = Path(cfg.output_dir)
        assert out == tmp_path / "debug" and [p.name for p in out.iterdir()] == [debug.MARKER]
        (out / "metrics.jsonl").write_text("{}\n")  # what the first debug run wrote
        (out / "checkpoints").mkdir()
        debug.prepare(load_config(TINY, [f"output_dir={tmp_path}"]), 5)  # the next one starts clean
        assert [p.name for p in out.iterdir()] == [debug.MARKER]
    finally:
        torch.use_deterministic_algorithms(flags[0])
        torch.autograd.set_detect_anomaly(flags[1])


@pytest.mark.gpu
def test_debug_runs_on_cuda(tmp_path):
    cli("train", str(TINY), "--debug", f"output_dir={tmp_path}", *FAST)
    setup = [json.loads(line) for line in (tmp_path / "debug" / "metrics.jsonl").open()][0]
    assert setup["device"] == "cuda:0"


@pytest.mark.gpu
def test_run_one_rank_with_nccl(tmp_path):
    from conftest import train_nproc
    out = train_nproc(1, tmp_path)
    setup = [json.loads(line) for line in (out / "metrics.jsonl").open()][0]
    assert setup["device"] == "cuda:0" and len(losses(out)) == 8
    assert setup["backend"] == "cpu:gloo,cuda:nccl"  # NCCL for the GPU's tensors (gloo only for offloaded ones)


def test_colab_qlora_recipe_parses():
    from fsdp_ft.config import load_config
    cfg = load_config(REPO / "configs" / "qlora_7b_colab.yaml")
    lora = cfg.finetune.lora
    assert (cfg.finetune.method, lora.r, lora.alpha, lora.dropout, cfg.finetune.quant.type) == ("qlora", 64, 16, 0.1, "nf4")
    assert (cfg.fsdp.mixed_precision, cfg.train.micro_batch_size, cfg.optim.lr) == ("fp16", 2, 2e-4)
    # one file for 1 to 8 GPUs: 16 sequences a step, memory settings planned at start
    assert (cfg.train.global_batch_size, cfg.train.grad_accum) == (16, None)
    assert (cfg.activation_checkpointing, cfg.fsdp.cpu_offload) == ("auto", "auto")
