"""Model building: block discovery on several architectures, loading pretrained weights shard by shard, and
activation checkpointing that really recomputes. Runs in this process (world size 1, same code path)."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import ASSETS, TINY
from fsdp_ft.config import load_config
from fsdp_ft.model.build import build_meta_model, load_hf_config, load_tokenizer, resolve_model_dir
from fsdp_ft.parallel import fsdp
from fsdp_ft.runtime import distributed
from fsdp_ft.training import fsdp_engine

SAMPLE = ["Return a new list containing all items from the iterable in ascending order.",
          "Open file and return a stream. Raise OSError upon failure."]


def _cfg(tmp_path, *overrides):
    return load_config(TINY, [f"output_dir={tmp_path / 'run'}", *overrides])


def _meta_model(tmp_path, folder: str, task: str = "causal_lm"):
    cfg = _cfg(tmp_path, f"model.path={ASSETS / folder}", f"task={task}")
    model_dir = resolve_model_dir(cfg)
    tok = load_tokenizer(cfg, model_dir)
    return build_meta_model(cfg, load_hf_config(cfg, model_dir), tok, ["a", "b", "c"] if task == "seq_cls" else None)


@pytest.mark.parametrize("folder,task,block", [
    ("tiny-llama", "causal_lm", "LlamaDecoderLayer"),
    ("tiny-qwen2", "causal_lm", "Qwen2DecoderLayer"),
    ("tiny-mistral", "causal_lm", "MistralDecoderLayer"),
    ("tiny-gpt2", "causal_lm", "GPT2Block"),
    ("tiny-bert", "seq_cls", "BertLayer"),
    ("tiny-llama", "seq_cls", "LlamaDecoderLayer"),
])
def test_block_discovery(tmp_path, folder, task, block):
    model = _meta_model(tmp_path, folder, task)
    blocks = fsdp.find_blocks(model)
    assert [type(b).__name__ for b in blocks] == [block] * 4


def test_block_override_and_error(tmp_path):
    from fsdp_ft.errors import ConfigError

    model = _meta_model(tmp_path, "tiny-llama")
    assert len(fsdp.find_blocks(model, ["LlamaMLP"])) == 4
    with pytest.raises(ConfigError, match="model.block_classes"):
        fsdp.find_blocks(model, ["NoSuchBlock"])


def _save_pretrained(tmp_path, folder: str, auto_cls, seed: int = 7):
    """A 'pretrained' HF folder: random weights saved by transformers itself, plus the tokenizer."""
    from transformers import AutoConfig

    src = ASSETS / folder
    torch.manual_seed(seed)
    hf = auto_cls.from_config(AutoConfig.from_pretrained(src)).eval()
    dst = tmp_path / f"pretrained-{folder}"
    hf.save_pretrained(dst)
    for f in src.iterdir():
        if f.name != "config.json":
            shutil.copy(f, dst / f.name)
    return dst, hf


def _built(cfg):
    env = distributed.init_distributed()
    built = fsdp_engine.build(cfg, env)
    return built.model.eval(), built.data.tokenizer, built.info


@pytest.mark.parametrize("folder,auto_name", [("tiny-llama", "AutoModelForCausalLM"),
                                              ("tiny-llama-tied", "AutoModelForCausalLM"),
                                              ("tiny-gpt2", "AutoModel")])
def test_sharded_load_matches_hf_from_pretrained(tmp_path, folder, auto_name):
    """Each rank reads its rows from safetensors; the logits equal transformers' own from_pretrained.
    GPT-2 is saved as the bare base model, so the loader must add the `transformer.` prefix."""
    import transformers

    path, _ = _save_pretrained(tmp_path, folder, getattr(transformers, auto_name))
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model, tok, info = _built(_cfg(tmp_path, f"model.path={path}", "model.random_init=false"))
    assert info["weights_initialised"] == len([n for n, _ in model.named_buffers()])  # only rotary/buffers
    batch = tok(SAMPLE, return_tensors="pt", padding=True)
    with torch.no_grad():
        got = model(**batch, use_cache=False).logits
        want = ref(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_classifier_head_is_initialised_and_base_loaded(tmp_path):
    """A base BERT checkpoint under a classification model: the base loads, only the new head is initialised."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    path, _ = _save_pretrained(tmp_path, "tiny-bert", AutoModel)
    cfg = _cfg(tmp_path, f"model.path={path}", "model.random_init=false", "task=seq_cls",
               f"data.train={ASSETS / 'data' / 'tiny_cls_train.jsonl'}",
               f"data.eval={ASSETS / 'data' / 'tiny_cls_eval.jsonl'}")
    model, tok, info = _built(cfg)
    assert info["labels"] == ["files", "net", "text"]
    ref = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    # give the reference our freshly initialised head, then everything must agree
    ref.classifier.weight.data.copy_(model.classifier.weight.full_tensor())
    ref.classifier.bias.data.copy_(model.classifier.bias.full_tensor())
    assert model.classifier.weight.full_tensor().std() > 0  # really initialised, not left empty
    batch = tok(SAMPLE, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, rtol=1e-5, atol=1e-5)


