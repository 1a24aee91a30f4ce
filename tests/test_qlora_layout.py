"""QLoRA's default quantized layout (`finetune.quant.scaler_block_size: auto`) depends on the weight's shape
alone: every row shard FSDP can cut holds whole double-quantization blocks, so the same config (no quantization
keys) trains on 1, 2 and 4 ranks, with the same quantized base and so the same losses."""
from __future__ import annotations

import pytest
import torch

from conftest import ASSETS, assert_losses_close, losses, train_1proc, train_nproc
from fsdp_ft.quant import quantize

# (rows, cols) -> the largest divisor <= 256 of cols / 64, worked out by hand
AUTO = {
    (32, 64): 1,  # the tiny assets' k/v projections: one 4-bit block per row
    (128, 64): 1,
    (64, 128): 2,  # the tiny assets' down projection
    (576, 576): 9, (192, 576): 9, (1536, 576): 9,  # SmolLM2-135M: 576 = 9 x 64
    (576, 1536): 24,  # SmolLM2's down projection
    (4096, 4096): 64, (11008, 4096): 64,  # Llama-2-7B
    (4096, 11008): 172,  # 11008 / 64 = 172, itself <= 256
    (8192, 28672): 224,  # Llama-3-70B's down projection: 448 = 2 x 224
    (896, 4864): 76,  # Qwen2-0.5B: 4864 / 64 = 76
}


@pytest.mark.parametrize("shape", list(AUTO))
def test_auto_scaler_block_is_the_largest_divisor_of_a_row(shape):
    assert quantize.scaler_block_size(torch.Size(shape), 64, "auto") == AUTO[shape]
    assert quantize.scaler_block_size(torch.Size(shape), 64, 144) == 144  # a number is kept as given


