"""LoRA, DoRA and QLoRA (NF4, double-quantized) under FSDP2 equal the single-process run step for step;
IA3 and prompt learning train under FSDP too; adapters export to PEFT format and merge."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import FAST, TINY, assert_losses_close, cli, losses, train_1proc, train_nproc
from fsdp_ft.observability.metrics import read_metrics

ONE_PROC = ["train.micro_batch_size=2", "train.grad_accum=2"]
TWO_RANKS = ["train.micro_batch_size=2", "train.grad_accum=1"]
STEPS = ["train.max_steps=10", "optim.lr=1e-2"]
SAMPLE = ["Return the lowest index in the string where substring sub is found.",
          "Create a socket object and connect it to the address."]


def _setup_row(out):
    return [r for r in read_metrics(out) if r.get("split") == "setup"][-1]


@pytest.fixture(scope="module")
def peft_runs(session_tmp, pretrained_q256):
    """1-process and 2-rank runs per method, made once for the tests below."""
    cache = {}

    def get(method: str, ranks: int, *extra: str):
        key = (method, ranks, extra)
        if key not in cache:
            args = [f"model.path={pretrained_q256}", "model.random_init=false", f"finetune.method={method}",
                    *STEPS, *extra]
            out = session_tmp / f"peft-{method}-{ranks}-{len(cache)}"
            cache[key] = (train_1proc(out, *ONE_PROC, *args) if ranks == 1
                          else train_nproc(ranks, out, *TWO_RANKS, *args))
        return cache[key]
    return get


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lora", pytest.param("dora", marks=pytest.mark.slow), "qlora"])
def test_two_ranks_equal_one_process_fp32(peft_runs, method):
    one, two = peft_runs(method, 1), peft_runs(method, 2)
    assert len(losses(one)) == 10
    assert_losses_close(losses(two), losses(one), 1e-5)
    assert losses(one)[10] < losses(one)[1]  # and it learns


@pytest.mark.distributed
def test_qlora_bf16_two_ranks_close_to_one_process(peft_runs):
    """bf16 compute over a dequantized NF4 base; same micro-batches on both sides, so only the fp32 gradient
    sum order differs: 2e-3 relative (about half a bf16 ulp) over 10 steps."""
    extra = ("fsdp.mixed_precision=bf16",)
    assert_losses_close(losses(peft_runs("qlora", 2, *extra)), losses(peft_runs("qlora", 1, *extra)), 2e-3)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_compiled_blocks_two_ranks_equal_one_process(peft_runs, method):
    """train.compile with adapters in the blocks (and, for QLoRA, NF4 weights all-gathered into them): 2 ranks
    compiled equal the eager single process (full fine-tuning's compiled run is in the default suite)."""
    two = peft_runs(method, 2, "train.compile=true")
    assert_losses_close(losses(two), losses(peft_runs(method, 1)), 1e-5)
    assert _setup_row(two)["compiled"] == _setup_row(two)["blocks"]


@pytest.mark.distributed
def test_quantized_base_is_sharded(peft_runs):
    """Each of 2 ranks stores half the 4-bit base (within 10%), and 4 bits are about 1/8 of fp32."""
    one = _setup_row(peft_runs("qlora", 1))["quantized_bytes_per_rank"]
    two = _setup_row(peft_runs("qlora", 2))["quantized_bytes_per_rank"]
    assert len(one) == 1 and len(two) == 2
    for b in two:
        assert abs(b - one[0] / 2) <= 0.1 * one[0] / 2, (b, one)
    values = 2 * (4 * 256 * 256 + 3 * 256 * 512)  # 2 blocks: q, k, v, o and gate, up, down
    rows = 2 * (4 * 256 + 2 * 512 + 256)
    # 4-bit codes, an 8-bit scale per 64 values, an fp32 factor per row's scales (the auto layout: each row holds
    # 4 or 8 blocks), and per tensor (14) an fp32 scale mean and the 16-entry fp32 code book
    assert one[0] == values // 2 + values // 64 + rows * 4 + 14 * (4 + 16 * 4)
    # the placement audit at the end of set-up saw every tensor once, on each rank count: 14 NF4 weights by their 5
    # inner tensors, 28 LoRA matrices, embedding, head, 5 norms, and the rotary buffers inv_freq, original_inv_freq
    for run in (peft_runs("qlora", 1), peft_runs("qlora", 2)):
        assert _setup_row(run)["placement_checked"] == 14 * 5 + 28 + 7 + 2


@pytest.mark.distributed
def test_only_adapters_train(peft_runs):
    """Trainable counts by hand: r=8 LoRA on q, k, v, o (256 -> 256) and gate, up (256 -> 512), down (512 -> 256)."""
    per_block = 4 * (8 * 256 + 256 * 8) + 2 * (8 * 256 + 512 * 8) + (8 * 512 + 256 * 8)
    row = _setup_row(peft_runs("lora", 1))
    assert row["trainable_params"] == 2 * per_block
    assert row["trainable_share"] == pytest.approx(row["trainable_params"] / row["total_params"])


@pytest.mark.distributed
@pytest.mark.parametrize("ranks", [1, 2])
def test_lora_checkpoint_holds_only_the_adapters(peft_runs, ranks):
    """A PEFT run checkpoints only what trains (the base is reloaded from model.path on resume): the DCP
    checkpoint's model tensors are the 28 LoRA matrices (A and B on 7 linears of 2 blocks), nothing of the base;
    the optimizer state covers the same tensors."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = list(FileSystemReader(str(peft_runs("lora", ranks) / "checkpoints" / "step-10")).read_metadata()
                .state_dict_metadata)
    model = [k for k in keys if k.startswith("model.")]
    assert len(model) == 2 * 7 * 2 and all(re.search(r"\.lora_[AB]\.default\.weight$", k) for k in model), model
    optim = {re.sub(r"^optim\.state\.(.*)\.(exp_avg|exp_avg_sq|step)$", r"model.\1", k) for k in keys
             if k.startswith("optim.state.")}
    assert optim == set(model)


def test_optimizer_holds_only_adapters(tmp_path, pretrained_q256):
    from fsdp_ft.config import load_config
    from fsdp_ft.runtime import distributed
    from fsdp_ft.training import fsdp_engine
    from fsdp_ft.training.optim import build_optimizer

    cfg = load_config(TINY, [f"output_dir={tmp_path}", f"model.path={pretrained_q256}", "model.random_init=false",
                             "finetune.method=qlora"])
    env = distributed.init_distributed()
    model = fsdp_engine.build(cfg, env).model
    opt = build_optimizer(model, cfg, env.device)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in in_opt]
    assert names and all("lora_" in n for n in names)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == sum(
        p.numel() for g in opt.param_groups for p in g["params"])


def _trained(tmp_path, pretrained, method):
    from fsdp_ft.api import train
    from fsdp_ft.config import load_config

    cfg = load_config(TINY, [f"output_dir={tmp_path / method}", *FAST, "train.max_steps=4", "optim.lr=1e-2",
                             f"model.path={pretrained}", "model.random_init=false", f"finetune.method={method}"])
    result = train(cfg)
    result.model.eval()
    batch = result.tokenizer(SAMPLE, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = result.model(**batch, use_cache=False).logits
    return result, batch, logits


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
def test_adapter_export_and_merge_reproduce_logits(tmp_path, pretrained_q256, method):
    """final/ is a PEFT adapter folder: PeftModel on the base gives the trained logits. For QLoRA the base is
    the dequantized NF4 weight (what training saw). --merge-adapters writes a plain model with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fsdp_ft.config import load_config
    from fsdp_ft.quant.quantize import round_trip_base

    result, batch, want = _trained(tmp_path, pretrained_q256, method)
    final = result.output_dir / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_q256), final).eval()
    round_trip_base(peft_model, load_config(result.output_dir / "config.yaml"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, AutoModelForCausalLM.from_pretrained(pretrained_q256)(**batch).logits)

    cli("export", str(result.output_dir), "--merge-adapters", "--out", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        # merging adds B @ A into W once instead of applying it to every input: float rounding only
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-4, atol=1e-4)


def other_method_trainable_by_hand(method: str, cfg: dict, virtual: int = 4, encoder: int = 128) -> int:
    """Trainable values of peft's IA3 / prompt-learning defaults on a Llama `cfg`, by hand. IA3: a scale per
    output row of k_proj and v_proj and per input column of down_proj (the feed-forward layer) in every block.
    prompt: one embedding row per virtual token. prefix: per virtual token a key and a value row of every
    block's attention. p_tuning: the virtual tokens' embedding and the 3-layer MLP hidden -> encoder -> encoder
    -> hidden (weights and biases)."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    return {"ia3": layers * (2 * kv + cfg["intermediate_size"]),
            "prompt": virtual * h,
            "prefix": virtual * 2 * layers * kv,
            "p_tuning": virtual * h + (h * encoder + encoder) + (encoder * encoder + encoder) + (encoder * h + h),
            }[method]


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["ia3", "prompt", "prefix", "p_tuning"])
def test_other_peft_methods_under_fsdp(session_tmp, pretrained_q256, method):
    """IA3 and prompt learning train under FSDP2 and equal one process: the adapters (and only they) train, by
    the hand count; the trained model is not the initial one (frozen or unstepped adapters would leave it so);
    final/ is a PEFT folder that PeftModel loads over the base, giving the trained logits."""
    import json

    import math

    from peft import PeftModel
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    from fsdp_ft.api import train
    from fsdp_ft.config import load_config
    from fsdp_ft.runtime import distributed
    from fsdp_ft.training import fsdp_engine

    args = [f"model.path={pretrained_q256}", "model.random_init=false", f"finetune.method={method}",
            "train.max_steps=4", "finetune.prompt.num_virtual_tokens=4", "optim.lr=1e-2"]
    cfg = load_config(TINY, [f"output_dir={session_tmp / f'{method}-1'}", *FAST, *ONE_PROC, *args])
    result = train(cfg)  # in this process: its trained model is compared below
    two = train_nproc(2, session_tmp / f"{method}-2", *TWO_RANKS, *args)
    assert_losses_close(losses(two), losses(result.output_dir), 1e-5)
    by_hand = other_method_trainable_by_hand(method, json.loads((pretrained_q256 / "config.json").read_text()))
    assert _setup_row(result.output_dir)["trainable_params"] == _setup_row(two)["trainable_params"] == by_hand
    for out in (result.output_dir, two):  # the checkpoint holds what trains and nothing of the base: peft also
        # registers a prompt-learning model's input embedding as `word_embeddings`, which torch's frozen filter missed
        meta = FileSystemReader(str(out / "checkpoints" / "step-4")).read_metadata().state_dict_metadata
        saved = {k: math.prod(v.size) for k, v in meta.items() if k.startswith("model.")}
        assert sum(saved.values()) == by_hand, saved

    batch = result.tokenizer(SAMPLE, return_tensors="pt", padding=True)
    result.model.eval()
    with torch.no_grad():
        trained = result.model(**batch, use_cache=False).logits
        initial_model = fsdp_engine.build(cfg, distributed.init_distributed()).model.eval()  # same seed, not trained
        initial = initial_model(**batch, use_cache=False).logits
    assert (trained - initial).abs().max() > 1e-3, "the adapters did not move in 4 steps of lr 1e-2"

    assert (two / "final" / "adapter_config.json").is_file()
    final = result.output_dir / "final"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_q256), final).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained, rtol=1e-5, atol=1e-5)


def test_scaler_block_size_must_fit_every_row_shard():
    """576-wide layers (SmolLM2) hold 2,592 and 864 blocks per row shard on 2 ranks: 256 and 64 do not divide
    them; the error names the key and the largest size that does (216 = the largest divisor <= 256 of 864)."""
    from torch import nn

    from fsdp_ft.config import load_config
    from fsdp_ft.errors import ConfigError
    from fsdp_ft.quant.quantize import check_block_sizes

    layers = [("q_proj", nn.Linear(576, 576, device="meta")), ("k_proj", nn.Linear(576, 192, device="meta"))]
    for size in (256, 64):
        cfg = load_config(TINY, ["output_dir=/tmp/x", "finetune.method=qlora", f"finetune.quant.scaler_block_size={size}"])
        with pytest.raises(ConfigError, match=r"set finetune.quant.scaler_block_size=216, or auto \(the default"):
            check_block_sizes(layers, cfg, shards=2)
    for size, shards in ((216, 2), (144, 2), (144, 4)):
        cfg = load_config(TINY, ["output_dir=/tmp/x", "finetune.method=qlora",
                                 f"finetune.quant.scaler_block_size={size}"])
        check_block_sizes(layers, cfg, shards=shards)