def test_random_init_is_independent_of_wrapping(tmp_path):
    """Per-module seeding: the same seed gives the same weights whether the blocks are checkpointed and whether
    they stay gathered after forward; another seed gives other weights. World size 1 only: that the weights do not
    depend on how many ranks share them is shown by the 1-vs-2-rank tests of tests/test_distributed.py, which
    train configs/tiny.yaml from a random init: the step-1 loss depends on the initial weights alone, and another
    seed moves it by 5e-3 relative, half of one q_proj re-drawn by 2e-6, both beyond their FP32_RTOL of 1e-6."""
    a, _, _ = _built(_cfg(tmp_path, "train.seed=3"))
    b, _, _ = _built(_cfg(tmp_path, "train.seed=3", "activation_checkpointing=full", "fsdp.reshard_after_forward=false"))
    c, _, _ = _built(_cfg(tmp_path, "train.seed=4"))
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), n
        if p.dim() == 2:
            assert not torch.equal(p.full_tensor(), r.full_tensor()), n


def _forward_backward_flops(model, batch) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    # without early stop the recompute replays each checkpointed block whole (early stop skips its last matmul)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        with FlopCounterMode(display=False) as fwd:
            out = model(**batch, use_cache=False).logits
        with FlopCounterMode(display=False) as bwd:
            out.float().pow(2).mean().backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def test_activation_checkpointing_recomputes(tmp_path):
    """Backward FLOPs rise by exactly the blocks' forward FLOPs (all blocks for `full`, half for `selective:2`)."""
    batch = _tokenizer()(SAMPLE, return_tensors="pt", padding=True)
    flops = {mode: _forward_backward_flops(_built(_cfg(tmp_path, f"activation_checkpointing={mode}"))[0], batch)
             for mode in ("none", "full", "selective:2")}
    fwd_total, bwd_none = flops["none"]
    b, t = batch["input_ids"].shape
    head = 2 * b * t * 64 * 1024  # hidden x vocab matmul of the LM head, outside the blocks
    blocks_fwd = fwd_total - head
    assert flops["full"][1] - bwd_none == blocks_fwd
    assert flops["selective:2"][1] - bwd_none == blocks_fwd // 2
    assert flops["full"][0] == fwd_total  # the forward itself is unchanged


def _tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")


@pytest.mark.parametrize("model_type,extra", [
    ("gemma2", {"head_dim": 16}),
    ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 32,
                 "layer_types": ["sliding_attention", "full_attention"]}),
])
def test_model_without_sdpa_runs_eager_and_loads_as_transformers(tmp_path, capfd, model_type, extra):
    """Gemma-2 and gpt-oss have no sdpa attention in transformers, which refuses the default
    model.attn_implementation=sdpa with a ValueError (before: a traceback at start). They run eager, one line says
    so, and the logits equal transformers' own from_pretrained."""
    import json

    import transformers

    from conftest import save_pretrained_from_config

    base = json.loads((ASSETS / "tiny-llama" / "config.json").read_text())
    cfg = transformers.AutoConfig.for_model(model_type, num_hidden_layers=2, **extra, **{
        k: base[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                             "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id") if k in base})
    path = save_pretrained_from_config(tmp_path / model_type, cfg, seed=3)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model, tok, info = _built(_cfg(tmp_path, f"model.path={path}", "model.random_init=false"))
    assert "has no sdpa attention in transformers: it runs with eager attention" in capfd.readouterr().err
    assert info["weights_initialised"] == len([n for n, _ in model.named_buffers()])
    batch = tok(SAMPLE, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, use_cache=False).logits, ref(**batch).logits,
                                   rtol=1e-5, atol=1e-5)


def test_flex_attention_with_sinks_on_cpu_is_refused_before_loading(tmp_path):
    """transformers' flex attention runs gpt-oss's attention sinks on GPUs only: its own model raises at the first
    forward on a CPU. fsdp_ft refuses that config at build, before any weight loads, in one line naming the key
    (before: a traceback from every rank after loading)."""
    import transformers

    from conftest import cli, save_pretrained_from_config
    from test_errors import assert_user_error

    cfg = transformers.AutoConfig.for_model("gpt_oss", num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                            head_dim=16, hidden_size=64, intermediate_size=128,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                            layer_types=["sliding_attention", "full_attention"], sliding_window=32)
    path = save_pretrained_from_config(tmp_path / "gpt_oss", cfg, seed=3)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="Attention sinks cannot be run on CPU with flex attention"):
        ref(input_ids=torch.tensor([[1, 2, 3]]))
    proc = cli("train", str(TINY), f"output_dir={tmp_path / 'run'}", f"model.path={path}", "model.random_init=false",
               "model.attn_implementation=flex_attention", "train.max_steps=1", check=False)
    assert_user_error(proc, "config key 'model.attn_implementation'=flex_attention", "GptOssForCausalLM",
                      "attention sinks", "on CPU use sdpa")
    assert not (tmp_path / "run" / "checkpoints").exists()
