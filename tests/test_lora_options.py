"""finetune.lora.* reach the model: alpha, rslora, dropout, bias, modules_to_save, against values worked out by
hand from the LoRA formulas and the model's shapes; one short run with all of them set trains only what they
name, checkpoints only that, and exports a PEFT folder that PeftModel loads to the trained logits."""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from conftest import ASSETS, FAST, TINY

QWEN = json.loads((ASSETS / "tiny-qwen2" / "config.json").read_text())  # q, k, v carry biases; o and the MLP none
TARGETS = ["q_proj", "o_proj", "gate_proj"]  # q has a bias, o and gate do not: lora_only differs from all
SAMPLE = ["Return the lowest index in the string where substring sub is found.",
          "Create a socket object and connect it to the address."]


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory):
    """A saved Qwen2 (transformers' own save_pretrained, seeded), so PeftModel has the same base training had."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("qwen") / "qwen2"
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ASSETS / "tiny-qwen2")).save_pretrained(out)
    for f in (ASSETS / "tiny-qwen2").iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def _meta_model(qwen_base, *overrides: str):
    """The PEFT-wrapped meta model exactly as training builds it (run_setup.build_meta), before sharding."""
    from fsdp_ft.config import load_config
    from fsdp_ft.model.build import load_tokenizer, resolve_model_dir
    from fsdp_ft.runtime import distributed
    from fsdp_ft.training import run_setup

    cfg = load_config(TINY, ["output_dir=/nonexistent", f"model.path={qwen_base}", "model.random_init=false",
                             "finetune.method=lora", *overrides])
    model_dir = resolve_model_dir(cfg)
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    return run_setup.build_meta(cfg, env, model_dir, load_tokenizer(cfg, model_dir), None)[0]


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _trainable_biases(model) -> set[str]:
    """'layer.N.proj' of every bias that trains."""
    return {re.sub(r"^.*layers\.(\d+)\.\w+\.(\w+)\.(base_layer\.)?bias$", r"\1.\2", n)
            for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}


LAYERS = range(QWEN["num_hidden_layers"])


@pytest.mark.parametrize("overrides,scaling,dropout,biases", [
    # the defaults: r 8, alpha 16 -> alpha / r = 2; no dropout module; no bias trains
    ([], 16 / 8, 0.0, set()),
    # alpha / r = 32 / 4 = 8; dropout 0.1; every bias of the model trains (q, k, v in each block)
    (["finetune.lora.r=4", "finetune.lora.alpha=32", "finetune.lora.dropout=0.1", "finetune.lora.bias=all"],
     32 / 4, 0.1, {f"{i}.{p}" for i in LAYERS for p in ("q_proj", "k_proj", "v_proj")}),
    # rank-stabilised: alpha / sqrt(r) = 32 / 2 = 16; only the biases of adapted layers train (q of q, o, gate)
    (["finetune.lora.r=4", "finetune.lora.alpha=32", "finetune.lora.rslora=true", "finetune.lora.bias=lora_only",
      "finetune.lora.dropout=0.25"], 32 / math.sqrt(4), 0.25, {f"{i}.q_proj" for i in LAYERS}),
], ids=["defaults", "alpha-dropout-bias-all", "rslora-bias-lora-only"])
def test_lora_options_reach_the_peft_modules(qwen_base, overrides, scaling, dropout, biases):
    model = _meta_model(qwen_base, f"finetune.lora.target_modules=[{','.join(TARGETS)}]", *overrides)
    layers = _lora_layers(model)
    assert sorted({n.rsplit(".", 1)[1] for n in layers}) == sorted(TARGETS)
    assert len(layers) == len(TARGETS) * len(LAYERS)
    for name, layer in layers.items():
        assert layer.scaling["default"] == pytest.approx(scaling, rel=1e-12), name
        drop = layer.lora_dropout["default"]
        if dropout:
            assert isinstance(drop, torch.nn.Dropout) and drop.p == dropout, (name, drop)
        else:
            assert isinstance(drop, torch.nn.Identity), (name, drop)
    assert _trainable_biases(model) == biases


def test_modules_to_save_trains_a_copy_of_the_head(qwen_base):
    """finetune.lora.modules_to_save=[lm_head]: the head is wrapped, its copy trains (vocab x hidden values more),
    the original stays frozen."""
    plain = _meta_model(qwen_base)
    model = _meta_model(qwen_base, "finetune.lora.modules_to_save=[lm_head]")
    head = model.get_base_model().lm_head
    assert type(head).__name__ == "ModulesToSaveWrapper"
    assert head.modules_to_save["default"].weight.requires_grad and not head.original_module.weight.requires_grad
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(model) - count(plain) == QWEN["vocab_size"] * QWEN["hidden_size"]


def lora_values_by_hand(r: int, targets: list[str]) -> int:
    """LoRA's A (r x in) and B (out x r) on `targets` of every Qwen2 block."""
    h, inter = QWEN["hidden_size"], QWEN["intermediate_size"]
    kv = QWEN["num_key_value_heads"] * h // QWEN["num_attention_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, inter),
              "up_proj": (h, inter), "down_proj": (inter, h)}  # (in, out)
    return len(LAYERS) * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def test_run_with_every_option_exports_what_trained(qwen_base, tmp_path):
    """A 3-step run with r=4, alpha=32, rslora, dropout 0.1, bias=all and the head in modules_to_save: the setup row
    counts the hand total; the checkpoint holds exactly the tensors that train (LoRA A/B, the q/k/v biases, the
    head's copy: no frozen weight); final/ states the options and, loaded by PeftModel over the saved base, gives
    the trained logits; the head's copy moved away from the base head."""
    from peft import PeftModel
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    from fsdp_ft.api import train
    from fsdp_ft.config import load_config
    from fsdp_ft.observability.metrics import read_metrics

    options = ["finetune.lora.r=4", "finetune.lora.alpha=32", "finetune.lora.rslora=true", "finetune.lora.dropout=0.1",
               "finetune.lora.bias=all", "finetune.lora.modules_to_save=[lm_head]",
               f"finetune.lora.target_modules=[{','.join(TARGETS)}]"]
    result = train(load_config(TINY, [f"output_dir={tmp_path / 'run'}", *FAST, "train.max_steps=3", "optim.lr=1e-2",
                                      f"model.path={qwen_base}", "model.random_init=false", "finetune.method=lora",
                                      *options]))
    h, kv = QWEN["hidden_size"], QWEN["num_key_value_heads"] * QWEN["hidden_size"] // QWEN["num_attention_heads"]
    by_hand = lora_values_by_hand(4, TARGETS) + len(LAYERS) * (h + 2 * kv) + QWEN["vocab_size"] * h
    setup = next(r for r in read_metrics(tmp_path / "run") if r.get("split") == "setup")
    assert setup["trainable_params"] == by_hand

    ckpt = tmp_path / "run" / "checkpoints" / "step-3"
    keys = [k for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("model.")]
    kinds = [re.search(r"(lora_[AB]\.default\.weight|[qkv]_proj(\.base_layer)?\.bias|"
                       r"lm_head\.modules_to_save\.default\.weight)$", k) for k in keys]
    assert all(kinds), [k for k, m in zip(keys, kinds) if not m]
    # 2 LoRA matrices per adapted layer, 3 biases per block, one head copy
    assert len(keys) == 2 * len(TARGETS) * len(LAYERS) + 3 * len(LAYERS) + 1, keys

    final = tmp_path / "run" / "final"
    saved = json.loads((final / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["use_rslora"], saved["lora_dropout"], saved["bias"]) == (
        4, 32, True, 0.1, "all")
    assert saved["modules_to_save"] == ["lm_head"] and sorted(saved["target_modules"]) == sorted(TARGETS)
    batch = result.tokenizer(SAMPLE, return_tensors="pt", padding=True)
    result.model.eval()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen_base), final).eval()
    base_head = AutoModelForCausalLM.from_pretrained(qwen_base).lm_head.weight
    with torch.no_grad():
        want = result.model(**batch, use_cache=False).logits
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=1e-5, atol=1e-5)
    assert (loaded.get_base_model().lm_head.modules_to_save["default"].weight - base_head).abs().max() > 1e-4
