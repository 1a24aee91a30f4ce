"""Where `fsdp-ft eval / generate / predict` put a model's weights: one device when it fits, else spread.

A model larger than one GPU is loaded with accelerate's big-model loading (transformers' `device_map`): filled
in order over GPU 0, 1, ..., then the CPU, then a disk folder, each up to its free memory or the `--max-memory`
cap; accelerate's hooks move each block's weights and inputs to where it runs. Fill in order ("sequential"), not
balanced: a model that fits GPU 0 stays whole on GPU 0, which is the plain load. On a machine without a GPU and
without a cap nothing changes: the plain load on the CPU.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fsdp_ft.errors import ConfigError

MAX_MEMORY_FORM = "DEVICE=SIZE[,DEVICE=SIZE...] with DEVICE cpu or a GPU index (0, cuda:1) and SIZE like 20GiB, " \
                  "500MB or bytes"


@dataclass
class Placement:
    """The command's --max-memory caps (device -> bytes; GPUs as indices) and --offload-folder (where the
    temporary folder of disk-offloaded weights goes; default the system's temporary folder)."""
    max_memory: dict[int | str, int] = field(default_factory=dict)
    offload_folder: str | None = None


def parse_max_memory(text: str | None) -> dict[int | str, int]:
    """`0=20GiB,cpu=60GiB` -> {0: bytes, "cpu": bytes}; a bad value is a one-line ConfigError naming it."""
    from accelerate.utils import convert_file_size_to_int

    def bad(why: str) -> ConfigError:
        return ConfigError(f"--max-memory '{text}': {why} (expected {MAX_MEMORY_FORM})")

    caps: dict[int | str, int] = {}
    if text is None:
        return caps
    for item in text.split(","):
        name, eq, size = (s.strip() for s in item.partition("="))
        device = int(name.removeprefix("cuda:")) if re.fullmatch(r"(cuda:)?\d+", name) else name.lower()
        if not eq or not name or not size:
            raise bad(f"'{item}' is not DEVICE=SIZE")
        if device in caps:
            raise bad(f"device '{name}' given twice")
        if isinstance(device, int) and device >= torch.cuda.device_count():
            raise bad(f"there is no GPU {device} ({torch.cuda.device_count()} visible)")
        if device != "cpu" and not isinstance(device, int):
            raise bad(f"unknown device '{name}'")
        try:
            caps[device] = int(size) if size.isdigit() else convert_file_size_to_int(size)
        except (ValueError, OverflowError):
            raise bad(f"'{size}' is not a size") from None
    return caps


def load_kwargs(placement: Placement) -> tuple[dict, object]:
    """from_pretrained's device_map / max_memory / offload_folder for this machine and caps (nothing for the plain
    CPU load), and the temporary offload folder to keep alive with the model (or None)."""
    if not torch.cuda.is_available() and not placement.max_memory:
        return {}, None
    from accelerate.utils import get_max_memory

    max_memory = {**get_max_memory(), **placement.max_memory}  # devices without a cap: their free memory
    parent = placement.offload_folder
    if parent is not None:
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise ConfigError(f"--offload-folder '{parent}' is a file; give a folder")
        os.makedirs(parent, exist_ok=True)
    # a fresh folder each time: accelerate would take an earlier model's offloaded weights left in one for its own
    tmp = tempfile.TemporaryDirectory(prefix="fsdp-ft-offload-", dir=parent)
    return {"device_map": "sequential", "max_memory": max_memory, "offload_folder": os.path.abspath(tmp.name)}, tmp


def add_adapter(model: torch.nn.Module, folder: Path, placed: dict) -> torch.nn.Module:
    """PeftModel.from_pretrained on a base, given the base's placement so peft re-dispatches a spread base with
    the same caps (else it fills memory its own way).

    For blocks on disk, peft (0.21) rewrites their safetensors with the adapter's keys at the checkpoint's path
    with its leading '/' dropped, i.e. relative to the working directory (run from '/', over the checkpoint
    itself), and reads them back through that relative path. So it runs inside the offload folder here, and the
    offload index then gets those files' absolute paths."""
    from peft import PeftConfig, PeftModel

    if not is_spread(model):
        return PeftModel.from_pretrained(model, str(folder))
    offloaded = {"cpu", "disk"} & set(device_map(model)[1].values())
    if offloaded and PeftConfig.from_pretrained(str(folder)).is_prompt_learning:  # peft 0.21: KeyError
        raise ConfigError(f"adapter '{folder}' is a prompt-learning adapter (virtual tokens), which peft cannot "
                          f"load over a base partly on the {' and '.join(sorted(offloaded))}: give "
                          "--max-memory room for the whole model on the GPUs")
    cwd = os.getcwd()
    os.chdir(placed["offload_folder"])
    try:
        model = PeftModel.from_pretrained(model, str(Path(cwd, folder)), **placed)
    finally:
        os.chdir(cwd)
    for module in model.modules():
        loader = getattr(getattr(getattr(module, "_hf_hook", None), "weights_map", None), "dataset", None)
        for info in getattr(loader, "index", {}).values():
            if info.get("safetensors_file") and not os.path.isabs(info["safetensors_file"]):
                info["safetensors_file"] = os.path.join(placed["offload_folder"], info["safetensors_file"])
    _check_saved_modules(model, folder)
    return model


