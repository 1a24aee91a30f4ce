"""finetune.method=partial freezes exactly what its options say, on the meta model every rank builds.

Each case builds the model as training does (engine.build_meta) and compares the names that require gradients
with a set written out here from the architecture: the parameter names of the same model built by transformers
alone, selected by hand-written prefixes and names (no fsdp_ft helper on the expected side). Runs in this
process on the meta device, without a process group.
"""
from __future__ import annotations

import pytest
import torch

from conftest import ASSETS, TINY
from fsdp_ft.config import load_config
from fsdp_ft.errors import ConfigError
from fsdp_ft.model.build import load_tokenizer, resolve_model_dir
from fsdp_ft.runtime import distributed
from fsdp_ft.training.run_setup import build_meta

LABELS = ["a", "b", "c"]
BLOCKS = range(4)  # every tiny asset has 4 blocks
LLAMA_MLP = {f"model.layers.{i}.mlp.{p}_proj.weight" for i in BLOCKS for p in ("gate", "up", "down")}


def built(folder: str, task: str, *overrides: str) -> tuple[set[str], set[str]]:
    """(trainable names, all names) of fsdp_ft's meta model."""
    cfg = load_config(TINY, ["output_dir=/tmp/unused", f"model.path={ASSETS / folder}", f"task={task}", *overrides])
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="fake")
    model_dir = resolve_model_dir(cfg)
    model, _ = build_meta(cfg, env, model_dir, load_tokenizer(cfg, model_dir), LABELS if task == "seq_cls" else None)
    return {n for n, p in model.named_parameters() if p.requires_grad}, {n for n, _ in model.named_parameters()}


