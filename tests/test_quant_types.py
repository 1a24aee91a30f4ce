"""QLoRA bases beyond NF4: bitsandbytes' FP4 (with double quantization) and LLM.int8's row-wise int8.

Both are checked against bitsandbytes itself (same codes, same dequantized values, same linear output), then
trained under FSDP2: 2 ranks equal 1 process, each rank stores half the base, and the exports reproduce the
trained logits."""
from __future__ import annotations

import pytest
import torch

from conftest import FAST, TINY, assert_losses_close, losses, train_nproc
from fsdp_ft.observability.metrics import read_metrics
from test_peft import ONE_PROC, SAMPLE, STEPS, TWO_RANKS

QUANT_RTOL = 1e-6  # 2 ranks vs 1 process in fp32; see test_two_ranks_equal_one_process_fp32

LORA_TARGETS = 2 * (4 * 256 * 256 + 3 * 256 * 512)  # values of the adapted base weights in `pretrained_q256`
LORA_ROWS = 2 * (4 * 256 + 2 * 512 + 256)  # their rows (output features): q, k, v, o, gate, up, down per block


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes (extra 'bnb') is the reference for these checks")


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()


@pytest.fixture(scope="module")
def weight():
    torch.manual_seed(0)
    return torch.randn(512, 256) * 0.02


def test_fp4_codes_equal_bitsandbytes(weight):
    """Every 4-bit code equals bitsandbytes' `quantize_fp4`; with bitsandbytes' (double-quantized) block scales our
    codes dequantize to exactly its `dequantize_fp4`. Only the scales' own 8-bit format differs (torchao's linear
    one here, bitsandbytes' dynamic map there), so the two dequantized weights differ by a scale rounding only."""
    F = _bnb().functional
    from fsdp_ft.quant.quantize import dequantize, quantize_weight

    ours = quantize_weight(weight, "fp4", 64, 256)
    packed, state = F.quantize_fp4(weight, blocksize=64, compress_statistics=True)
    torch.testing.assert_close(ours.nf4, F.get_4bit_type("fp4", device="cpu"), rtol=0, atol=0)
    codes = _unpack(ours.quantized_data)
    assert torch.equal(codes, _unpack(packed))
    their_scales = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    with_their_scales = (ours.nf4[codes].view(-1, 64) * their_scales.view(-1, 1)).view(weight.shape)
    theirs = F.dequantize_fp4(packed, state)
    torch.testing.assert_close(with_their_scales, theirs, rtol=0, atol=0)
    # the scale formats: both within 1% of the exact absmax, so the weights agree to 1% of the block absmax
    err = (dequantize(ours) - theirs).abs().view(-1, 64).amax(1) / weight.view(-1, 64).abs().amax(1)
    assert err.max() < 0.01, err.max()
    assert not torch.equal(dequantize(ours), dequantize(quantize_weight(weight, "nf4")))  # a different code book


def test_fp4_survives_the_ops_fsdp_and_modules_use(weight):
    """detach, to(), row chunks (FSDP's sharding), cat of chunks, copy_ and the linear keep the FP4 code book."""
    from fsdp_ft.quant.quantize import FP4_VALUES, dequantize, quantize_weight

    fp4 = quantize_weight(weight, "fp4", 64, 256)
    table = torch.tensor(FP4_VALUES) / 12
    want = dequantize(fp4)
    for t in (fp4.detach(), fp4.to("cpu"), fp4.cpu()):
        assert torch.equal(t.nf4, table) and torch.equal(dequantize(t), want)
    halves = torch.chunk(fp4, 2, dim=0)
    assert all(torch.equal(h.nf4, table) for h in halves)
    torch.testing.assert_close(torch.cat([dequantize(h) for h in halves]), want, rtol=0, atol=0)
    target = quantize_weight(torch.zeros_like(weight), "fp4", 64, 256)
    target.copy_(fp4)
    assert torch.equal(dequantize(target), want)
    x = torch.randn(3, 256)
    torch.testing.assert_close(torch.nn.functional.linear(x, fp4), x @ want.T, rtol=1e-6, atol=1e-6)


