"""engine=deepspeed: ZeRO-2/3 trains like one process and like the FSDP engine, resumes exactly, exports.

The reference for N ranks is one DeepSpeed process with the same global batch (micro 2 x accum 2 x 1 rank ==
micro 2 x accum 1 x 2 ranks), and the FSDP engine on the same config: same samples, same seeded init, same AdamW
and schedule, so in fp32 the losses agree to float rounding (the order of the gradient sums differs).
Runs are made once per module. The default set (ZeRO-3 full: 1 vs 2 ranks vs FSDP, partitioned state, export,
kill -9 resume) launches six short runs; ZeRO-2, LoRA and bf16 are marked slow.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import (FAST, REPO, TINY, assert_losses_close, cli, eval_rows, free_port, losses, train_1proc,
                      train_nproc)
from launch_helpers import assert_stays_dead, kill9_job
from test_resume import _wait_for_step
from fsdp_ft.errors import ConfigError
from fsdp_ft.observability.metrics import read_metrics

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install 'fsdp_ft[deepspeed]')")

ONE_PROC = ["train.micro_batch_size=2", "train.grad_accum=2"]
TWO_RANKS = ["train.micro_batch_size=2", "train.grad_accum=1"]
LORA = ["finetune.method=lora", "optim.lr=1e-2"]
# checkpoints every 3 steps in every run (saving does not change training), so the LoRA run doubles as the
# uninterrupted reference of the kill -9 test
RUN = ["train.save_every=3", "train.keep_last=2", "train.max_steps=10"]
FP32_RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(session_tmp):
    """run(engine, stage, method, ranks, *extra) -> run dir, each trained once per module."""
    cache = {}

    def get(engine: str, stage: int | None, method: str, ranks: int, *extra: str):
        key = (engine, stage, method, ranks, extra)
        if key not in cache:
            args = [f"engine={engine}", *RUN, *([f"finetune.method={method}", "optim.lr=1e-2"] if method != "full"
                                                 else []), *extra]
            if stage:
                args.append(f"deepspeed.stage={stage}")
            out = session_tmp / f"ds-{engine}-{stage}-{method}-{ranks}-{len(cache)}"
            cache[key] = (train_1proc(out, *ONE_PROC, *args) if ranks == 1
                          else train_nproc(ranks, out, *TWO_RANKS, *args))
        return cache[key]
    return get


def _setup(out) -> dict:
    return [r for r in read_metrics(out) if r.get("split") == "setup"][-1]


def _first_train_row(out) -> dict:
    return [r for r in read_metrics(out) if "split" not in r][0]


def _check_equal(runs, stage: int, method: str) -> None:
    one, two = runs("deepspeed", stage, method, 1), runs("deepspeed", stage, method, 2)
    fsdp = runs("fsdp", None, method, 1)
    assert len(losses(one)) == 10 and losses(one)[10] < losses(one)[1]  # it trains
    assert_losses_close(losses(two), losses(one), FP32_RTOL)
    assert_losses_close(losses(two), losses(fsdp), FP32_RTOL)
    assert eval_rows(two)[-1]["loss"] == pytest.approx(eval_rows(fsdp)[-1]["loss"], rel=FP32_RTOL)
    setup = _setup(two)
    assert (setup["engine"], setup["zero_stage"], setup["world_size"]) == ("deepspeed", stage, 2)
    # MFU: the FSDP engine's FLOP count, and every training row reports it
    assert setup["flops_per_token"] == _setup(fsdp)["flops_per_token"] > 0
    assert all(r["mfu"] > 0 and r["flops_per_s"] > 0 for r in read_metrics(two) if "split" not in r)
    assert json.loads((two / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == stage


@needs_deepspeed
@pytest.mark.distributed
def test_zero3_full_two_ranks_equal_one_process_and_fsdp(runs):
    _check_equal(runs, 3, "full")


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage,method", [(2, "full"), (2, "lora"), (3, "lora")])
def test_two_ranks_equal_one_process_and_fsdp(runs, stage, method):
    _check_equal(runs, stage, method)


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_other_adapters_under_zero3(runs, method):
    """DoRA (its magnitudes start from the base rows, before the block is partitioned) and IA3 under ZeRO-3."""
    short = ("train.max_steps=4", "train.save_every=0")
    one, two = runs("deepspeed", 3, method, 1, *short), runs("deepspeed", 3, method, 2, *short)
    assert_losses_close(losses(two), losses(one), FP32_RTOL)
    assert_losses_close(losses(two), losses(runs("fsdp", None, method, 1, *short)), FP32_RTOL)
    assert (two / "final" / "adapter_config.json").is_file()


@needs_deepspeed
@pytest.mark.distributed
def test_zero3_partitions_state_over_ranks(runs):
    """ZeRO-3: each of 2 ranks holds half the weights, fp32 masters and AdamW moments of one process."""
    one = _first_train_row(runs("deepspeed", 3, "full", 1))["state_bytes_per_rank"]
    two = _first_train_row(runs("deepspeed", 3, "full", 2))["state_bytes_per_rank"]
    params = _setup(runs("deepspeed", 3, "full", 1))["total_params"]
    assert one == [4 * 4 * params]  # fp32 weights + fp32 masters + two fp32 moments
    assert len(two) == 2 and all(abs(b - one[0] / 2) <= 0.01 * one[0] for b in two)


def _eval_loss_of(model_dir, run_dir) -> float:
    """Loss over the run's eval rows computed with the task's own code on a plain HF model."""
    from transformers import AutoModelForCausalLM

    from fsdp_ft.config import load_config
    from fsdp_ft.data.splits import load_splits
    from fsdp_ft.model.build import load_tokenizer
    from fsdp_ft.tasks import get_task

    cfg = load_config(run_dir / "config.yaml")
    tok = load_tokenizer(cfg, model_dir)
    task = get_task(cfg, tok)
    rows = load_splits(cfg, task.columns()).eval
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loss = count = 0.0
    with torch.no_grad():
        for i in range(len(rows)):
            sums = task.loss_sums(model, task.collate([task.encode(rows[i])]))
            loss, count = loss + sums["loss"].double().item(), count + sums["count"].item()
    return loss / count


@needs_deepspeed
@pytest.mark.distributed
def test_zero3_final_export_reproduces_trained_model(runs):
    """final/ is assembled from two ranks' ZeRO-3 partitions: a plain HF model loaded from it gives the eval
    loss the engine logged with the partitioned model at the last step."""
    run = runs("deepspeed", 3, "full", 2)
    assert (run / "final" / "model.safetensors").is_file()
    logged = eval_rows(run)[-1]
    assert logged["step"] == 10
    assert _eval_loss_of(run / "final", run) == pytest.approx(logged["loss"], rel=FP32_RTOL)


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow
def test_lora_export_is_an_adapter_folder_and_merges(runs, tmp_path):
    """PEFT runs save only the adapters; final/ is a PEFT folder, and --merge-adapters (base rebuilt from the same
    seeded init) gives the logged eval loss."""
    run = runs("deepspeed", 3, "lora", 2)
    assert (run / "final" / "adapter_config.json").is_file()
    assert json.loads((run / "checkpoints" / "step-10" / "state.json").read_text())["trainable_only"] is True
    cli("export", str(run), "--merge-adapters", "--out", str(tmp_path / "merged"))
    assert _eval_loss_of(tmp_path / "merged", run) == pytest.approx(eval_rows(run)[-1]["loss"], rel=FP32_RTOL)


def _launch(out, *overrides):
    cmd = [sys.executable, "-m", "fsdp_ft.cli", "run", "--nproc-per-node", "2", "--rdzv-endpoint",
           f"127.0.0.1:{free_port()}", str(TINY), f"output_dir={out}", *FAST, *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow  # CI time: the FSDP engine's kill -9 resume stays in the default run
@pytest.mark.parametrize("method", ["full", "lora"])
def test_kill9_then_resume_continues_exactly(runs, session_tmp, method):
    """ZeRO-3 on 2 ranks, killed with SIGKILL after the step-6 checkpoint: the resumed run (resume=auto) loads
    DeepSpeed's partitions (LoRA: only the adapters; the base is rebuilt), our scheduler, data position and RNG,
    and steps 7-10 equal the uninterrupted run bit for bit."""
    args = ["engine=deepspeed", "deepspeed.stage=3", *TWO_RANKS, *RUN, *(LORA if method == "lora" else [])]
    full = runs("deepspeed", 3, method, 2)
    out = session_tmp / f"ds-killed-{method}"
    proc = _launch(out, *args)
    _wait_for_step(out, 7, proc, timeout=300)  # the step-6 checkpoint is complete once step 7 is logged
    killed_at = assert_stays_dead(out, kill9_job(proc), ranks=2)
    assert killed_at < 9, "the run got too far before the kill"
    cli("run", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TINY),
        f"output_dir={out}", *FAST, *args)
    resumed, want = losses(out), losses(full)
    assert sorted(resumed) == list(range(1, 11))
    assert [r["step"] for r in read_metrics(out) if r.get("split") == "setup"] == [0, 6]  # resumed at step 6
    for step in range(7, 11):
        assert resumed[step] == want[step], (step, resumed[step], want[step])
    state = json.loads((out / "checkpoints" / "step-10" / "state.json").read_text())
    assert (state["engine"], state["zero_stage"], state["world_size"]) == ("deepspeed", 3, 2)
    assert state["trainable_only"] is (method == "lora")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-9"]


@needs_deepspeed
@pytest.mark.distributed
def test_checkpoint_of_one_engine_is_not_resumed_by_the_other(runs):
    """A DeepSpeed checkpoint fails with one line under the FSDP engine or another world size, and vice versa."""
    from fsdp_ft.checkpoint import dcp_checkpoint, deepspeed_checkpoint
    from fsdp_ft.errors import CheckpointError
    from fsdp_ft.runtime.distributed import DistEnv

    one_rank = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    ds_ckpt = runs("deepspeed", 3, "full", 2) / "checkpoints" / "step-10"
    fsdp_ckpt = runs("fsdp", None, "full", 1) / "checkpoints" / "step-10"
    with pytest.raises(CheckpointError, match="written by engine deepspeed; resume it with engine=deepspeed"):
        dcp_checkpoint.load_checkpoint(ds_ckpt, None, None, one_rank)
    with pytest.raises(CheckpointError, match="ZeRO partitions for 2 ranks; resume it with 2 ranks, not 1"):
        deepspeed_checkpoint.load(ds_ckpt, None, one_rank)
    with pytest.raises(CheckpointError, match="written by engine fsdp"):
        deepspeed_checkpoint.load(fsdp_ckpt, None, one_rank)


@needs_deepspeed
@pytest.mark.distributed
@pytest.mark.slow
def test_bf16_two_ranks_close_to_one_process(runs):
    """DeepSpeed bf16: bf16 weights and compute, fp32 masters and fp32 gradient reduction. Both runs see the same
    micro-batches; only the order of the gradient sums differs, and bf16's 8-bit mantissa lets one rounding flip
    move a loss by ~4e-3 relative: 2e-3 over 10 steps, as for the FSDP engine's bf16 test."""
    one = runs("deepspeed", 3, "full", 1, "fsdp.mixed_precision=bf16")
    two = runs("deepspeed", 3, "full", 2, "fsdp.mixed_precision=bf16")
    assert _setup(two)["precision"] == "bf16"
    assert_losses_close(losses(two), losses(one), 2e-3)
    fp32 = losses(runs("deepspeed", 3, "full", 1))
    assert any(abs(losses(one)[s] - fp32[s]) > 1e-6 for s in fp32)  # it really computed in bf16