def hf_names(folder: str, task: str) -> set[str]:
    """Parameter names of transformers' own model for the asset (a tied head shares, and so drops, its name)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(ASSETS / folder)
    with torch.device("meta"):
        if task == "seq_cls":
            config.num_labels = len(LABELS)
            return {n for n, _ in AutoModelForSequenceClassification.from_config(config).named_parameters()}
        return {n for n, _ in AutoModelForCausalLM.from_config(config).named_parameters()}


def under(names: set[str], *prefixes: str) -> set[str]:
    return {n for n in names if n.startswith(prefixes)}


def block(names: set[str], prefix: str, *indices: int) -> set[str]:
    """Every parameter of the blocks `prefix<i>.` (e.g. model.layers.0.)."""
    return under(names, *(f"{prefix}{i}." for i in indices))


PARTIAL = ["finetune.method=partial"]
# (asset, task, overrides, expected trainable names as a function of all names)
CASES = {
    "llama-full": ("tiny-llama", "causal_lm", [], lambda a: a),
    "llama-freeze-embeddings": ("tiny-llama", "causal_lm", ["finetune.freeze_embeddings=true"],
                                lambda a: a - {"model.embed_tokens.weight"}),
    "llama-freeze-2-blocks": ("tiny-llama", "causal_lm", ["finetune.freeze_first_n_blocks=2"],
                              lambda a: a - block(a, "model.layers.", 0, 1)),
    "llama-freeze-all-blocks": ("tiny-llama", "causal_lm", ["finetune.freeze_first_n_blocks=4"],
                                lambda a: {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}),
    "llama-head-only": ("tiny-llama", "causal_lm", ["finetune.head_only=true"], lambda a: {"lm_head.weight"}),
    "llama-trainable-regex": ("tiny-llama", "causal_lm",
                              ["finetune.trainable_regex=[self_attn\\.q_proj, ^model\\.norm\\.]"],
                              lambda a: {f"model.layers.{i}.self_attn.q_proj.weight" for i in BLOCKS}
                              | {"model.norm.weight"}),
    "llama-frozen-regex": ("tiny-llama", "causal_lm", ["finetune.frozen_regex=[mlp\\.]"], lambda a: a - LLAMA_MLP),
    # tests/test_distributed.py's PARTIAL (its 2-rank run checks the count of these by hand)
    "llama-embeddings-block0-up": ("tiny-llama", "causal_lm",
                                   ["finetune.freeze_embeddings=true", "finetune.freeze_first_n_blocks=1",
                                    "finetune.frozen_regex=[mlp\\.up_proj]"],
                                   lambda a: a - {"model.embed_tokens.weight"} - block(a, "model.layers.", 0)
                                   - {f"model.layers.{i}.mlp.up_proj.weight" for i in (1, 2, 3)}),
    "llama-trainable-and-frozen-regex": ("tiny-llama", "causal_lm",
                                         ["finetune.trainable_regex=['layers\\.[23]\\.']",
                                          "finetune.frozen_regex=[mlp]"],
                                         lambda a: block(a, "model.layers.", 2, 3) - LLAMA_MLP),
    "llama-trainable-regex-minus-blocks": ("tiny-llama", "causal_lm",
                                           ["finetune.trainable_regex=[input_layernorm]",
                                            "finetune.freeze_first_n_blocks=3"],
                                           lambda a: {"model.layers.3.input_layernorm.weight"}),
    "llama-head-only-frozen-embeddings": ("tiny-llama", "causal_lm",
                                          ["finetune.head_only=true", "finetune.freeze_embeddings=true"],
                                          lambda a: {"lm_head.weight"}),
    # tied: the head is the embedding matrix, so it trains alone under head_only and freezes with the embeddings
    "llama-tied-head-only": ("tiny-llama-tied", "causal_lm", ["finetune.head_only=true"],
                             lambda a: {"model.embed_tokens.weight"}),
    "llama-tied-freeze-embeddings": ("tiny-llama-tied", "causal_lm", ["finetune.freeze_embeddings=true"],
                                     lambda a: a - {"model.embed_tokens.weight"}),
    # GPT-2: token and position embeddings
    "gpt2-freeze-embeddings": ("tiny-gpt2", "causal_lm", ["finetune.freeze_embeddings=true"],
                               lambda a: a - {"transformer.wte.weight", "transformer.wpe.weight"}),
    "gpt2-freeze-1-block": ("tiny-gpt2", "causal_lm", ["finetune.freeze_first_n_blocks=1"],
                            lambda a: a - block(a, "transformer.h.", 0)),
    # classifiers: the head is what sits outside the base model (BERT's pooler is inside it)
    "bert-head-only": ("tiny-bert", "seq_cls", ["finetune.head_only=true"],
                       lambda a: {"classifier.weight", "classifier.bias"}),
    # word, position and token-type embeddings freeze; the embeddings' LayerNorm is not an embedding and trains
    "bert-freeze-embeddings-and-2-blocks": ("tiny-bert", "seq_cls",
                                            ["finetune.freeze_embeddings=true", "finetune.freeze_first_n_blocks=2"],
                                            lambda a: a - {f"bert.embeddings.{e}_embeddings.weight"
                                                           for e in ("word", "position", "token_type")}
                                            - block(a, "bert.encoder.layer.", 0, 1)),
    "llama-classifier-head-only": ("tiny-llama", "seq_cls", ["finetune.head_only=true"], lambda a: {"score.weight"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_partial_trains_exactly_the_named_parameters(case):
    folder, task, overrides, expected = CASES[case]
    method = PARTIAL if overrides else []
    trainable, names = built(folder, task, *method, *overrides)
    assert names == hf_names(folder, task)  # the same model as transformers builds
    want = expected(names)
    assert want and want <= names
    assert trainable == want, {"should train": sorted(want - trainable), "should be frozen": sorted(trainable - want)}


@pytest.mark.parametrize("overrides,message", [
    (["finetune.freeze_first_n_blocks=5"], "'finetune.freeze_first_n_blocks'=5 exceeds the model's 4 blocks"),
    (["finetune.head_only=true", "finetune.trainable_regex=[layers]"], "leave no parameter to train"),
    (["finetune.frozen_regex=[.]"], "leave no parameter to train"),
])
def test_partial_settings_that_leave_nothing_or_too_much_fail(overrides, message):
    with pytest.raises(ConfigError, match=message):
        built("tiny-llama", "causal_lm", *PARTIAL, *overrides)


def test_partial_options_need_method_partial():
    with pytest.raises(ConfigError, match="partial options are set"):
        built("tiny-llama", "causal_lm", "finetune.freeze_embeddings=true")
