"""Read torch.distributed.checkpoint (DCP) folders without running code from them.

A DCP folder is not just data: its `.metadata` is a pickle, and DCP reads every non-tensor entry (optimizer
param_groups, ints) with `torch.load(weights_only=False)`. A checkpoint folder someone else wrote (a shared run,
a downloaded one) could therefore run any command on `fsdp-ft export`, `eval RUN` or a resume. Everything fsdp_ft
reads from a DCP folder goes through this module instead:

* `SafeReader` unpickles `.metadata` with an allow-list of the classes DCP itself writes there;
* `SafeLoadPlanner` reads non-tensor entries with `torch.load(weights_only=True)`;
* tensor entries are already read by DCP with `weights_only=True` (torch >= 2.6).

Anything outside that raises `CheckpointError` naming the file (or entry) and what was refused, before it runs.
"""
from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import re
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from fsdp_ft.errors import CheckpointError

METADATA_FILE = ".metadata"

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# The globals DCP's writers put in .metadata, found by saving full, LoRA, optimizer and 2-rank FSDP2 (DTensor)
# checkpoints and recording every global their pickles name; beyond these: torch dtypes, torch.layout (through
# torch.serialization._get_layout) and the writer's folder as a pathlib path (see allowed_global). OrderedDict is
# inert and was what older state dicts used; nothing else is needed.
_ALLOWED_NAMES = {
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "StorageMeta"), (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "TensorStorageMetadata"), (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"), (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
}


def _layout_by_name(name: str) -> torch.layout:
    """Stands in for torch.serialization._get_layout (how torch.layout pickles): a lookup, nothing else."""
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise pickle.UnpicklingError(f"unknown torch layout {name!r}")
    return layouts[name]


def _path_class(name: str):
    """StorageMeta.checkpoint_id is the writer's folder as a pathlib path (module 'pathlib._local' on Python 3.13).
    Windows paths become pure paths: a concrete WindowsPath cannot be built on POSIX, and only the name matters."""
    return {"PosixPath": pathlib.PosixPath, "PurePosixPath": pathlib.PurePosixPath,
            "WindowsPath": pathlib.PureWindowsPath, "PureWindowsPath": pathlib.PureWindowsPath}.get(name)


def allowed_global(module: str, name: str):
    """The object a DCP .metadata pickle may name as `module.name`, or None when it is refused."""
    if (module, name) in _ALLOWED_NAMES:
        import importlib

        return getattr(importlib.import_module(module), name, None)
    if module == "torch":  # dtypes (torch.float32 ...), and layouts / memory formats as older torch wrote them
        obj = getattr(torch, name, None)
        return obj if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) else None
    if (module, name) == ("torch.serialization", "_get_layout"):
        return _layout_by_name
    if module in ("pathlib", "pathlib._local"):
        return _path_class(name)
    return None


class _Refused(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.global_name = f"{module}.{name}"


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only allow-listed classes; any other global (os.system, builtins.eval ...) stops the load."""

    def find_class(self, module: str, name: str):
        obj = allowed_global(module, name)
        if obj is None:
            raise _Refused(module, name)
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not used by DCP metadata")


def load_metadata_file(path: str | os.PathLike) -> Metadata:
    """Unpickle one DCP metadata file with the allow-list; CheckpointError naming the file on anything else."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except _Refused as e:
        raise CheckpointError(f"checkpoint metadata '{path}' refused: it names {e.global_name}, which DCP "
                              "metadata never holds (a planted or foreign file; it was not run)") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint metadata '{path}' does not exist") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint metadata '{path}' is unreadable: {e.strerror or e}") from None
    except Exception as e:  # truncated or garbled pickle
        raise CheckpointError(f"checkpoint metadata '{path}' is damaged: {type(e).__name__}: "
                              f"{str(e).strip()[:200]}") from None
    _check_metadata(md, path)
    return md


