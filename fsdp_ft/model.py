"""Load or build the model and tokenizer without ever materialising the full model on every rank.

The model is built on the meta device, sharded by `parallel.parallelize`, and only then given storage by
`materialize`: each rank reads just its own rows of each weight from memory-mapped safetensors (or initialises
them, for random init and for new heads), so host RAM per rank is about the model size / N.
"""
from __future__ import annotations

import copy
import os
import sys
import zlib
from pathlib import Path

import torch
from torch import nn

from fsdp_ft import adapters, host_malloc, parallel, placement, quantize, vocab
from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.weights_io import SafetensorsReader

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    # a GGUF file's weights are dequantized on load; the model we build is a plain one
    if getattr(hf_config, "quantization_config", None) is not None and cfg.model.gguf_file:
        del hf_config.quantization_config
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
    from fsdp_ft import ranklog

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
    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    with torch.device("meta"):
        model = auto.from_config(hf_config, **kwargs)
    _cast_parameters(model, DTYPE[cfg.model.dtype])
    return model


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


# ---------------------------------------------------------------- weight sources

class DictSource:
    """Full tensors already in memory (GGUF files, which transformers dequantizes whole)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, name):
        return name in self.tensors

    def read_rows(self, name, start, stop):
        t = self.tensors[name]
        return t if t.dim() == 0 else t[start:stop]

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def close(self):
        self.tensors = {}


def open_weight_source(cfg: Config, model_dir: Path, model: nn.Module):
    """Where pretrained weights come from; None for random init. Rows of a grown vocabulary read as the mean row."""
    if cfg.model.random_init:
        return None
    if cfg.model.gguf_file:
        return _with_grown_vocab(_gguf_source(cfg, model_dir, model), model)
    try:
        return _with_grown_vocab(SafetensorsReader(model_dir), model)
    except FileNotFoundError:
        raise ConfigError(f"config key 'model.path': '{model_dir}' holds no *.safetensors weights; "
                          "set model.random_init=true to train from scratch, or model.gguf_file") from None


def _with_grown_vocab(source, model: nn.Module):
    hf_model = adapters.base_model(model)
    prefix = getattr(hf_model, "base_model_prefix", "")
    return vocab.wrap_grown(source, model, hf_model.config.vocab_size,
                            lambda name: _source_key(source, adapters.checkpoint_name(name), prefix))


def _gguf_source(cfg: Config, model_dir: Path, model: nn.Module) -> DictSource:
    from transformers import AutoModelForCausalLM

    if not (model_dir / cfg.model.gguf_file).is_file():
        raise ConfigError(f"config key 'model.gguf_file': '{model_dir / cfg.model.gguf_file}' does not exist")
    full = AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=cfg.model.gguf_file,
                                                dtype=torch.float32)
    return DictSource({k: v.detach() for k, v in full.state_dict().items()})


def _source_key(source, name: str, base_prefix: str) -> str | None:
    """The checkpoint's key for a model tensor: exact, or with the base-model prefix added or stripped."""
    if name in source:
        return name
    if base_prefix:
        if name.startswith(base_prefix + ".") and name[len(base_prefix) + 1:] in source:
            return name[len(base_prefix) + 1:]
        if f"{base_prefix}.{name}" in source:
            return f"{base_prefix}.{name}"
    return None


# ---------------------------------------------------------------- materialisation

def _copy_rows(dst: torch.Tensor, full_or_rows: torch.Tensor) -> None:
    local, _, _ = parallel.local_shard(dst)
    with torch.no_grad():
        local.copy_(full_or_rows.reshape(local.shape).to(local.dtype))


def _rows(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return t if t.dim() == 0 else t[start:stop]


def _init_module_full(hf_model: nn.Module, module: nn.Module, name: str, seed: int) -> dict[str, torch.Tensor]:
    """Initialise a full-size CPU stand-in of one module, seeded by its name, and return its tensors.

    The model's own `_init_weights` covers model modules, peft's rules cover adapters. Seeding per module makes
    random init identical whatever the world size or sharding.
    """
    shadow = copy.copy(module)
    shadow._parameters = {k: (None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype)))
                          for k, p in module._parameters.items()}
    shadow._buffers = {k: (None if b is None else torch.empty(b.shape, dtype=b.dtype))
                       for k, b in module._buffers.items()}
    shadow._modules = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(adapters.checkpoint_name(name).encode())) % (2**63))
        for t in list(shadow._parameters.values()) + list(shadow._buffers.values()):
            if t is not None and t.is_floating_point():
                nn.init.normal_(t.data, std=0.02)  # fallback for tensors the init rules do not cover
        if adapters.is_adapter(name):
            adapters.init_adapter(name, shadow)
        else:
            hf_model._init_weights(shadow)
    full = {k: p.detach() for k, p in shadow._parameters.items() if p is not None}
    full.update({k: b for k, b in shadow._buffers.items() if b is not None})
    return full


