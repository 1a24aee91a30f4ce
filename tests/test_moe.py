"""Mixture-of-experts models: transformers 5 holds each expert projection of a layer as one 3-D tensor, while the
checkpoints (and transformers' own save_pretrained) keep one matrix per expert. Loading must convert (each rank
reading only its own experts), a checkpoint that does not fit must be refused rather than half-initialised, and
export must write the checkpoint's own layout back. Every comparison is against transformers' own loading."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ASSETS, TINY, cli, losses, save_pretrained_from_config
from fsdp_ft.config import load_config
from fsdp_ft.runtime import distributed
from fsdp_ft.training import fsdp_engine

SAMPLE = ["Return a new list containing all items from the iterable in ascending order.",
          "Open file and return a stream. Raise OSError upon failure."]

# (model_type, its expert settings): the three checkpoint layouts transformers converts for MoE blocks
MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),  # block_sparse_moe.experts.N.w1/w2/w3
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),  # experts.N.gate_proj/up_proj/down_proj
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,  # + a shared expert
                      shared_expert_intermediate_size=64),
}
# checkpoints in the model's own fused layout: gpt-oss's stacks are [experts, in, out] with biases, gate and up
# interleaved (bf16 exports; the hub's MXFP4 blocks are another matter), and it runs eager attention (sinks)
FUSED = {"gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=32,
                         layer_types=["sliding_attention", "full_attention"])}


def save_tiny_moe(out, model_type: str, seed: int = 5, **changes):
    """A 'pretrained' MoE folder written by transformers' save_pretrained (the per-expert layout; FUSED types keep
    the model's own), with the tiny
    tokenizer; the shapes of tests/assets/tiny-llama, 2 blocks of 4 experts, and `changes` to the config."""
    from transformers import AutoConfig

    base = json.loads((ASSETS / "tiny-llama" / "config.json").read_text())
    cfg = AutoConfig.for_model(model_type, num_hidden_layers=2, **{**{**MOE, **FUSED}[model_type], **changes},
                               **{k: base[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                       "num_key_value_heads", "vocab_size", "bos_token_id",
                                                       "eos_token_id", "pad_token_id") if k in base})
    return save_pretrained_from_config(out, cfg, seed)


def _keys(folder) -> set[str]:
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            keys |= set(h.keys())
    return keys


def _cfg(tmp_path, path, *overrides):
    return load_config(TINY, [f"output_dir={tmp_path / 'run'}", f"model.path={path}", "model.random_init=false",
                              *overrides])


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_moe_checkpoint_loads_as_transformers_loads_it(tmp_path, model_type):
    """The per-expert checkpoint is read into the fused experts: logits equal transformers' from_pretrained, and
    nothing but buffers was initialised."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_moe(tmp_path / model_type, model_type)
    assert any(".experts.0." in k for k in _keys(path))  # really the per-expert layout on disk
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    built = fsdp_engine.build(_cfg(tmp_path, path), distributed.init_distributed())
    model = built.model.eval()
    assert built.info["weights_initialised"] == len([n for n, _ in model.named_buffers()])
    fused = {n: p.full_tensor() for n, p in model.named_parameters() if ".experts." in n}
    assert fused and all(t.dim() == 3 for t in fused.values())
    for name, t in fused.items():
        torch.testing.assert_close(t, ref.get_parameter(name), rtol=0, atol=0)
    batch = built.data.tokenizer(SAMPLE, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, use_cache=False).logits, ref(**batch).logits,
                                   rtol=1e-5, atol=1e-5)


