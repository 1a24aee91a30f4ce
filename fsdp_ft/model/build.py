"""Build the model and tokenizer on the meta device: the model folder (or hub id), its config and tokenizer, the
architecture with its task head and adapters, checked against the sequence length; no weights are read here
(`materialize` gives the sharded model storage)."""
from __future__ import annotations


import os
import sys
from pathlib import Path

import torch
from torch import nn

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.model import mxfp4_checkpoint, vocab
from fsdp_ft.runtime.precision import DTYPE


def resolve_model_dir(cfg: Config) -> Path:
    """A local folder for model.path, downloading config/tokenizer/safetensors when it is a hub id."""
    path = Path(cfg.model.path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"config key 'model.path': '{path}' is a file; give the folder that holds it "
                              "(and model.gguf_file for a GGUF file)")
        return path
    if os.path.isabs(cfg.model.path) or cfg.model.path.count("/") != 1:
        raise ConfigError(f"config key 'model.path': '{cfg.model.path}' does not exist (not a folder, not a hub id)")
    try:
        from huggingface_hub import snapshot_download
        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        if cfg.model.gguf_file:
            patterns.append(cfg.model.gguf_file)
        return Path(snapshot_download(cfg.model.path, revision=cfg.model.revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated
        raise ConfigError(f"config key 'model.path': could not fetch hub model '{cfg.model.path}': "
                          f"{str(e).splitlines()[0]}") from None


def load_tokenizer(cfg: Config, model_dir: Path):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.gguf_file:
        kwargs["gguf_file"] = cfg.model.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'model.path': no usable tokenizer in '{model_dir}': "
                          f"{str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_hf_config(cfg: Config, model_dir: Path, check_positions: bool = True):
    """The model's HF config; by default also checks train.seq_len against its positions (`check_seq_len`):
    what only reads or writes weights (export) passes check_positions=False."""
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.gguf_file:
        kwargs["gguf_file"] = cfg.model.gguf_file
    try:
        hf_config = AutoConfig.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'model.path': no usable config.json in '{model_dir}': "
                          f"{str(e).splitlines()[0]}") from None
    # a GGUF file's weights, and MXFP4 expert stacks (gpt-oss), are decoded on load; the model we build is a plain one
    if getattr(hf_config, "quantization_config", None) is not None and cfg.model.gguf_file:
        del hf_config.quantization_config
    mxfp4_checkpoint.drop_quantization_config(hf_config)
    if check_positions:  # every training path (both engines, plan) reads the config here, before any model
        check_seq_len(cfg, hf_config)
    return hf_config


# ---------------------------------------------------------------- sequence length vs. the model's positions

# Model types whose positions index a fixed table (learned absolute embeddings; roformer's sinusoid table), by the
# config.json key that sizes it: position >= that size is an index error at the first long batch.
POSITION_TABLE = {
    **dict.fromkeys(("bert", "distilbert", "electra", "albert", "ernie", "megatron-bert", "mobilebert", "squeezebert",
                     "layoutlm", "xlm", "roformer", "gpt_neo", "opt", "biogpt", "roberta", "xlm-roberta",
                     "xlm-roberta-xl", "camembert", "data2vec-text", "ibert", "longformer", "mpnet",
                     "roberta-prelayernorm", "esm"), "max_position_embeddings"),
    "gpt2": "n_positions", "gpt_bigcode": "n_positions",
}
# RoBERTa-style embeddings number positions from pad_token_id + 1 (roberta-base: 514 table rows, 512 tokens)
POSITIONS_AFTER_PADDING = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ibert",
                           "longformer", "mpnet", "roberta-prelayernorm", "esm"}
ROTARY_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_emb_base")


def position_limit(hf_config) -> tuple[int, str] | None:
    """(most tokens the model can take, the config.json key that says so), or None when nothing stops a longer
    sequence from running.

    The rule, from the HF config alone:
    - `position_embedding_type` "rotary" -> no limit; "absolute" / "relative_key(_query)" (BERT-style, older
      configs and remote code) -> a table of max_position_embeddings rows (relative distances index a table
      sized by it too);
    - a model type in POSITION_TABLE -> its table's size, less pad_token_id + 1 for RoBERTa-style numbering;
    - DeBERTa with position_biased_input -> max_position_embeddings (its relative attention alone has no limit);
    - anything else (rotary Llama/Qwen2/Mistral, ALiBi Bloom/MPT, T5's buckets, unknown types) -> None: rotary
      positions run past max_position_embeddings (see `check_seq_len`'s warning), the others have no table.
    """
    model_type = getattr(hf_config, "model_type", "")
    kind = getattr(hf_config, "position_embedding_type", None)
    if kind == "rotary":
        return None
    if kind in ("absolute", "relative_key", "relative_key_query"):
        key = "max_position_embeddings"
    elif model_type in POSITION_TABLE:
        key = POSITION_TABLE[model_type]
    elif model_type.startswith("deberta") and getattr(hf_config, "position_biased_input", False):
        key = "max_position_embeddings"
    else:
        return None
    size = getattr(hf_config, key, None)
    if not isinstance(size, int) or size <= 0:
        return None
    if model_type in POSITIONS_AFTER_PADDING and isinstance(getattr(hf_config, "pad_token_id", None), int):
        size -= hf_config.pad_token_id + 1
    return size, key