# ---------------------------------------------------------------- config mapping (no DeepSpeed needed)

def _cfg(tmp_path, *overrides):
    from fsdp_ft.config import load_config
    return load_config(TINY, [f"output_dir={tmp_path}", "engine=deepspeed", *overrides])


def _ds(tmp_path, *overrides, world: int = 2, user: dict | None = None) -> dict:
    from fsdp_ft.training.deepspeed_config import build_ds_config

    if user is not None:
        (tmp_path / "ds.json").write_text(json.dumps(user))
        overrides = (*overrides, f"deepspeed.config={tmp_path / 'ds.json'}")
    return build_ds_config(_cfg(tmp_path, *overrides), world, cuda=False)


def test_config_maps_our_keys(tmp_path):
    ds = _ds(tmp_path, "train.micro_batch_size=3", "train.grad_accum=4", "optim.max_grad_norm=0.5",
             "fsdp.mixed_precision=bf16", "fsdp.cpu_offload=true")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (3, 4, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3  # the default: FSDP's full sharding
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert _ds(tmp_path, "optim.max_grad_norm=null", "deepspeed.stage=2")["gradient_clipping"] == 0.0
    assert "offload_param" not in _ds(tmp_path, "deepspeed.stage=2", "fsdp.cpu_offload=true")["zero_optimization"]


def test_user_json_extends_and_overrides(tmp_path):
    user = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2,  # tiny.yaml: 2
            "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 12345},
            "bf16": {"enabled": "auto"}, "communication_data_type": "bf16"}
    ds = _ds(tmp_path, "fsdp.mixed_precision=bf16", user=user)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 12345}
    assert ds["bf16"]["enabled"] is True and ds["communication_data_type"] == "bf16"


