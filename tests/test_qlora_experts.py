"""QLoRA of mixture-of-experts models: the stacked expert tensors (most of such a model) are stored 4-bit like
every other base weight, and training equals peft on the dequantized base. The reference base is quantized by
torchao's own `to_nf4` here, and trained by tests/reference_trainer.py with peft's own LoRA of the expert tensors
(folded into the weight, where fsdp_ft adds it to each expert's activations)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, cli, losses
from test_moe import _cfg, adapters_match_peft, save_tiny_moe

BLOCK = 64  # finetune.quant.block_size's default


def _torchao_round_trip(w: torch.Tensor) -> torch.Tensor:
    """The values QLoRA trains on: `w` (a stack as the 2-D weight of its rows) through torchao's NF4, with the
    double-quantization block of `auto`: the largest divisor (<= 256) of the 4-bit blocks per row."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    rows = w.detach().reshape(-1, w.shape[-1]).contiguous()
    per_row = rows.shape[1] // BLOCK
    scalers = max(d for d in range(1, min(per_row, 256) + 1) if per_row % d == 0)
    return to_nf4(rows, BLOCK, scalers).get_original_weight().reshape(w.shape)


def _dequantized_reference_base(path):
    """transformers' model of `path` with every weight fsdp_ft's QLoRA quantizes replaced by its NF4 values: the
    linear layers peft's `all-linear` adapts (all in the decoder but one-row gates, which stay whole) and both
    expert stacks of every block. The routers are LoRA-adapted parameters, not linear layers, and stay whole."""
    from test_reference_trainer import base_model

    model = base_model(path)
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[0] > 1:
                module.weight.copy_(_torchao_round_trip(module.weight))
            if name.endswith("mlp.experts"):
                for stack in (module.gate_up_proj, module.down_proj):
                    stack.copy_(_torchao_round_trip(stack))
    return model


# qwen2_moe (+ a shared expert and its gate) is slow-marked to keep CI under 30 minutes: its stacks are Mixtral's
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", pytest.param("qwen2_moe", marks=pytest.mark.slow)])
def test_qlora_trains_moe_as_peft_on_the_dequantized_base(tmp_path, model_type):
    """Tiny MoE QLoRA (LoRA on the attention, the router and the expert stacks: peft's `all-linear`) against the
    reference trainer on the torchao-dequantized base: loss and gradient norm at every step, the trained adapters,
    and the merged export's logits. Before, the expert stacks stayed in full precision, so the step-0 loss already
    differed from the 4-bit base's. gpt-oss stores its stacks [experts, in, out] with biases (before: left in
    full precision, ~90% of the real model)."""
    path = save_tiny_moe(tmp_path / model_type, model_type)
    # peft's all-linear adds Mixtral's expert stacks itself; the others' are named
    stacks = [] if model_type == "mixtral" else [
        "finetune.lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"]
    adapters_match_peft(tmp_path, path, "qlora", _dequantized_reference_base(path), *stacks)