def _check_saved_modules(model: torch.nn.Module, folder: Path) -> None:
    """peft (0.21) does not offload the modules an adapter saves in full (`modules_to_save`: a classifier's head)
    to disk: the first forward would fail on a weight missing from the offload index. Refuse in one line."""
    from peft.utils.other import ModulesToSaveWrapper

    found = device_map(model)[1] or {}
    on_disk = [name for name, module in model.named_modules()
               if isinstance(module, ModulesToSaveWrapper) and _entry(found, name) == "disk"]
    if on_disk:
        raise ConfigError(f"adapter '{folder}': {', '.join(on_disk)} (saved in full by the adapter) would go to disk, "
                          "where peft cannot load it; give --max-memory room for the whole model on the GPUs and the "
                          "CPU, or merge the adapter (fsdp-ft export RUN --merge-adapters) and load the merged folder")


def device_map(model: torch.nn.Module) -> tuple[torch.nn.Module, dict] | tuple[None, None]:
    """The module that holds accelerate's placement (a PeftModel re-dispatched over its base, or the HF model)
    and that placement; (None, None) for a plainly loaded model."""
    from fsdp_ft.model import adapters

    for owner in (model, adapters.base_model(model)):
        found = vars(owner).get("hf_device_map")
        if found:
            return owner, found
    return None, None


def is_spread(model: torch.nn.Module) -> bool:
    """Whether accelerate's hooks run the model (more than one device, or weights on disk)."""
    found = device_map(model)[1]
    return bool(found) and (len(set(found.values())) > 1 or "disk" in found.values())


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the input ids go: the input embedding's device (its execution device when it is offloaded, as
    accelerate runs offloaded modules on the first GPU, else on the CPU)."""
    owner, found = device_map(model)
    if not found:
        return next(model.parameters()).device
    main = next((d for d in found.values() if d not in ("cpu", "disk")), "cpu")
    embedding = owner.get_input_embeddings()
    name = next((n for n, m in owner.named_modules() if m is embedding), None)
    where = None if name is None else _entry(found, name)
    if where is None or where in ("cpu", "disk"):
        where = main
    return torch.device(f"cuda:{where}" if isinstance(where, int) else where)


def _entry(found: dict, name: str):
    """The placement of module `name`: that of the deepest device-map key holding it (None if none does)."""
    key = max((k for k in found if k in ("", name) or name.startswith(k + ".")), key=len, default=None)
    return None if key is None else found[key]


def describe(model: torch.nn.Module, placement: Placement, offload_folder: str | None) -> str | None:
    """One line: what went where, e.g. `placement: 18 blocks + model.embed_tokens on cuda:0, 14 blocks + lm_head
    on cpu (max memory 0=20.0GiB)`; None for a model on one device that the command did not cap."""
    owner, found = device_map(model)
    caps = ", ".join(f"{k}={_size(v)}" for k, v in placement.max_memory.items())
    if not found or not is_spread(model):
        return f"placement: the whole model on {input_device(model)} (max memory {caps})" if caps else None
    groups: dict[str, list[str]] = {}
    for name, where in found.items():
        groups.setdefault(f"cuda:{where}" if isinstance(where, int) else str(where), []).append(name)
    parts = []
    for where, names in groups.items():
        blocks, others = 0, []
        for name in names:  # a block (`model.layers.7`), a whole stack of them (`model.layers`), or another module
            module = owner.get_submodule(name)
            if isinstance(module, torch.nn.ModuleList):
                blocks += len(module)
            elif re.search(r"\.\d+$", name):
                blocks += 1
            else:
                others.append(name or "the whole model")
        counted = [f"{blocks} block{'s' * (blocks != 1)}"] if blocks else []
        parts.append(" + ".join(counted + ([", ".join(others)] if others else [])) + f" on {where}")
    notes = ([f"max memory {caps}"] if caps else []) + (
        [f"offload folder {offload_folder}"] if "disk" in groups else [])
    return "placement: " + ", ".join(parts) + (f" ({'; '.join(notes)})" if notes else "")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"
