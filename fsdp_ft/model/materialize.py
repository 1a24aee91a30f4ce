"""Give a sharded meta model its storage without ever materialising the whole model on a rank.

The model is built on the meta device (`build`), sharded by `parallel.fsdp.parallelize`, and only then filled
here: each rank reads just its own rows of each weight from memory-mapped safetensors (or initialises them, for
random init and for new heads), so host RAM per rank is about the model size / N. Quantized weights are stored
as this rank's chunk of the 4-bit / int8 tensor.
"""
from __future__ import annotations


import copy
import zlib
from pathlib import Path

import torch
from torch import nn

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError
from fsdp_ft.model import adapters, checkpoint_layout, mxfp4_checkpoint, placement, vocab
from fsdp_ft.quant import experts, quantize
from fsdp_ft.runtime import host_malloc
from fsdp_ft.storage.weights_io import SafetensorsReader
from fsdp_ft.storage.weights_io import local_rows


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
        plain = mxfp4_checkpoint.view(SafetensorsReader(model_dir))  # gpt-oss's MXFP4 stacks decoded
        source = _with_grown_vocab(_in_model_layout(plain, model), model)
    except FileNotFoundError:
        raise ConfigError(f"config key 'model.path': '{model_dir}' holds no *.safetensors weights; "
                          "set model.random_init=true to train from scratch, or model.gguf_file") from None
    _require_base_weights(source, model, model_dir)
    return source


def _require_base_weights(source, model: nn.Module, model_dir: Path) -> None:
    """Every parameter of the pretrained base must come from the checkpoint. New heads outside it (a classifier,
    an untied LM head) and adapters start from init, and the run names them; a base weight the checkpoint lacks
    means it does not fit this model (another architecture, a layout transformers converts and we did not), and
    training on with that weight random would end with exit 0 and the wrong model."""
    hf_model = adapters.base_model(model)
    prefix = getattr(hf_model, "base_model_prefix", "")
    body = getattr(hf_model, prefix, None) if prefix else None
    if not isinstance(body, nn.Module):
        return  # the model is its own base (a bare AutoModel): nothing is a head
    inside = {id(p) for p in body.parameters()}
    found: dict[int, bool] = {}  # a tied weight counts as found under any of its names
    first_name: dict[int, str] = {}
    for mname, name, p in _base_tensors(model, buffers=False):
        if id(p) not in inside or adapters.trainable_token_rows(model, mname) is not None:
            continue  # peft's trainable-token rows start as the base rows they replace
        first_name.setdefault(id(p), name)
        found[id(p)] = found.get(id(p), False) or _source_key(source, name, prefix) is not None
    missing = [first_name[i] for i, ok in found.items() if not ok]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        source.close()
        kind = type(hf_model).__name__.removeprefix("FSDP")  # FSDP2 subclasses the model it wraps
        raise ConfigError(f"config key 'model.path': the checkpoint in '{model_dir}' has no {missing[0]}{more} of "
                          f"this {kind}: it does not match model.path's config.json")


def _in_model_layout(source, model: nn.Module):
    """The checkpoint as the model names and shapes its tensors (MoE experts fused: `checkpoint_layout`)."""
    shapes = {name: tuple(experts.logical_shape(model.get_submodule(mname), name.rpartition(".")[2], t))
              for mname, name, t in _base_tensors(model, buffers=True)}
    return checkpoint_layout.model_view(source, adapters.base_model(model), shapes)


def _base_tensors(model: nn.Module, buffers: bool):
    """(module name, the tensor's name in the base checkpoint, tensor) of every tensor outside the adapters."""
    for mname, module in model.named_modules():
        if adapters.is_adapter(mname):
            continue
        tensors = [*module._parameters.items(), *(module._buffers.items() if buffers else ())]
        for k, t in tensors:
            if t is not None:
                yield mname, adapters.checkpoint_name(f"{mname}.{k}".lstrip(".")), t


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
    local, _, _ = local_shard(dst)
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
    _init_sharded_dora_magnitudes(model)
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
            local, start, stop = local_shard(t)
            if quantize.is_quantized(t):  # quantize the whole weight, keep this rank's rows: same as 1 process
                rows = experts.logical_shape(module, k, t)[0]  # (an expert stack is read whole, as its rows)
                whole = (source.read_rows(keys[k], 0, rows) if keys[k] is not None else full[k]).reshape(t.shape)
                quantized = quantize.quantize_like(whole, like=local, module=module,
                                                   device=compute_device or local.device)
                assign_nf4_shard(model, module, f"{mname}.{k}", k, t, quantized)
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
def _init_sharded_dora_magnitudes(model: nn.Module) -> None:
    """DoRA starts with magnitude = row norm of the base weight. The magnitude's shard holds rows start..stop;
    the base holds the same rows when sharded alike, or all of them when kept whole (fsdp.shard_frozen)."""
    for magnitude, base in adapters.dora_magnitude_pairs(model):
        mag_local, start, stop = local_shard(magnitude)
        weight_local, w_start, _ = local_shard(base.weight)
        rows = dense_weight(weight_local)[start - w_start:stop - w_start]
        mag_local.copy_(torch.linalg.norm(rows.float(), dim=1).to(mag_local.dtype))


# ---------------------------------------------------------------- this rank's part of a sharded tensor

def local_shard(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """This rank's storage of a (possibly sharded) tensor and the dim-0 rows of the full tensor it holds."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        start, stop = local_rows(t) if t.dim() else (0, 0)
        return t.to_local(), start, stop
    return t, 0, (t.shape[0] if t.dim() else 0)


@torch.no_grad()
def assign_nf4_shard(model: nn.Module, module: nn.Module, fqn: str, name: str, t: torch.Tensor, quantized) -> None:
    """Store a quantized weight where its placeholder `t` was allocated: the whole tensor when unsharded, else this
    rank's chunk as FSDP's new shard (on the CPU under fsdp.cpu_offload).

    A sharded NF4 weight is swapped in with `load_state_dict(assign=True)`, the route FSDP2 offers for
    replacing a shard (it re-registers the parameter); copying into the placeholder would keep its meta parts
    (torchao's empty_like allocates only the sharded inner tensors). The DTensor is built on the placeholder's
    spec, not with `DTensor.from_local`, which moves a local tensor to the mesh's device type: a CPU shard would
    become a CUDA one, and FSDP2's lazy init refuses that under CPU offload.
    """
    from torch.distributed.tensor import DTensor, Shard

    local = t._local_tensor if isinstance(t, DTensor) else t
    if not isinstance(t, DTensor):
        module._parameters[name] = nn.Parameter(quantized.to(local.device), requires_grad=False)
        return
    (dim,) = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    chunk = torch.chunk(quantized, t.device_mesh.size(dim), dim=0)[t.device_mesh.get_local_rank(dim)]
    shard = DTensor(_own_copy(chunk).to(local.device), t._spec, requires_grad=False)
    model.load_state_dict({fqn: nn.Parameter(shard, requires_grad=False)}, strict=False, assign=True)


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    """A quantized tensor whose inner tensors have storage of their own: a row chunk's are views of the whole
    weight's, which would keep the whole base alive on every rank. Copied inner tensor by inner tensor, because
    torchao's NF4 `clone` requantizes (and would turn an FP4 table into NF4)."""
    names, ctx = t.__tensor_flatten__()
    return type(t).__tensor_unflatten__({n: getattr(t, n).clone() for n in names}, ctx, t.shape, t.stride())