@pytest.mark.parametrize("model_type,shapes", [
    ("mixtral", [(4, 64, 128), (4, 256, 64)]),  # [experts, out, in]: down, gate_up
    ("gpt_oss", [(4, 64, 256), (4, 128, 64)]),  # [experts, in, out]: gate_up, down (and biases, kept whole)
])
def test_qlora_stores_expert_stacks_in_4_bits(tmp_path, model_type, shapes):
    """Every expert stack becomes a 4-bit weight of its rows; the bytes stored (what `fsdp-ft plan` and the
    memory report count) equal a hand count from the shapes: half a byte per value, one int8 scale per 64
    values, one factor per scale block, the mean and the 16-entry table."""
    from fsdp_ft.model import adapters
    from fsdp_ft.model.build import build_meta_model, load_hf_config, load_tokenizer
    from fsdp_ft.quant import quantize

    path = save_tiny_moe(tmp_path / model_type, model_type)
    cfg = _cfg(tmp_path, path, "finetune.method=qlora", "finetune.lora.target_modules=[q_proj,v_proj]")
    model = adapters.wrap(build_meta_model(cfg, load_hf_config(cfg, path), load_tokenizer(cfg, path)), cfg)
    stacks = {f"{n}.{k}": tuple(p.shape) for n, m in model.named_modules() if n.endswith("mlp.experts")
              for k, p in m.named_parameters(recurse=False) if p.dim() == 3}
    assert sorted(set(stacks.values())) == shapes
    assert quantize.quantize_meta_model(model, cfg, shards=2) == 2 * 2 + len(stacks)  # q, v and both stacks
    want = 0
    for name, (experts, rows, cols) in stacks.items():
        stored = model.get_submodule(name.rpartition(".")[0])._parameters[name.rpartition(".")[2]]
        assert quantize.is_nf4(stored) and tuple(stored.shape) == (experts * rows, cols), name
        n, per_row = experts * rows * cols, cols // BLOCK
        scalers = max(d for d in range(1, min(per_row, 256) + 1) if per_row % d == 0)
        want += n // 2 + n // BLOCK + n // BLOCK // scalers * 4 + 4 + 16 * 4  # fp32 model: 4-byte factors
    for linear in (model.get_submodule(f"base_model.model.model.layers.{i}.self_attn.{p}.base_layer")
                   for i in range(2) for p in ("q_proj", "v_proj")):
        n, per_row = linear.weight.numel(), linear.weight.shape[1] // BLOCK
        scalers = max(d for d in range(1, min(per_row, 256) + 1) if per_row % d == 0)
        want += n // 2 + n // BLOCK + n // BLOCK // scalers * 4 + 4 + 16 * 4
    assert quantize.quantized_bytes(model) == want
    assert not any(p.dim() == 3 for p in model.parameters())  # no expert stack left in full precision


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_moe_adapters_two_ranks_equal_one(tmp_path, method):
    """QLoRA: each of 2 ranks stores half the rows of every 4-bit stack (2 of the 4 experts); the loss curve
    equals the 1-process run's, so every rank ran every routed token through the same 4-bit experts. LoRA: the
    fold backward remakes (`model.lora_folds`) reads the stack FSDP gathers again for the block's backward."""
    path = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    common = [str(TINY), f"model.path={path}", "model.random_init=false", f"finetune.method={method}",
              "train.max_steps=4", "train.log_every=1", "train.eval_every=0", "train.save_every=0",
              "train.global_batch_size=8", "train.grad_accum=null", "optim.lr=5e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    cli("train", *common, f"output_dir={one}")
    cli("run", "--nproc-per-node", "2", *common, f"output_dir={two}")
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert len({round(v, 6) for v in a.values()}) > 1  # it trained
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_qlora_moe_flops_equal_hand_computation(tmp_path):
    """MFU's FLOP count of a QLoRA MoE (peft's `all-linear`: attention, router and expert stacks) by hand. The
    4-bit stacks never train: their matmuls cost forward and input gradient per token; their LoRA runs on the
    activations (2 x r x (in + out) per token and expert, forward, input and weight gradients), not as a fold per
    call. The router (a full-precision parameter) is still folded by peft once per call."""
    from fsdp_ft.model import adapters
    from fsdp_ft.model.build import build_meta_model, load_hf_config, load_tokenizer
    from fsdp_ft.observability.flops import count_flops
    from fsdp_ft.quant import quantize
    from test_flops_moe import lora_ranks

    path = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    cfg = _cfg(tmp_path, path, "finetune.method=qlora", "finetune.lora.r=4")
    model = adapters.wrap(build_meta_model(cfg, load_hf_config(cfg, path), load_tokenizer(cfg, path)), cfg)
    ranks = lora_ranks(model)
    quantize.quantize_meta_model(model, cfg, shards=1)
    counts = count_flops(model)

    H, I, E, k, L, V, r = 64, 128, 4, 2, 2, 1024, 4  # the tiny Mixtral: 4 heads of 16, 2 KV heads
    attn = [(H, 64), (H, 32), (H, 32), (64, H)]  # q, k, v, o as (in, out)
    router, stacks = H * E, k * (H * 2 * I + I * H)
    base = 2 * (L * (sum(i * o for i, o in attn) + router + stacks) + H * V)
    attn_lora = 2 * L * sum(r * (i + o) for i, o in attn)
    expert_lora = 2 * L * k * (ranks["gate_up_proj"] * (H + 2 * I) + ranks["down_proj"] * (I + H))
    assert ranks["router"] and ranks["gate_up_proj"] and ranks["down_proj"], ranks
    forward = base + attn_lora + expert_lora
    no_input_grad = 2 * sum(i * o for i, o in attn[:3]) + 3 * 2 * r * H  # block 0's q/k/v read the embeddings
    assert counts.forward_per_token == forward
    assert counts.input_grad_per_token == forward - no_input_grad
    assert counts.weight_grad_per_token == attn_lora + expert_lora + 2 * L * router  # the folded router trains
    assert counts.per_call == 3 * L * 2 * E * H * ranks["router"]  # the router's fold: forward, A and B gradients


def test_qlora_gpt_oss_flops_equal_the_full_models_plus_lora(tmp_path):
    """gpt-oss's 4-bit stacks ([experts, in, out]) run `x @ W_e` through the frozen-weight op directly, not
    `F.linear`: the count must still see them. QLoRA's forward FLOPs equal the full model's (its experts counted
    by the dense stand-in, other code) plus the adapters' by hand: 2 x r x (in + out) per token for q_proj and,
    k times, for each expert stack."""
    from fsdp_ft.model import adapters
    from fsdp_ft.model.build import build_meta_model, load_hf_config, load_tokenizer
    from fsdp_ft.observability.flops import count_flops
    from fsdp_ft.quant import quantize

    path = save_tiny_moe(tmp_path / "gpt_oss", "gpt_oss")
    counts = {}
    for method, extra in (("full", []), ("qlora", ["finetune.lora.r=4", "finetune.lora.target_modules=[q_proj]",
                                                    "finetune.lora.target_parameters=[mlp.experts.gate_up_proj,"
                                                    "mlp.experts.down_proj]"])):
        cfg = _cfg(tmp_path, path, f"finetune.method={method}", *extra)
        model = build_meta_model(cfg, load_hf_config(cfg, path), load_tokenizer(cfg, path))
        if method == "qlora":
            model = adapters.wrap(model, cfg)
            assert quantize.quantize_meta_model(model, cfg, shards=1) == 2 + 4  # q_proj and the stacks, 2 layers
        counts[method] = count_flops(model)
    H, I, k, L, r, q_out = 64, 128, 2, 2, 4, 64  # the tiny gpt-oss: 4 heads of 16
    lora = 2 * L * r * (H + q_out) + 2 * L * k * r * ((H + 2 * I) + (I + H))
    assert counts["qlora"].forward_per_token == counts["full"].forward_per_token + lora


def _drop_base_record(run) -> None:
    """Make the run's newest checkpoint look as fsdp_ft wrote it before the quantized base was recorded."""
    import json

    (state_file,) = sorted((run / "checkpoints").glob("step-*/state.json"))[-1:]
    state = json.loads(state_file.read_text())
    assert state.pop("quantized_base")  # recorded now
    state_file.write_text(json.dumps(state))


def test_resume_refuses_adapters_trained_on_full_precision_experts(tmp_path):
    """A QLoRA MoE checkpoint from before the expert stacks were quantized holds adapters trained on full-precision
    experts: resuming it would continue them on another base, so it is refused in one line, exit 2, and the run
    folder is left as it was. A dense QLoRA checkpoint of that time (same base as today) still resumes."""
    from fsdp_ft.checkpoint.dcp_checkpoint import list_checkpoints

    path = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    common = [str(TINY), f"model.path={path}", "model.random_init=false", "finetune.method=qlora",
              "train.log_every=1", "train.eval_every=0", "train.save_every=2"]
    moe = tmp_path / "moe"
    cli("train", *common, "train.max_steps=2", f"output_dir={moe}")
    _drop_base_record(moe)
    proc = cli("train", *common, "train.max_steps=4", "resume=auto", f"output_dir={moe}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "MoE expert tensors in full precision" in proc.stderr.strip().splitlines()[-1]
    assert [s for s, _ in list_checkpoints(moe)] == [2] and sorted(losses(moe)) == [1, 2]

    dense = tmp_path / "dense"
    cli("train", str(TINY), "finetune.method=qlora", "train.max_steps=2", "train.save_every=2", "train.log_every=1",
        "train.eval_every=0", f"output_dir={dense}")
    _drop_base_record(dense)
    cli("train", str(TINY), "finetune.method=qlora", "train.max_steps=4", "train.save_every=2", "train.log_every=1",
        "train.eval_every=0", "resume=auto", f"output_dir={dense}")
    assert sorted(losses(dense)) == [1, 2, 3, 4]


@pytest.mark.slow  # compiling costs a minute
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_moe_compiled_equals_eager(tmp_path, method):
    """Under train.compile the quantized experts stay out of the compiled graph (their routing reads data; dynamo
    failed on the per-expert 4-bit views) and the rest of each block compiles; LoRA's fold remaking steps aside
    for the compiled graph. Either way the loss curve equals eager's."""
    path = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    common = [str(TINY), f"model.path={path}", "model.random_init=false", f"finetune.method={method}",
              "train.max_steps=3", "train.log_every=1", "train.eval_every=0", "train.save_every=0"]
    cli("train", *common, f"output_dir={tmp_path / 'eager'}")
    cli("train", *common, "train.compile=true", f"output_dir={tmp_path / 'compiled'}", timeout=900)
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5), step
