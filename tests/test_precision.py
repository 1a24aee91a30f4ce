"""fsdp.mixed_precision=auto: bf16 on CUDA devices with native bf16, fp32 elsewhere, resolved before anything
reads it (the planner for its target device, DeepSpeed's config, inference, and training before the run's
fingerprint and config.yaml are written)."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import FAST, TINY, cli
from fsdp_ft.config import Config, help_text, load_config
from fsdp_ft.runtime import precision


def _cfg(value: str, **fsdp) -> Config:
    cfg = Config()
    cfg.fsdp.mixed_precision = value
    for k, v in fsdp.items():
        setattr(cfg.fsdp, k, v)
    return cfg


@pytest.mark.parametrize("device,bf16,want", [
    ("cuda", True, "bf16"), ("cuda:3", True, "bf16"), ("cuda", False, "fp32"),  # pre-Ampere: emulated bf16
    ("cpu", True, "fp32"), ("cpu", None, "fp32"),
])
def test_auto_resolves_per_device(device, bf16, want):
    cfg = _cfg("auto")
    got = precision.resolve_precision(cfg, device, bf16_supported=bf16)
    assert got.fsdp.mixed_precision == want
    assert cfg.fsdp.mixed_precision == "auto"  # a new config; the caller's is untouched
    assert got.train == cfg.train and got.fsdp.cpu_offload == cfg.fsdp.cpu_offload


@pytest.mark.parametrize("value", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept_on_every_device(value):
    for device in ("cuda", "cpu"):
        assert precision.resolve_precision(_cfg(value), device, bf16_supported=True).fsdp.mixed_precision == value


def test_unresolved_readers_get_this_machines_meaning():
    """A config nobody resolved (library use) reads as this machine's default device would resolve it; this
    machine has no GPU, so auto is fp32 (and fsdp.param_dtype still wins)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU meaning")
    assert precision.mixed_precision(_cfg("auto")) == "fp32"
    assert precision.compute_precision(_cfg("auto", param_dtype="bf16")) == "bf16"


def test_config_accepts_auto_and_help_says_what_it_means(tmp_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "fsdp.mixed_precision=auto"])
    assert cfg.fsdp.mixed_precision == "auto"
    line = next(s for s in help_text().splitlines() if "fsdp.mixed_precision" in s)
    assert "auto" in line and "bf16 on CUDA" in line and "fp32 elsewhere" in line


def test_deepspeed_config_resolves_auto_for_its_device(tmp_path):
    from fsdp_ft.training.deepspeed_config import build_ds_config

    cfg = load_config(TINY, [f"output_dir={tmp_path}", "fsdp.mixed_precision=auto", "engine=deepspeed"])
    assert build_ds_config(cfg, 1, cuda=False)["bf16"]["enabled"] is False
    on_gpu = build_ds_config(precision.resolve_precision(cfg, "cuda", bf16_supported=True), 1, cuda=True)
    assert on_gpu["bf16"]["enabled"] is True


def _plan(*args: str) -> dict:
    out = cli("plan", str(TINY), *args, "--json").stdout
    return json.loads(out.strip().splitlines()[-1])["prediction"]


@pytest.mark.slow  # CI time (docs/testing.md, "What the default run leaves out")
def test_plan_counts_auto_as_the_target_device_would_run_it(tmp_path):
    """A GPU plan of auto is the bf16 plan (bf16 gathered weights and activations), a CPU plan the fp32 one."""
    out = f"output_dir={tmp_path}"
    gpu = {p: _plan(out, f"fsdp.mixed_precision={p}", "--device", "cuda") for p in ("auto", "bf16", "fp32")}
    assert gpu["auto"]["peak_bytes"] == gpu["bf16"]["peak_bytes"] != gpu["fp32"]["peak_bytes"]
    cpu = {p: _plan(out, f"fsdp.mixed_precision={p}", "--device", "cpu") for p in ("auto", "fp32")}
    assert cpu["auto"]["peak_bytes"] == cpu["fp32"]["peak_bytes"]


def test_training_records_the_resolved_precision(tmp_path):
    """The run directory holds what the run computed in: auto on a CPU trains in fp32 and says fp32 in config.yaml
    and in the run's fingerprint (which a resume compares). Needs engine.train to call
    precision.resolve_precision before open_run."""
    out = tmp_path / "run"
    cli("train", str(TINY), f"output_dir={out}", *FAST, "train.max_steps=1", "data.eval=null",
        "fsdp.mixed_precision=auto")
    assert yaml.safe_load((out / "config.yaml").read_text())["fsdp"]["mixed_precision"] == "fp32"
    assert json.loads((out / "run.json").read_text())["fingerprint"]["fsdp.mixed_precision"] == "fp32"