def test_checkpoint_missing_a_base_weight_is_refused(tmp_path):
    """A checkpoint without one of the base's weights fails at start, naming it (before: that weight trained from
    random init and the run ended with exit 0)."""
    path = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    with safe_open(str(path / "model.safetensors"), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys() if k != "model.layers.1.self_attn.k_proj.weight"}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    proc = cli("train", str(TINY), f"output_dir={tmp_path / 'run'}", f"model.path={path}", "model.random_init=false",
               "train.max_steps=2", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "model.layers.1.self_attn.k_proj.weight" in last and "model.path" in last, last
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.distributed
def test_moe_two_ranks_equal_one_and_export_keeps_the_checkpoint_layout(tmp_path):
    """Full fine-tuning of a Mixtral on 2 ranks (each reads its 2 of the 4 experts) follows the 1-process curve;
    the exported model has exactly the checkpoint's per-expert keys and transformers loads it to the trained
    weights."""
    from transformers import AutoModelForCausalLM

    from fsdp_ft.checkpoint.dcp_checkpoint import list_checkpoints
    from fsdp_ft.storage.weights_io import iter_dcp_tensors

    path = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    common = [str(TINY), f"model.path={path}", "model.random_init=false", "train.max_steps=6", "train.log_every=1",
              "train.eval_every=0", "train.save_every=6", "train.global_batch_size=8", "train.grad_accum=null"]
    one, two = tmp_path / "one", tmp_path / "two"
    cli("train", *common, f"output_dir={one}")
    cli("run", "--nproc-per-node", "2", *common, f"output_dir={two}")
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step

    final = two / "final"
    assert _keys(final) == _keys(path)  # per-expert w1/w2/w3 under block_sparse_moe, as Mixtral checkpoints
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    ckpt = list_checkpoints(two)[-1][1]
    trained = dict(iter_dcp_tensors(ckpt, prefix="model."))
    assert any(t.dim() == 3 for t in trained.values())
    for name, t in trained.items():
        torch.testing.assert_close(reloaded.state_dict()[name], t, rtol=0, atol=0, msg=name)


def _original_layout_state(model) -> dict[str, torch.Tensor]:
    """What transformers' save_pretrained writes for `model`: the checkpoint's per-expert layout."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, {k: v.detach() for k, v in model.state_dict().items()})


def test_moe_full_fine_tuning_equals_the_reference_trainer(tmp_path):
    """Mixtral full fine-tuning in one process against tests/reference_trainer.py (transformers loads and
    converts the checkpoint, plain PyTorch trains): loss and gradient norm at every step, and the exported
    per-expert weights against the reference's, both in the checkpoint's layout."""
    from safetensors.torch import load_file

    from reference_trainer import Recipe
    from test_reference_trainer import assert_steps_match, assert_weights_match, base_model, reference, run_fsdp_ft

    path = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    r = Recipe(steps=4, micro=2, accum=2, seq_len=48, lr=3e-3, weight_decay=0.1, warmup=1, schedule="cosine",
               max_grad_norm=0.5)
    got = run_fsdp_ft(tmp_path / "run", path, r)
    model = base_model(path)
    want = reference(model, path, r)
    assert_steps_match(got, want)
    exported = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert any(".experts.3.w2." in k for k in exported)
    assert_weights_match(exported, _original_layout_state(model))


def test_moe_lora_adapts_experts_as_peft_does(tmp_path):
    """LoRA with target_modules empty on an MoE: peft also adapts the expert tensors (a low-rank update per
    expert) and the router. fsdp_ft equals the reference trainer with peft's own model, step for step, and the
    trained expert adapters match."""
    from test_reference_trainer import base_model

    path = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    adapters_match_peft(tmp_path, path, "lora", base_model(path))



def adapters_match_peft(tmp_path, path, method: str, base, *extra: str):
    """Train `method` (r 4, alpha 8) with fsdp_ft, and peft on `base` from the same initial adapters with the
    reference trainer: loss and gradient norm at every step, and the trained adapters, the experts' among them,
    must match; so must the merged export's logits, and its keys the checkpoint's per-expert layout."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from reference_trainer import Recipe
    from test_reference_trainer import assert_steps_match, assert_weights_match, reference, run_fsdp_ft

    adapter = [f"finetune.method={method}", "finetune.lora.r=4", "finetune.lora.alpha=8", *extra]
    r = Recipe(steps=4, micro=2, accum=2, seq_len=48, lr=5e-3, weight_decay=0.1, warmup=1, schedule="constant",
               max_grad_norm=1.0, seed=1)
    init = tmp_path / "init"
    run_fsdp_ft(init, path, Recipe(steps=1, micro=2, accum=1, seq_len=48, lr=0.0, seed=1), *adapter)
    got = run_fsdp_ft(tmp_path / "run", path, r, *adapter)
    model = PeftModel.from_pretrained(base, init / "final", is_trainable=True)
    want = reference(model, path, r)
    assert_steps_match(got, want)
    trained = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert any(".experts." in k and "lora_B" in k for k in trained)  # the experts were adapted
    assert_weights_match(trained, get_peft_model_state_dict(model))

    merged = tmp_path / "merged"
    cli("export", str(tmp_path / "run"), "--out", str(merged), "--merge-adapters")
    assert _keys(merged) == _keys(path)
    ids = torch.arange(40).remainder(1000).reshape(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits,
                                   model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


# full is slow-marked for CI time: the experts' stand-ins it checks are LoRA's and QLoRA's too
@pytest.mark.parametrize("model_type,method", [pytest.param("mixtral", "full", marks=pytest.mark.slow),
                                               ("mixtral", "lora"), ("mixtral", "qlora"), ("gpt_oss", "lora")])
def test_moe_plan_predicts_the_measured_peak(tmp_path, model_type, method):
    """`fsdp-ft plan` of an MoE (before: a traceback from the experts' grouped matmul on fake tensors) against the
    peak live tensor bytes a real run measures. gpt-oss's stacks have biases and its own gate (clamped, gate and up
    interleaved), which keeps more for backward than SiLU: the plan ran the SiLU stand-in and missed 15%."""
    from test_plan import _check

    path = save_tiny_moe(tmp_path / model_type, model_type)
    data = ASSETS / "data" / "tiny_text_train.jsonl"
    stacks = [] if model_type == "mixtral" else [
        "finetune.lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"]
    _check(f"moe-{model_type}-{method}", 1, [f"model.path={path}", "model.random_init=false",
                                             f"finetune.method={method}", *stacks], data, tmp_path)


def test_lora_target_parameters_choose_the_expert_tensors(tmp_path):
    """finetune.lora.target_parameters reaches peft: with target_modules [q_proj] and the experts' down projection
    named, exactly those are adapted (no router, no gate_up_proj), as peft adapts them on transformers' model."""
    import peft
    from transformers import AutoModelForCausalLM

    from fsdp_ft.model import adapters

    path = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    cfg = _cfg(tmp_path, path, "finetune.method=lora", "finetune.lora.target_modules=[q_proj]",
               "finetune.lora.target_parameters=[experts.down_proj]")
    ours = adapters.wrap(AutoModelForCausalLM.from_pretrained(path), cfg)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(path), peft.LoraConfig(
        r=cfg.finetune.lora.r, lora_alpha=cfg.finetune.lora.alpha, target_modules=["q_proj"],
        target_parameters=["experts.down_proj"]))

    def adapted(m):
        return sorted(n for n, p in m.named_parameters() if p.requires_grad)

    assert adapted(ours) == adapted(theirs)
    assert any(".experts." in n for n in adapted(ours))
    assert not any(".gate." in n or "k_proj" in n for n in adapted(ours))
    assert set(ours.peft_config["default"].target_parameters) == {"experts.down_proj"}


@pytest.mark.parametrize("chunked", [True, False])
def test_router_load_balancing_loss_when_the_config_asks(tmp_path, chunked):
    """A config with output_router_logits: the training loss is transformers' own (cross-entropy + coef x the
    routers' load-balancing loss, with padding masked), whichever head-loss path; eval stays cross-entropy."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_moe(tmp_path / "mixtral", "mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    built = fsdp_engine.build(_cfg(tmp_path, path, f"train.chunked_head_loss={str(chunked).lower()}"),
                              distributed.init_distributed())
    task = built.data.task
    batch = task.collate([task.encode({"text": t}) for t in SAMPLE])
    assert batch["attention_mask"].min() == 0  # padded: the aux loss must mask it as transformers does
    model = built.model.train()
    sums = task.loss_sums(model, batch)
    ours = (sums["loss"] / sums["count"]).item()
    with torch.no_grad():
        eval_sums = task.loss_sums(built.model.eval(), batch)
    ref = AutoModelForCausalLM.from_pretrained(path).train()
    labels = batch["labels"]
    out = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    cross_entropy = (out.loss - 0.5 * out.aux_loss).item()
    assert ours == pytest.approx(out.loss.item(), rel=1e-5)
    assert abs(ours - cross_entropy) > 1e-3  # the aux term is really there
    assert (eval_sums["loss"] / eval_sums["count"]).item() == pytest.approx(cross_entropy, rel=1e-5)


def test_qlora_keeps_a_one_row_gate_whole_so_any_rank_count_works(tmp_path):
    """Qwen2-MoE's shared-expert gate is a linear layer of one row, which no 2+ ranks can share: QLoRA keeps it in
    full precision (before: QLoRA of any Qwen2-MoE on 2+ GPUs was refused) and quantizes every other base linear."""
    from fsdp_ft.model import adapters
    from fsdp_ft.model.build import build_meta_model, load_hf_config, load_tokenizer
    from fsdp_ft.quant import quantize

    path = save_tiny_moe(tmp_path / "qwen2_moe", "qwen2_moe")
    cfg = _cfg(tmp_path, path, "finetune.method=qlora")
    model = adapters.wrap(build_meta_model(cfg, load_hf_config(cfg, path), load_tokenizer(cfg, path)), cfg)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and
               n.endswith(".base_layer")]  # the base layers under peft's LoRA layers
    assert sum("shared_expert_gate" in n for n, _ in linears) == 2  # one per block
    stacks = 2 * 2  # each block's experts: gate_up_proj and down_proj (tests/test_qlora_experts.py)
    assert quantize.quantize_meta_model(model, cfg, shards=2) == len(linears) - 2 + stacks  # all but the 2 gates
    for name, linear in linears:
        assert quantize.is_quantized(linear.weight) == ("shared_expert_gate" not in name), name