@pytest.mark.parametrize("user,overrides,words", [
    ({"train_micro_batch_size_per_gpu": 8}, [], ["train_micro_batch_size_per_gpu=8", "train.*"]),
    ({"optimizer": {"type": "AdamW"}}, [], ["'optimizer'", "optim.*"]),
    ({"scheduler": {"type": "WarmupLR"}}, [], ["'scheduler'"]),
    ({"zero_optimization": {"stage": 1}}, [], ["stage=1"]),
    ({"zero_optimization": {"stage": 2}}, ["deepspeed.stage=3"], ["deepspeed.stage", "disagrees"]),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, [], ["both bf16 and fp16"]),
])
def test_bad_user_json_is_one_line_error(tmp_path, user, overrides, words):
    with pytest.raises(ConfigError) as e:
        _ds(tmp_path, *overrides, user=user)
    assert "\n" not in str(e.value) and "deepspeed" in str(e.value)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("overrides,words", [
    (["finetune.method=qlora"], ["finetune.method", "engine=fsdp"]),
    (["fsdp.hybrid_replicas=2"], ["fsdp.hybrid_replicas"]),
    (["train.compile=true"], ["train.compile", "engine fsdp"]),
    (["deepspeed.stage=1"], ["deepspeed.stage"]),
    (["deepspeed.config=/no/such.json"], ["deepspeed.config", "does not exist"]),
])
def test_unsupported_settings_fail_before_launch(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, *overrides)
    for w in words:
        assert w in str(e.value)


def test_malformed_json_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(ConfigError, match=r"deepspeed.config.*bad.json.*line 1.*not valid JSON"):
        _cfg(tmp_path, f"deepspeed.config={tmp_path / 'bad.json'}")