def materialize(model: nn.Module, source, seed: int, device: torch.device, offload: bool = False) -> dict:
    """Give every meta tensor real storage on the rank's `device`: checkpoint rows where the checkpoint has them,
    else init. Quantized weights are quantized on `device` (seconds on a GPU, minutes per 8B base on a CPU thread).

    `offload` (fsdp.cpu_offload): FSDP's shards go to the CPU, as its CPUOffloadPolicy requires, but buffers and
    the parameters FSDP ignores still go to `device`: FSDP never moves them and the forward reads them there
    (`placement.home`). Works on sharded (DTensor) and plain models alike. Returns the count of loaded tensors and
    the names of initialised ones (new heads, adapters, random init) for the log.
    """
    from torch.distributed.tensor import DTensor

    tied = _tied_groups(model)
    # to_empty with a device per tensor: each allocated once, where it stays
    model._apply(lambda t: torch.empty_like(t, device=placement.home(t, device, offload)))
    for (module, name), *others in tied:  # to_empty gives each holder of a plain tied weight its own tensor
        for other, other_name in others:  # (FSDP's own parameters stay shared: they are left alone)
            if not isinstance(other._parameters[other_name], DTensor):
                other._parameters[other_name] = module._parameters[name]
    result = fill_tensors(model, model.named_modules(), source, seed, compute_device=device)
    if source is not None:
        source.close()
    _init_dora_magnitudes(model)
    return result


def _tied_groups(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """(module, name) holders of each parameter held more than once (tied embeddings)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, name))
    return [h for h in holders.values() if len(h) > 1]


RELEASE_EVERY_BYTES = 64 << 20


def fill_tensors(model: nn.Module, named_modules, source, seed: int, seen: set[int] | None = None,
                 compute_device: torch.device | None = None) -> dict:
    """Fill the allocated tensors of `named_modules` (pairs from model.named_modules()): checkpoint rows or init.

    `seen` (ids of tensors already filled) lets a caller fill the model a group of modules at a time
    (engine deepspeed partitions each block as soon as it is filled); a tied tensor is filled once.
    `compute_device`: where quantized weights are quantized (default: where each one is stored); the result is
    stored where its placeholder is, bit-identical whichever device quantized it (`quantize.quantize_weight`).
    """
    hf_model = adapters.base_model(model)
    base_prefix = getattr(hf_model, "base_model_prefix", "")
    seen = set() if seen is None else seen
    loaded, initialised = [], []
    passed = 0  # bytes read through host memory since its free pages were last handed back
    for mname, module in named_modules:
        tensors = {k: t for k, t in list(module._parameters.items()) + list(module._buffers.items())
                   if t is not None and id(t) not in seen}
        if not tensors:
            continue
        seen.update(id(t) for t in tensors.values())
        ckpt_module = adapters.checkpoint_name(mname)
        keys = {k: (_source_key(source, f"{ckpt_module}.{k}".lstrip("."), base_prefix)
                    if source is not None and not adapters.is_adapter(mname) else None) for k in tensors}
        tokens = adapters.trainable_token_rows(model, mname)
        if tokens is not None:  # peft trainable tokens start as the rows they replace
            full = dict.fromkeys(tensors, _base_rows(model, hf_model, source, base_prefix, seed, *tokens))
        else:
            full = _init_module_full(hf_model, module, mname, seed) if None in keys.values() else {}
        for k, t in tensors.items():
            local, start, stop = parallel.local_shard(t)
            if quantize.is_quantized(t):  # quantize the whole weight, keep this rank's rows: same as 1 process
                whole = source.read_rows(keys[k], 0, t.shape[0]) if keys[k] is not None else full[k]
                quantized = quantize.quantize_like(whole, like=local, module=module,
                                                   device=compute_device or local.device)
                parallel.assign_nf4_shard(model, module, f"{mname}.{k}", k, t, quantized)
                passed += whole.nbytes
            elif keys[k] is not None:
                _copy_rows(t, source.read_rows(keys[k], start, stop))
                passed += local.nbytes
            else:
                _copy_rows(t, _rows(full[k], start, stop))
            (loaded if keys[k] is not None else initialised).append(f"{mname}.{k}")
            if passed >= RELEASE_EVERY_BYTES:  # hand the holes the temporaries left back (host_malloc)
                host_malloc.release_free()
                passed = 0
    host_malloc.release_free()
    return {"loaded": len(loaded), "initialised": initialised}


def _base_rows(model, hf_model, source, base_prefix: str, seed: int, base_name: str, ids: list[int]) -> torch.Tensor:
    """Rows `ids` of a base layer's weight as materialize gives them: from the checkpoint (the mean row where the
    vocabulary grew), or the layer's own seeded init."""
    key = (_source_key(source, f"{adapters.checkpoint_name(base_name)}.weight", base_prefix)
           if source is not None else None)
    if key is not None:
        return torch.cat([source.read_rows(key, i, i + 1) for i in ids])
    return _init_module_full(hf_model, model.get_submodule(base_name), base_name, seed)["weight"][ids]


def dense_weight(t: torch.Tensor) -> torch.Tensor:
    """A weight as a plain float tensor (dequantizing a quantized one)."""
    return quantize.dequantize(t) if quantize.is_quantized(t) else t


@torch.no_grad()
def _init_dora_magnitudes(model: nn.Module) -> None:
    """DoRA starts with magnitude = row norm of the base weight. The magnitude's shard holds rows start..stop;
    the base holds the same rows when sharded alike, or all of them when kept whole (fsdp.shard_frozen)."""
    for magnitude, base in adapters.dora_magnitude_pairs(model):
        mag_local, start, stop = parallel.local_shard(magnitude)
        weight_local, w_start, _ = parallel.local_shard(base.weight)
        rows = dense_weight(weight_local)[start - w_start:stop - w_start]
        mag_local.copy_(torch.linalg.norm(rows.float(), dim=1).to(mag_local.dtype))


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of the full (unsharded) model."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
