"""What only a CUDA device can check: the same training numbers on the GPU as on the CPU, bf16 autocast through
FSDP2's mixed precision, TF32, the pinned prefetching of batches, compiled blocks (Triton), SDPA's flash kernel on
the model's attention, and the 4-bit base on the GPU against bitsandbytes' CUDA kernels.

All skip where there is no CUDA device (CI and the development machines); a lent GPU runs them with
`benchmarks/gpu_check.sh`. A GPU machine has one rank per GPU, so multi-rank NCCL runs need several GPUs and
are not here; `test_debug.py::test_run_one_rank_with_nccl` starts NCCL through torchrun.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, FAST, REPO, TINY, assert_losses_close, cli, losses
from fsdp_ft.metrics import read_metrics

pytestmark = pytest.mark.gpu

# fp32 sums in another order (GPU kernels vs CPU kernels), compounded over 8 steps of lr 3e-3
DEVICE_RTOL = 1e-4
QLORA = ["finetune.method=qlora", "finetune.quant.scaler_block_size=32", "finetune.lora.r=4"]


def setup_row(out: Path) -> dict:
    return next(r for r in read_metrics(out) if r.get("split") == "setup")


def train_on_cpu(out: Path, *overrides: str) -> Path:
    """The same run with the GPU hidden: the reference."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "train", str(TINY), f"output_dir={out}", *FAST, *overrides],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    return out


def train_on_gpu(out: Path, *overrides: str) -> Path:
    cli("train", str(TINY), f"output_dir={out}", *FAST, *overrides)
    return out


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_fp32_on_the_gpu_equals_the_cpu(tmp_path, method):
    """IEEE fp32 (train.tf32=false): the GPU run is the CPU run, step for step, for full fine-tuning and for the
    NF4 base (torchao's NF4 tensor and fsdp_ft's 4-bit layer on CUDA)."""
    extra = QLORA if method == "qlora" else []
    gpu = train_on_gpu(tmp_path / "gpu", *extra, "train.tf32=false")
    cpu = train_on_cpu(tmp_path / "cpu", *extra)
    assert_losses_close(losses(gpu), losses(cpu), DEVICE_RTOL)
    setup = setup_row(gpu)
    assert setup["device"] == "cuda:0" and setup["tf32"] is False and setup_row(cpu)["device"] == "cpu"
    assert "data sheet" in setup["peak_flops_source"] and "fp32" in setup["peak_flops_source"]
    steps = [r for r in read_metrics(gpu) if "split" not in r]
    assert all(r["peak_mem_bytes"] > 0 and 0 < r["mfu"] < 1 for r in steps)


def test_tf32_is_on_by_default_and_counts_against_the_tf32_peak(tmp_path):
    out = train_on_gpu(tmp_path / "tf32")
    setup = setup_row(out)
    assert setup["tf32"] is True and "tf32" in setup["peak_flops_source"]
    ieee = train_on_gpu(tmp_path / "ieee", "train.tf32=false")
    assert_losses_close(losses(out), losses(ieee), 1e-2)  # TF32's 10-bit mantissa moves the loss a little


def test_bf16_mixed_precision_tracks_fp32(tmp_path):
    bf16 = train_on_gpu(tmp_path / "bf16", "fsdp.mixed_precision=bf16")
    fp32 = train_on_gpu(tmp_path / "fp32", "train.tf32=false")
    assert_losses_close(losses(bf16), losses(fp32), 2e-2)
    assert losses(bf16) != losses(fp32)  # it really computed in bf16
    assert "bf16" in setup_row(bf16)["peak_flops_source"]


def test_pinned_prefetching_changes_no_number(tmp_path):
    """On a GPU the next step's batches are built and pinned by a worker thread (the default there)."""
    on = train_on_gpu(tmp_path / "on", "train.tf32=false")
    off = train_on_gpu(tmp_path / "off", "train.tf32=false", "train.prefetch_batches=false")
    assert_losses_close(losses(on), losses(off), 1e-6)


def test_compiled_blocks_equal_eager(tmp_path):
    compiled = train_on_gpu(tmp_path / "compiled", "train.tf32=false", "train.compile=true")
    eager = train_on_gpu(tmp_path / "eager", "train.tf32=false")
    assert_losses_close(losses(compiled), losses(eager), DEVICE_RTOL)
    graphs = [r["compiled_graphs"] for r in read_metrics(compiled) if "split" not in r]
    assert 1 <= graphs[-1] <= 3, graphs


def test_flash_attention_kernel_runs_the_model_attention():
    """SDPA's flash kernel (forced: it raises if it cannot take the call) on the tiny Llama in bf16 gives the
    logits of eager attention to bf16 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda().bfloat16().eval()
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager").cuda().bfloat16().eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(4, config.vocab_size, (2, 128), device="cuda")
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            got = sdpa(input_ids=ids).logits.float()
        want = eager(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_nf4_on_cuda_equals_the_cpu_and_bitsandbytes_cuda_kernels():
    """The NF4 base quantized on the GPU has the CPU's codes and scales bit for bit; fsdp_ft's one-lookup
    dequantization on CUDA is bit-equal to torchao's; and bitsandbytes' CUDA `quantize_4bit` picks the same codes
    but where a value sits on a boundary between two (torchao and bitsandbytes round those apart: 0.01% of
    codes, one step off, on the CPU as well)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the reference for this check")
    from fsdp_ft import nf4_linear, quantize

    torch.manual_seed(0)
    weight = torch.randn(512, 256) * 0.02
    ours = quantize.quantize_weight(weight.cuda(), "nf4", 64, 256)
    on_cpu = quantize.quantize_weight(weight, "nf4", 64, 256)
    assert torch.equal(ours.quantized_data.cpu(), on_cpu.quantized_data)
    assert torch.equal(ours.quantized_scalers.cpu(), on_cpu.quantized_scalers)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(nf4_linear.dequantize(ours, dtype), ours.get_original_weight().to(dtype))
        assert torch.equal(nf4_linear.dequantize(ours, dtype).cpu(), nf4_linear.dequantize(on_cpu, dtype))
    packed, _ = bnb.functional.quantize_4bit(weight.cuda(), blocksize=64, quant_type="nf4", compress_statistics=True)
    unpack = lambda p: torch.stack([p.reshape(-1) >> 4, p.reshape(-1) & 15], 1).reshape(-1).long()  # noqa: E731
    apart = unpack(ours.quantized_data) - unpack(packed)
    assert apart.abs().max() <= 1 and (apart != 0).float().mean() < 1e-3