@pytest.mark.parametrize("shape", [(192, 576), (576, 1536), (32, 64), (64, 128), (896, 128)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_auto_layout_splits_into_any_number_of_row_shards(shape, quant_type):
    """torchao's own row split (what FSDP2 calls to shard an NF4 weight) of the whole quantized weight, for
    1 to 8 shards: each piece dequantizes to exactly the rows of the whole weight."""
    torch.manual_seed(0)
    weight = torch.randn(shape)
    q = quantize.quantize_weight(weight, quant_type, 64, quantize.scaler_block_size(weight.shape, 64, "auto"))
    whole = quantize.dequantize(q)
    for shards in [n for n in range(1, 9) if shape[0] % n == 0]:  # uneven rows: refused at set-up (below)
        pieces = torch.chunk(q, shards, dim=0)
        assert sum(p.shape[0] for p in pieces) == shape[0]
        assert torch.equal(torch.cat([quantize.dequantize(p) for p in pieces]), whole), shards


def test_the_old_fixed_default_cannot_shard_smollm2_on_two_ranks():
    """Why the default changed: with SmolLM2's 576 x 576 projection, the old advice (64 here; 256 does not even
    divide the whole weight) leaves half a scale block in each rank's rows."""
    q = quantize.quantize_weight(torch.randn(576, 576), "nf4", 64, 64)
    with pytest.raises(Exception):
        torch.chunk(q, 2, dim=0)


def test_rows_the_ranks_cannot_share_evenly_are_refused_in_one_line():
    """torchao's NF4 row split cuts equal pieces only: 3 ranks cannot hold a 64-row weight."""
    from torch import nn

    from conftest import TINY
    from fsdp_ft.config import load_config
    from fsdp_ft.errors import ConfigError

    cfg = load_config(TINY, ["output_dir=/tmp/x", "finetune.method=qlora"])
    layers = [("model.layers.0.self_attn.q_proj", nn.Linear(64, 64, device="meta"))]
    quantize.check_block_sizes(layers, cfg, shards=4)
    with pytest.raises(ConfigError, match=r"^finetune.quant.type=nf4: weight 'model.layers.0.self_attn.q_proj' has 64 "
                                          r"rows, which 3 ranks cannot share evenly; .*divides it$"):
        quantize.check_block_sizes(layers, cfg, shards=3)


def test_a_row_not_made_of_whole_blocks_is_refused_in_one_line():
    from torch import nn

    from conftest import TINY
    from fsdp_ft.config import load_config
    from fsdp_ft.errors import ConfigError

    cfg = load_config(TINY, ["output_dir=/tmp/x", "finetune.method=qlora"])
    layers = [("model.layers.0.mlp.down_proj", nn.Linear(96, 64, device="meta"))]
    with pytest.raises(ConfigError, match=r"'model.layers.0.mlp.down_proj' \(64, 96\) has rows of 96 values.*"
                                          r"finetune.quant.block_size=32 or exclude"):
        quantize.check_block_sizes(layers, cfg, shards=1)


QLORA = ["finetune.method=qlora", "finetune.lora.r=4", "train.max_steps=4", "optim.lr=1e-2"]
# the same 4 samples per step on every rank count
BATCH = {1: ["train.micro_batch_size=1", "train.grad_accum=4"], 2: ["train.micro_batch_size=1", "train.grad_accum=2"],
         4: ["train.micro_batch_size=1", "train.grad_accum=1"]}


def _qlora_run(tmp_path, model: str, ranks: int):
    out = tmp_path / f"{model}-{ranks}"
    args = [f"model.path={ASSETS / model}", *QLORA, *BATCH[ranks]]
    return train_1proc(out, *args) if ranks == 1 else train_nproc(ranks, out, *args)


def _quantized_bytes(out) -> list[int]:
    from fsdp_ft.observability.metrics import read_metrics

    return [r for r in read_metrics(out) if r.get("split") == "setup"][-1]["quantized_bytes_per_rank"]


SLOW = [pytest.mark.distributed, pytest.mark.slow]
CASES = [pytest.param("tiny-qwen2", 4, marks=pytest.mark.distributed),
         pytest.param("tiny-gpt2", 2, marks=pytest.mark.distributed),  # Conv1D layers (inputs x outputs)
         pytest.param("tiny-qwen2", 2, marks=SLOW), pytest.param("tiny-gpt2", 4, marks=SLOW),
         pytest.param("tiny-llama", 2, marks=SLOW), pytest.param("tiny-llama", 4, marks=SLOW),
         pytest.param("tiny-mistral", 2, marks=SLOW), pytest.param("tiny-mistral", 4, marks=SLOW)]


@pytest.mark.parametrize("model, ranks", CASES)
def test_qlora_defaults_train_the_same_on_any_rank_count(tmp_path, model, ranks):
    """Defaults only (no quantization key): N ranks equal one process step for step in fp32, and the bytes of
    the quantized base, whole and per rank, are the hand count's."""
    one, many = _qlora_run(tmp_path, model, 1), _qlora_run(tmp_path, model, ranks)
    assert_losses_close(losses(many), losses(one), 1e-5)
    whole, shards = _quantized_bytes(one), _quantized_bytes(many)
    layers, by_hand = NF4_BYTES["gpt2" if "gpt2" in model else "llama"]
    assert whole == [by_hand]
    # rows split the codes, scales and factors; each rank keeps its own 16-value table and mean (68 bytes a layer)
    assert len(shards) == ranks and sum(shards) == by_hand + (ranks - 1) * layers * 68


def _nf4_bytes(rows: int, cols: int) -> int:
    """One weight in NF4 with the auto layout: codes (2 a byte), an int8 scale per 64 values, an fp32 factor per
    scale block (one row's worth, as cols / 64 <= 256 here), and the fp32 table (16) and mean."""
    n = rows * cols
    return n // 2 + n // 64 + rows * 4 + 16 * 4 + 4


# (layers, bytes) of the tiny assets' quantized bases, 4 blocks each:
NF4_BYTES = {
    # Llama, Qwen2, Mistral: q, o (64 x 64), k, v (32 x 64), gate, up (128 x 64), down (64 x 128)
    "llama": (28, 4 * (2 * _nf4_bytes(64, 64) + 2 * _nf4_bytes(32, 64) + 2 * _nf4_bytes(128, 64)
                       + _nf4_bytes(64, 128))),
    # GPT-2's Conv1D weights, stored inputs x outputs: c_attn (64 x 192), attn c_proj (64 x 64), c_fc (64 x 128),
    # mlp c_proj (128 x 64)
    "gpt2": (16, 4 * (_nf4_bytes(64, 192) + _nf4_bytes(64, 64) + _nf4_bytes(64, 128) + _nf4_bytes(128, 64))),
}


def test_a_quantized_conv1d_computes_with_its_dequantized_weight():
    """GPT-2's Conv1D with a 4-bit weight (fsdp_ft's matmul) equals the same layer holding torchao's own
    dequantization of that weight, forward and input gradient, exactly."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer, plain = Conv1D(192, 64), Conv1D(192, 64)
    q = quantize.quantize_weight(layer.weight.data, "nf4", 64, quantize.scaler_block_size(layer.weight.shape, 64, "auto"))
    plain.load_state_dict({"weight": q.get_original_weight(), "bias": layer.bias.data})
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    out, want = layer(x), plain(x_plain)
    assert torch.equal(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    assert torch.equal(x.grad, x_plain.grad)