def test_int8_equals_bitsandbytes_linear8bitlt(weight):
    """Codes and row absmax equal bitsandbytes' `Int8Params` (CB, SCB); forward and input gradient equal its
    `Linear8bitLt` in training mode on CPU, bit for bit."""
    bnb = _bnb()
    from fsdp_ft.quant.int8_weight import Int8Weight

    layer = bnb.nn.Linear8bitLt(256, 512, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu").train()
    ours = Int8Weight.from_float(weight)
    assert torch.equal(ours.codes, layer.weight.data) and torch.equal(ours.absmax, layer.weight.SCB)
    x = torch.randn(2, 5, 256, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    want = layer(x)
    got = torch.nn.functional.linear(x2, ours)
    assert torch.equal(got, want)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-6, atol=1e-7)


def test_int8_survives_the_ops_fsdp_uses(weight):
    from fsdp_ft.quant.int8_weight import Int8Weight

    w = Int8Weight.from_float(weight)
    want = w.dequantize()
    assert w.dtype == torch.float32 and w.shape == weight.shape
    top, bottom = torch.chunk(w, 2, dim=0)
    assert isinstance(top, Int8Weight) and torch.equal(torch.cat([top.dequantize(), bottom.dequantize()]), want)
    padded = top.new_zeros(top.shape)
    padded.narrow(0, 0, top.shape[0]).copy_(top)
    assert torch.equal(padded.dequantize(), top.dequantize())
    assert torch.equal(w.detach().dequantize(), want) and torch.equal(w.to("cpu").dequantize(), want)
    assert torch.equal(w.to(torch.bfloat16), want.to(torch.bfloat16))
    assert (want - weight).abs().max() <= weight.abs().amax(1).max() / 254 * 1.01  # half a step of 1/127


def test_int8_rows_must_divide_over_ranks():
    """int8 shards whole rows (no padding): a weight whose rows the ranks cannot share evenly is a one-line
    ConfigError naming the weight; 4-bit types keep their own block checks."""
    from torch import nn

    from fsdp_ft.config import load_config
    from fsdp_ft.errors import ConfigError
    from fsdp_ft.quant.quantize import check_block_sizes

    layers = [("q_proj", nn.Linear(256, 256, device="meta")), ("k_proj", nn.Linear(256, 6, device="meta"))]
    cfg = load_config(TINY, ["output_dir=/tmp/x", "finetune.method=qlora", "finetune.quant.type=int8"])
    check_block_sizes(layers, cfg, shards=2)
    with pytest.raises(ConfigError, match=r"^finetune.quant.type=int8: weight 'k_proj' has 6 rows, which 4 ranks"):
        check_block_sizes(layers, cfg, shards=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scales_made_from_block_maxima_on_the_host_equal_torchao(dtype):
    """Quantizing on a GPU sends only the exact per-block maxima to the host and double-quantizes them there (so
    their mean sums in the CPU's order): bit-equal to torchao's double quantization of the whole weight. Blocks
    of zeros, outliers and a scale block of its own sizes included. (tests/test_gpu.py compares CUDA with CPU.)"""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    from fsdp_ft.quant.quantize import double_quantize_scalers

    torch.manual_seed(1)
    w = (torch.randn(384, 256) * 0.02).to(dtype)
    w[5] = 0
    w[17, 3] = 4.0
    flat = w.view(-1)
    for scaler_block in (256, 64, 8):
        want = NF4Tensor.double_quantize_scalers(flat, 64, scaler_block)
        got = double_quantize_scalers(flat, 64, scaler_block, via_maxima=True)
        assert [t.dtype for t in got] == [t.dtype for t in want]
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), scaler_block


# ---------------------------------------------------------------- training under FSDP2


@pytest.fixture(scope="module")
def quant_runs(session_tmp, pretrained_q256):
    """Per type: the 1-process run (in this process, so the export test can use the trained model) and the
    2-rank run (through the launcher)."""
    from fsdp_ft.api import train
    from fsdp_ft.config import load_config

    cache = {}

    def get(quant: str, ranks: int):
        if (quant, ranks) not in cache:
            args = [f"model.path={pretrained_q256}", "model.random_init=false", "finetune.method=qlora",
                    f"finetune.quant.type={quant}", *STEPS]
            out = session_tmp / f"quant-{quant}-{ranks}"
            if ranks == 1:
                cache[quant, ranks] = train(load_config(TINY, [f"output_dir={out}", *FAST, *ONE_PROC, *args]))
            else:
                cache[quant, ranks] = train_nproc(ranks, out, *TWO_RANKS, *args)
        return cache[quant, ranks]
    return get


def _out(run):
    return run.output_dir if hasattr(run, "output_dir") else run


def _setup_row(run):
    return [r for r in read_metrics(_out(run)) if r.get("split") == "setup"][-1]


@pytest.mark.distributed
@pytest.mark.parametrize("quant", ["fp4", "int8"])
def test_two_ranks_equal_one_process_fp32(quant_runs, quant):
    """fp32: only the order of the gradient sums differs (2 ranks' reduce vs 1 process's accumulation), so the
    losses agree to a few fp32 roundings compounded over 10 steps: 5.8e-8 (FP4) and 5.1e-8 (int8) relative at
    most, measured (the README says under 6e-8); bound 1e-6, about 17x that. A tensor left out of the reduce
    or summed twice moves the losses by far more."""
    one, two = losses(_out(quant_runs(quant, 1))), losses(quant_runs(quant, 2))
    assert len(one) == 10
    worst = max(abs(two[s] - one[s]) / abs(one[s]) for s in one)
    print(f"{quant}: 2 ranks vs 1 process, max relative loss difference {worst:.2e}")
    assert_losses_close(two, one, QUANT_RTOL)
    assert one[10] < one[1]


@pytest.mark.distributed
@pytest.mark.parametrize("quant", ["fp4", "int8"])
def test_quantized_base_is_sharded(quant_runs, quant):
    """Each of 2 ranks stores half of the 1-rank bytes (within 10%); the 1-rank bytes are counted by hand."""
    one = _setup_row(quant_runs(quant, 1))["quantized_bytes_per_rank"]
    two = _setup_row(quant_runs(quant, 2))["quantized_bytes_per_rank"]
    assert len(one) == 1 and len(two) == 2
    for b in two:
        assert abs(b - one[0] / 2) <= 0.1 * one[0] / 2, (b, one)
    if quant == "fp4":  # as NF4: 4-bit codes, 8-bit scales, an fp32 factor per row's scales (the auto layout),
        values = LORA_TARGETS  # per tensor a mean and the code book
        assert one[0] == values // 2 + values // 64 + 4 * LORA_ROWS + 14 * (4 + 16 * 4)
    else:  # one byte per value and an fp32 absmax per row
        assert one[0] == LORA_TARGETS + 4 * LORA_ROWS


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("quant", ["fp4", "int8"])
def test_adapter_export_and_merge_reproduce_logits(quant_runs, tmp_path, pretrained_q256, quant):
    """The trained base holds the chosen type; final/ loads with PeftModel over the base dequantized as training
    saw it and gives the trained logits (1e-5); --merge-adapters writes a plain model over that dequantized base
    with the same logits (1e-4: the merge adds B @ A into W once, a float rounding only)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fsdp_ft.checkpoint.export import export_run
    from fsdp_ft.config import load_config
    from fsdp_ft.quant.int8_weight import Int8Weight
    from fsdp_ft.quant.quantize import FP4_VALUES, quantized_linears, round_trip_base

    result = quant_runs(quant, 1)
    bases = [linear.weight for _, linear in quantized_linears(result.model)]
    assert len(bases) == 14
    if quant == "fp4":
        assert all(torch.equal(w.nf4, torch.tensor(FP4_VALUES) / 12) for w in bases)
    else:
        assert all(isinstance(w, Int8Weight) for w in bases)
    result.model.eval()
    batch = result.tokenizer(SAMPLE, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = result.model(**batch, use_cache=False).logits

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_q256),
                                           result.output_dir / "final").eval()
    with torch.no_grad():
        unquantized_base = peft_model(**batch).logits
        round_trip_base(peft_model, load_config(result.output_dir / "config.yaml"))
        torch.testing.assert_close(peft_model(**batch).logits, want, rtol=1e-5, atol=1e-5)
    # the adapters trained over the dequantized base: over the full-precision one the logits are measurably off
    assert (unquantized_base - want).abs().max() > 5e-4  # measured: fp4 2.6e-2, int8 1.5e-3

    export_run(str(result.output_dir), None, str(tmp_path / "merged"), merge_adapters=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-4, atol=1e-4)
