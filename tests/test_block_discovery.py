"""Block discovery (fsdp_ft/parallel/fsdp.py find_blocks) beyond `_no_split_modules`: a model that does not list its
blocks gets the longest ModuleList whose items share one class; model.block_classes overrides discovery, and
what is found is what FSDP shards (checked on a real 1-process run)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ASSETS, FAST, TINY
from fsdp_ft.errors import ConfigError
from fsdp_ft.parallel import fsdp


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))  # a short list inside each block


class Toy(nn.Module):
    """No `_no_split_modules`. Decoys around the 5 blocks: a shorter uniform list registered first, a longer list
    of mixed classes, and the short lists inside the blocks (the last lists registered)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.mixed = nn.ModuleList([nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8),
                                    nn.GELU(), nn.Linear(8, 8)])
        self.layers = nn.ModuleList(Block() for _ in range(5))
        self.norm = nn.LayerNorm(8)


def _same(got: list[nn.Module], want) -> bool:
    return len(got) == len(list(want)) and all(a is b for a, b in zip(got, want))


def test_fallback_is_the_longest_single_class_module_list():
    model = Toy()
    assert not hasattr(model, "_no_split_modules")
    assert _same(fsdp.find_blocks(model), model.layers)


def test_a_listed_class_wins_over_the_longest_list():
    """The fallback is only a fallback: a class the model lists in _no_split_modules is taken when it sits in a
    ModuleList, even a shorter one."""
    model = Toy()
    model._no_split_modules = ["Linear"]
    assert _same(fsdp.find_blocks(model), [*model.heads, *[m for m in model.mixed if type(m) is nn.Linear],
                                               *[e for b in model.layers for e in b.experts]])


def test_no_repeated_module_list_asks_for_block_classes():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4), nn.ReLU()]))
    with pytest.raises(ConfigError, match="model.block_classes"):
        fsdp.find_blocks(model)


def _hf_model(folder: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(ASSETS / folder)
    auto = AutoModelForSequenceClassification if folder == "tiny-bert" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


@pytest.mark.parametrize("folder,layers", [("tiny-llama", "model.layers"), ("tiny-gpt2", "transformer.h"),
                                           ("tiny-bert", "bert.encoder.layer")])
def test_hf_models_without_no_split_modules_fall_back_to_their_layers(folder, layers):
    """With `_no_split_modules` cleared on the instance, the fallback finds exactly the layers the listed classes
    give (the model's own decoder / encoder layer list, in order)."""
    model = _hf_model(folder)
    want = model.get_submodule(layers)
    assert _same(fsdp.find_blocks(model), want)  # through _no_split_modules
    model._no_split_modules = None
    assert _same(fsdp.find_blocks(model), want)


def test_block_classes_override_picks_exactly_those_modules():
    model = _hf_model("tiny-llama")
    assert _same(fsdp.find_blocks(model, ["LlamaMLP"]), [layer.mlp for layer in model.model.layers])
    assert _same(fsdp.find_blocks(model, ["LlamaMLP", "LlamaAttention"]),
                 [m for layer in model.model.layers for m in (layer.self_attn, layer.mlp)])
    with pytest.raises(ConfigError, match="model.block_classes.*NoSuchBlock"):
        fsdp.find_blocks(model, ["NoSuchBlock"])


def _sharded(model) -> list[str]:
    from torch.distributed.fsdp import FSDPModule

    return [name for name, m in model.named_modules() if isinstance(m, FSDPModule) and name]


@pytest.mark.parametrize("how", ["fallback", "block_classes"])
def test_found_blocks_are_what_a_run_shards(tmp_path, monkeypatch, how):
    """A 1-step run: the fallback (LlamaForCausalLM without _no_split_modules) shards each decoder layer, and
    model.block_classes=[LlamaMLP] shards each MLP instead (the setup row says so as well)."""
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

    from fsdp_ft.api import train
    from fsdp_ft.config import load_config
    from fsdp_ft.observability.metrics import read_metrics

    if how == "fallback":
        # the class that lists the blocks (post_init also collects the list from the children, so the model's
        # own class attribute is not enough)
        monkeypatch.setattr(LlamaPreTrainedModel, "_no_split_modules", None)
        overrides, want, cls = [], [f"model.layers.{i}" for i in range(4)], "LlamaDecoderLayer"
    else:
        overrides, want, cls = ["model.block_classes=[LlamaMLP]"], [f"model.layers.{i}.mlp" for i in range(4)], \
            "LlamaMLP"
    result = train(load_config(TINY, [f"output_dir={tmp_path}", *FAST, "train.max_steps=1", "data.eval=null",
                                      *overrides]))
    if how == "fallback":
        assert not result.model._no_split_modules  # no list to find the blocks by: the fallback found them
    assert _sharded(result.model) == want
    setup = next(r for r in read_metrics(tmp_path) if r.get("split") == "setup")
    assert (setup["blocks"], setup["block_class"]) == (4, cls)
