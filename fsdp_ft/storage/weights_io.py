"""Streaming weight I/O: never hold a whole model in one process's RAM.

* ``SafetensorsReader`` memory-maps an HF weights folder so each FSDP rank can read
  just the dim-0 rows it owns (``local_rows``) instead of the full tensor.
* ``iter_dcp_tensors`` streams full tensors out of a DCP checkpoint a group at a time,
  without a process group and through ``safe_dcp`` (a run folder may come from someone
  else), and ``write_safetensors_shards`` streams them into size-capped, HF-named
  safetensors shards.
* ``atomic_dir`` makes a folder appear complete or not at all (export, checkpoints).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fsdp_ft.storage import durable

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsReader:
    """Lazy, memory-mapped view of an HF safetensors folder (single file or sharded).

    Handles stay open per shard, so repeated ``read_rows`` calls only touch the pages
    holding the requested rows. Every ``REMAP_BYTES`` read, the files are mapped afresh: a page read through a
    mapping counts in this process's RSS until the file is unmapped, so a rank that reads every weight whole
    (QLoRA quantizes whole weights) would otherwise hold the whole checkpoint in RSS until loading ends.
    """

    REMAP_BYTES = 128 << 20

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, object] = {}  # shard file name -> safe_open handle
        self._where: dict[str, str] = {}  # tensor name -> shard file name
        self._read_since_map = 0
        try:
            self._layout = self._locate()
            self._open(self._layout)
        except BaseException:
            self._stack.close()
            raise

    def _locate(self) -> dict[str, str] | str:
        """Return the index's weight_map, or the single weights file's name."""
        p = self.path
        if os.path.isfile(p) and p.endswith(".safetensors"):
            self.path = os.path.dirname(os.path.abspath(p))
            return os.path.basename(p)
        if os.path.isfile(os.path.join(p, INDEX_FILE)):
            with open(os.path.join(p, INDEX_FILE)) as f:
                return json.load(f)["weight_map"]
        if os.path.isfile(os.path.join(p, SINGLE_FILE)):
            return SINGLE_FILE
        found = sorted(glob.glob(os.path.join(glob.escape(p), "*.safetensors")))
        if len(found) == 1:
            return os.path.basename(found[0])
        why = "no *.safetensors files" if not found else f"{len(found)} *.safetensors files but no {INDEX_FILE}"
        raise FileNotFoundError(f"{p}: no safetensors weights found ({why})")

    def _open(self, layout: dict[str, str] | str) -> None:
        files = [layout] if isinstance(layout, str) else list(dict.fromkeys(layout.values()))
        for fname in files:
            full = os.path.join(self.path, fname)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{full}: weight shard listed in {INDEX_FILE} is missing")
            self._handles[fname] = self._stack.enter_context(safe_open(full, framework="pt"))
        if isinstance(layout, str):
            self._where = {k: layout for k in self._handles[layout].keys()}
        else:
            self._where = dict(layout)

    def _handle(self, name: str):
        try:
            return self._handles[self._where[name]]
        except KeyError:
            raise KeyError(f"{name!r} is not in the weights at {self.path}") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """Read a zero-row slice (or the scalar) rather than keep a dtype-name table."""
        if not self.shape(name):
            return self.read(name).dtype
        return self._handle(name).get_slice(name)[:0].dtype

    def read(self, name: str) -> torch.Tensor:
        return self._counted(self._handle(name).get_tensor(name))

    def _counted(self, t: torch.Tensor) -> torch.Tensor:
        """Map the files afresh once enough was read; tensors already read are copies, so they stay valid."""
        self._read_since_map += t.numel() * t.element_size()
        if self._read_since_map >= self.REMAP_BYTES:
            self._read_since_map = 0
            self._stack.close()
            self._handles.clear()
            self._stack = contextlib.ExitStack()
            self._open(self._layout)
        return t

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0, reading only their bytes.

        A 0-d tensor has no rows: it is returned whole (every rank needs a replicated scalar).
        """
        shape = self.shape(name)
        if not shape:
            return self.read(name)
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{name!r}: rows [{start}, {stop}) outside dim 0 of size {shape[0]}")
        return self._counted(self._handle(name).get_slice(name)[start:stop])

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, allow_empty: bool = False, tag: str | None = None):
    """Yield a temp folder beside ``out_dir``; rename it onto ``out_dir`` only on success.

    Everything in it gets this user's normal modes (``normal_modes``) and is fsynced first.
    A crash or exception never leaves a half-written ``out_dir``, and an existing
    ``out_dir`` is never modified: it raises FileExistsError (unless ``allow_empty`` and it
    is an empty folder). ``tag`` (default: the pid) names the temp folder
    ``<out_dir>.tmp-<tag>``; ranks writing one folder together must agree on it.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_free(out_dir, allow_empty)
    tmp = f"{out_dir}.tmp-{os.getpid() if tag is None else tag}"
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    os.mkdir(tmp)  # FileExistsError if a stale one exists: never delete what we did not make
    try:
        yield tmp
        normal_modes(tmp)
        durable.fsync_tree(tmp)  # on disk before the name says it is complete
        _check_free(out_dir, allow_empty)
        os.rename(tmp, out_dir)  # POSIX: atomic; replaces only an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    durable.fsync_path(os.path.dirname(out_dir))


def _umask() -> int:
    """This process's umask, read without changing it (Linux); else set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_modes(folder: str | os.PathLike) -> None:
    """Give ``folder``, its sub-folders and files the modes a plain open()/mkdir() by this user gives.

    safetensors writes through a private temporary file (mode 0600), so without this an exported model is
    unreadable to a model server running as another user. Symlinks are left alone.
    """
    mask = _umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for name, mode in [(d, dir_mode) for d in dirs] + [(f, file_mode) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def _check_free(out_dir: str, allow_empty: bool) -> None:
    if not os.path.lexists(out_dir):
        return
    if allow_empty and os.path.isdir(out_dir) and not os.listdir(out_dir):
        return
    what = "is not empty" if allow_empty else "already exists"
    raise FileExistsError(f"{out_dir}: {what}; refusing to overwrite it")


def _prepare(t: torch.Tensor, seen_ptrs: set[int]) -> torch.Tensor:
    """CPU, contiguous, owning its storage: safetensors refuses views and shared storage."""
    t = t.detach().cpu().contiguous()
    owns = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
    if not owns or (t.nbytes and t.data_ptr() in seen_ptrs):
        t = t.clone()
    if t.nbytes:
        seen_ptrs.add(t.data_ptr())
    return t


def write_safetensors_shards(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    max_shard_bytes: int = 2 * 1024**3,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Stream tensors into HF-named safetensors shards in ``out_dir``; return the weight files.

    At most one shard's tensors are held at a time. One shard -> ``model.safetensors``;
    more -> ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``. The
    folder appears atomically (see ``atomic_dir``); an existing non-empty one raises.
    """
    meta = {**(metadata or {}), "format": "pt"}  # transformers requires format=pt
    with atomic_dir(out_dir, allow_empty=True) as tmp:
        parts: list[list[str]] = []
        weight_map: dict[str, int] = {}
        batch: dict[str, torch.Tensor] = {}
        batch_bytes = total = 0
        seen: set[int] = set()

        def flush() -> None:
            save_file(batch, os.path.join(tmp, f"part-{len(parts):05d}.safetensors"), metadata=meta)
            parts.append(list(batch))
            batch.clear()
            seen.clear()

        for name, tensor in named_tensors:
            if name in weight_map:
                raise ValueError(f"duplicate tensor name {name!r}")
            nbytes = tensor.numel() * tensor.element_size()
            if batch and batch_bytes + nbytes > max_shard_bytes:
                flush()
                batch_bytes = 0
            batch[name] = _prepare(tensor, seen)
            weight_map[name] = len(parts)
            batch_bytes += nbytes
            total += nbytes
        if batch or not parts:
            flush()
        files = _finalize_names(tmp, len(parts), weight_map, total)
    return [os.path.join(os.fspath(out_dir), f) for f in files]


def _finalize_names(tmp: str, n: int, weight_map: dict[str, int], total: int) -> list[str]:
    """Rename temp parts to HF names now that N is known; write the index if sharded."""
    if n == 1:
        os.rename(os.path.join(tmp, "part-00000.safetensors"), os.path.join(tmp, SINGLE_FILE))
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, final in enumerate(names):
        os.rename(os.path.join(tmp, f"part-{i:05d}.safetensors"), os.path.join(tmp, final))
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[i] for k, i in weight_map.items()}}
    with open(os.path.join(tmp, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return names


def dcp_tensor_keys(ckpt_dir: str | os.PathLike) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Flattened key -> (global shape, dtype) of every tensor in a DCP checkpoint.

    Nested state dicts are flattened with dots: ``{"model": {"a.b": t}}`` -> ``"model.a.b"``.
    Non-tensor entries (ints, lists: BytesStorageMetadata) are left out.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from fsdp_ft.storage.safe_dcp import read_metadata

    md = read_metadata(ckpt_dir)  # allow-listed unpickling: a run folder may come from someone else
    return {
        k: (v.size, v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


def iter_dcp_tensors(
    ckpt_dir: str | os.PathLike, prefix: str, max_group_bytes: int = 1024**3
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key without ``prefix``, full CPU tensor) for tensors whose key starts with ``prefix``.

    Loads consecutive keys in groups of up to ``max_group_bytes`` (one oversized tensor
    forms its own group), so peak memory is about one group. Needs no process group.
    """
    from fsdp_ft.storage.safe_dcp import load

    wanted = [(k, s, d) for k, (s, d) in dcp_tensor_keys(ckpt_dir).items() if k.startswith(prefix)]
    group: list[tuple[str, torch.Size, torch.dtype]] = []
    group_bytes = 0
    for i, (key, shape, dtype) in enumerate(wanted):
        group.append((key, shape, dtype))
        group_bytes += shape.numel() * dtype.itemsize
        nxt = wanted[i + 1] if i + 1 < len(wanted) else None
        if nxt is None or group_bytes + nxt[1].numel() * nxt[2].itemsize > max_group_bytes:
            state = {k: torch.empty(s, dtype=d) for k, s, d in group}
            load(state, ckpt_dir, no_dist=True)
            group, group_bytes = [], 0
            for k in list(state):
                yield k[len(prefix):], state.pop(k)  # drop our reference as we go


def local_rows(target, mesh=None, placements: Sequence | None = None) -> tuple[int, int]:
    """Rows [start, stop) of dim 0 that this rank owns under FSDP2-style placements.

    ``target`` is a DTensor (its mesh and placements are used) or a global shape with
    ``mesh`` and ``placements``: ``(Shard(0),)`` on a 1-D mesh or ``(Replicate(), Shard(0))``
    for hybrid sharding. Matches ``torch.chunk(full, n, 0)[rank]``: trailing ranks may own
    zero rows (start == stop). Only whole-row layouts are supported.
    """
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(target, DTensor):
        shape, mesh, placements = tuple(target.shape), target.device_mesh, target.placements
    else:
        shape = tuple(target)
    if mesh is None or placements is None:
        raise ValueError("local_rows needs a mesh and placements unless given a DTensor")
    if not shape:
        raise ValueError("a 0-d tensor has no rows; read it whole")
    for p in placements:
        if not (p.is_replicate() or (type(p) is Shard and p.dim == 0)):
            raise ValueError(f"placement {p!r} is not Replicate() or Shard(0); rows cannot express it")
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    if not offset:  # this rank is not part of the mesh
        return 0, 0
    start = min(offset[0], shape[0])
    return start, start + local_shape[0]