def _check_metadata(md: Any, path: str) -> None:
    """A well-formed Metadata whose storage files all lie inside the checkpoint folder."""
    if not isinstance(md, Metadata):
        raise CheckpointError(f"checkpoint metadata '{path}' holds a {type(md).__name__}, not DCP Metadata")
    storage = md.storage_data
    if storage is None:
        return
    if not isinstance(storage, dict):
        raise CheckpointError(f"checkpoint metadata '{path}': storage_data is a {type(storage).__name__}, not a dict")
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if not _inside(rel):
            raise CheckpointError(f"checkpoint metadata '{path}' points outside its folder ({rel!r}); refused")


def _inside(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel or "\0" in rel:
        return False
    norm = os.path.normpath(rel)
    return norm != ".." and not norm.startswith(".." + os.sep) and norm != "."


class SafeReader(FileSystemReader):
    """FileSystemReader whose read_metadata uses the allow-listed unpickler (torch 2.6 .. 2.13)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        get_path = getattr(self, "_get_metadata_path", None)  # torch >= 2.8; rank-local metadata files
        if get_path is not None:
            path = get_path(rank)
        else:
            path = os.path.join(os.fspath(self.path), METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}")
        md = load_metadata_file(path)
        # what FileSystemReader.read_metadata does after unpickling (every version since 2.4)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = getattr(self, "load_id", None)
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor entries with torch.load(weights_only=True)."""

    def __init__(self, *args: Any, source: str | os.PathLike | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.source = source  # the checkpoint folder, for error messages

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True, map_location="cpu")
        except Exception as e:  # UnpicklingError for a refused global; others for damaged bytes
            where = f"checkpoint '{self.source}'" if self.source is not None else "checkpoint"
            raise CheckpointError(f"{where}: entry '{key}' refused: {_why(e)} (it was not run)") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[key], obj)
        else:
            self.state_dict[key] = obj


def _why(e: Exception) -> str:
    """The global a weights_only load refused ("it names posix.system"), else the error's first line."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it names {found.group(1)}, which is not a plain value"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The metadata of the DCP checkpoint in folder `path` (one process, no process group)."""
    return SafeReader(os.fspath(path)).read_metadata()


def load(state_dict: dict, path: str | os.PathLike, no_dist: bool = False) -> None:
    """dcp.load(state_dict, checkpoint_id=path) through SafeReader and SafeLoadPlanner.

    The metadata is read once up front so a refusal surfaces as CheckpointError itself; during the load DCP wraps
    a rank's errors into CheckpointException, from which a CheckpointError is taken back out."""
    from torch.distributed.checkpoint.api import CheckpointException

    path = os.fspath(path)
    reader = SafeReader(path)
    reader.read_metadata()
    try:
        with warnings.catch_warnings():  # one process without a group: DCP warns on every call; it is intended
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(state_dict, storage_reader=reader, planner=SafeLoadPlanner(source=path), no_dist=no_dist)
    except CheckpointException as e:
        for failure in e.failures.values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, CheckpointError):
                raise exc from None
        raise


def verify_files(path: str | os.PathLike) -> list[str]:
    """Problems with the storage files of the DCP checkpoint in `path`, found without loading tensors:
    unreadable or refused metadata, a listed file missing, or one shorter than the bytes listed in it."""
    folder = os.fspath(path)
    try:
        md = read_metadata(folder)
    except CheckpointError as e:
        return [str(e)]
    needed: dict[str, int] = collections.defaultdict(int)
    for info in (md.storage_data or {}).values():
        needed[info.relative_path] = max(needed[info.relative_path], int(info.offset) + int(info.length))
    problems = []
    for rel, end in sorted(needed.items()):
        file = os.path.join(folder, rel)
        if not os.path.isfile(file):
            problems.append(f"checkpoint file '{file}' is missing (listed in {METADATA_FILE})")
            continue
        size = os.path.getsize(file)
        if size < end:
            problems.append(f"checkpoint file '{file}' is truncated: {size} bytes, {METADATA_FILE} lists data up "
                            f"to byte {end}")
    return problems