def check_seq_len(cfg: Config, hf_config, length: int | None = None, key: str = "train.seq_len") -> None:
    """Refuse a sequence length above the model's position table (a ConfigError before any model is built, not an
    index error at step 1); for rotary models past max_position_embeddings, only a warning on rank 0.

    `length` defaults to train.seq_len; prefix/prompt/p_tuning add their virtual tokens to every sequence."""
    from fsdp_ft.runtime import ranklog

    length = cfg.train.seq_len if length is None else length
    virtual = cfg.finetune.prompt.num_virtual_tokens if cfg.finetune.method in ("prefix", "prompt", "p_tuning") else 0
    limit = position_limit(hf_config)
    if limit is not None and length + virtual > limit[0]:
        extra = f" + {virtual} virtual tokens (finetune.prompt.num_virtual_tokens)" if virtual else ""
        size = getattr(hf_config, limit[1])
        after_pad = f", less pad_token_id + 1 = {size - limit[0]} (positions start after it)" if size > limit[0] else ""
        raise ConfigError(f"{key}={length}{extra} is more than the {limit[0]} positions model '{cfg.model.path}' "
                          f"has ({limit[1]}={size} in its config.json{after_pad}; a "
                          f"{hf_config.model_type} model looks positions up in a table of that size): set {key} to "
                          f"at most {limit[0] - virtual}")
    most = getattr(hf_config, "max_position_embeddings", None)
    rotary = any(getattr(hf_config, k, None) is not None for k in ROTARY_KEYS)
    if limit is None and rotary and isinstance(most, int) and length + virtual > most and ranklog.rank_from_env() == 0:
        print(f"[fsdp_ft] warning: {key}={length} is above max_position_embeddings={most} of model "
              f"'{cfg.model.path}': rotary positions run past it, but the model never saw sequences that long "
              "(quality may suffer)", file=sys.stderr, flush=True)


def build_meta_model(cfg: Config, hf_config, tokenizer, labels: list[str] | None = None) -> nn.Module:
    """The task's model class on the meta device (no memory), parameters in model.dtype."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if cfg.task in ("seq_cls", "reward"):  # a reward model is a classifier with one output
        if not labels:
            raise ConfigError("task 'seq_cls' needs labels: set model.num_labels or give labelled data")
        hf_config.num_labels = len(labels)
        hf_config.id2label = dict(enumerate(labels))
        hf_config.label2id = {name: i for i, name in enumerate(labels)}
        if getattr(hf_config, "pad_token_id", None) is None:
            hf_config.pad_token_id = tokenizer.pad_token_id
        auto = AutoModelForSequenceClassification
    else:
        vocab.grow_config(hf_config, tokenizer)  # ChatML tokens added to a template-less tokenizer need rows
        auto = AutoModelForCausalLM
    with torch.device("meta"):
        model = with_attention(cfg, lambda **kw: auto.from_config(
            hf_config, trust_remote_code=cfg.model.trust_remote_code, **kw))
    _cast_parameters(model, DTYPE[cfg.model.dtype])
    return model


_said_eager: set[str] = set()


def with_attention(cfg: Config, load):
    """`load(**kwargs)` with model.attn_implementation. The default, sdpa, falls back to eager for a model that
    transformers gives no sdpa path (Gemma-2, gpt-oss: their soft-capping / attention sinks), with one line
    saying so, rather than a traceback on the first hour with a new model; any other refusal stands."""
    impl = cfg.model.attn_implementation
    if not impl:
        return load()
    try:
        return load(attn_implementation=impl)
    except ValueError as e:
        if impl != "sdpa" or "scaled_dot_product_attention" not in str(e):
            raise
        name = str(e).split()[0]
    if name not in _said_eager and int(os.environ.get("RANK", "0")) == 0:
        _said_eager.add(name)
        print(f"[fsdp_ft] {name} has no sdpa attention in transformers: it runs with eager attention "
              "(model.attn_implementation=eager says so and hides this line)", file=sys.stderr, flush=True)
    return load(attn_implementation="eager")


def refuse_sinks_under_cpu_flex(model: nn.Module, device: torch.device) -> None:
    """transformers' flex attention runs attention sinks (gpt-oss) on GPUs only and raises at the first forward on
    a CPU, after the weights have loaded: refused before, in one line."""
    if device.type != "cpu" or getattr(model.config, "_attn_implementation", None) != "flex_attention":
        return
    if any(name.rpartition(".")[2] == "sinks" for name, _ in model.named_parameters()):
        raise ConfigError(f"config key 'model.attn_implementation'=flex_attention: {type(model).__name__} has "
                          "attention sinks, which transformers' flex attention runs on GPUs only; on CPU use sdpa "
                          "(the default: it runs this model with eager attention) or eager")


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters only (buffers such as rotary frequencies keep their own dtype); ties survive."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_floating_point():
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of the full (unsharded) model."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
