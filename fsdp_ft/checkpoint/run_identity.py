"""Which run a run directory holds, so that a folder never mixes two runs.

A run gets an id and a fingerprint when it starts: the config keys that decide what the model learns (model and
its files, data and its content, task, method and its settings, optimizer and schedule, global batch, sequence
length, seed, precision). Both go into `output_dir/run.json` and into every checkpoint's `state.json`.

- A fresh run (`resume=none`) refuses a folder that already holds a run.
- `resume=auto` continues the run in the folder only when the fingerprint is unchanged, else it refuses and lists
  the keys that differ. Keys in `MAY_CHANGE` (how long, how often to log/eval/save, how the model is sharded or
  compiled, the number of ranks at the same global batch) never count.
- `resume=PATH` continues the run that wrote PATH: same fingerprint rule, into an empty folder or that run's own.
- `overwrite=true` lets a fresh run move a run it cannot continue aside to `<output_dir>.replaced-<time>`.

Rank 0 decides, and every rank receives the same decision (or the same error).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fsdp_ft.checkpoint import dcp_checkpoint
from fsdp_ft.config import Config, all_keys, batch
from fsdp_ft.errors import CheckpointError, ConfigError
from fsdp_ft.runtime import precision
from fsdp_ft.storage import durable

RUN_FILE = "run.json"

# Keys that may differ when a run continues: they change how long the run goes on, what it logs, evaluates and
# keeps, and how the work is laid out over devices, not what a training step computes.
MAY_CHANGE = frozenset({
    "output_dir", "resume", "overwrite", "activation_checkpointing",
    "model.trust_remote_code", "model.attn_implementation", "model.block_classes",
    "data.eval", "data.eval_split", "data.max_eval_samples", "data.max_drop_share",
    "fsdp.reshard_after_forward", "fsdp.shard_frozen", "fsdp.gather_once_per_step", "fsdp.prefetch",
    "fsdp.gloo_async_reduce", "fsdp.hybrid_replicas", "fsdp.cpu_offload", "fsdp.memory_budget_gib",
    "deepspeed.stage", "deepspeed.config",  # a DeepSpeed checkpoint states its own stage and ranks on load
    "optim.implementation", "dist.setup_timeout_minutes", "dist.timeout_minutes",
    "train.max_steps", "train.epochs", "train.chunked_head_loss", "train.log_every", "train.eval_every",
    "train.eval_batch_size", "train.save_every", "train.keep_last", "train.best_metric", "train.best_mode",
    "train.progress_bar", "train.tensorboard", "train.profile_steps", "train.tune_host_malloc",
    "train.track_memory", "train.peak_flops", "train.compile", "train.tf32", "train.prefetch_batches",
    # the number of ranks may change where DCP reshards: what must stay is their product, the global batch
    "train.micro_batch_size", "train.grad_accum", "train.global_batch_size",
    *(f"wandb.{key}" for key in ("project", "entity", "name", "group", "tags", "mode")),  # where rows are copied
})
GLOBAL_BATCH = "global batch (train.micro_batch_size x train.grad_accum x ranks)"
SMALL_FILE = 64 << 20  # files up to this size are hashed whole
EDGE = 4 << 20  # larger ones: their size and their first and last EDGE bytes


# ---------------------------------------------------------------- fingerprint

def file_digest(path: Path) -> str:
    """Content digest: the whole file up to SMALL_FILE bytes, else its size and its first and last EDGE bytes."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SMALL_FILE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(EDGE))
            f.seek(size - EDGE)
            h.update(f.read(EDGE))
    return h.hexdigest()[:16]


def tree_digest(path: Path) -> str:
    """A folder's digest over its files' relative names and contents (hidden files and docs left out)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or f.suffix.lower() in (".md", ".txt") and \
                f.stem.upper() in ("README", "LICENSE", "NOTICE"):
            continue
        h.update(f"{rel.as_posix()}:{file_digest(f)};".encode())
    return h.hexdigest()[:16]


def source_identity(value: str | None) -> dict | str | None:
    """A local file or folder by its content (the path is kept for messages); anything else (a hub id) by name."""
    if not value:
        return value
    path = Path(value)
    if path.is_file():
        return {"path": str(path), "digest": file_digest(path)}
    if path.is_dir():
        return {"path": str(path), "digest": tree_digest(path)}
    return value


def fingerprint(cfg: Config, world_size: int) -> dict:
    """The config keys that decide what the model learns, flattened; files stand for their contents."""
    values = _flatten(cfg.to_dict())
    fp = {k: v for k, v in values.items() if k not in MAY_CHANGE}
    fp["model.path"] = source_identity(cfg.model.path)
    fp["data.train"] = source_identity(cfg.data.train)
    fp["fsdp.mixed_precision"] = precision.mixed_precision(cfg)  # what `auto` means here (training resolved it)
    train = batch.resolve(cfg, world_size).train  # grad_accum as training derives it
    fp[GLOBAL_BATCH] = train.micro_batch_size * train.grad_accum * world_size
    return _relevant(fp)


def _relevant(fp: dict) -> dict:
    """Without the quantization keys unless the base is quantized: a full or LoRA run does not depend on them
    (so a change of their defaults, 256 -> auto, leaves those runs resumable)."""
    if fp.get("finetune.method") == "qlora":
        return fp
    return {k: v for k, v in fp.items() if not k.startswith("finetune.quant.")}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _same(old, new) -> bool:
    if isinstance(old, dict) and isinstance(new, dict) and "digest" in old and "digest" in new:
        return old["digest"] == new["digest"]  # the same content moved to another path is the same input
    return old == new


def _show(value) -> str:
    if isinstance(value, dict) and "digest" in value:
        return f"{value['path']} (content {value['digest']})"
    return json.dumps(value)


def differences(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for each key that differs. A key the old run did not know yet counts as its default."""
    defaults = {k: d for k, _t, _f, d in all_keys()}
    old, new = _relevant(old), _relevant(new)  # runs saved before the filter still hold every key
    missing = object()
    diffs = []
    for key in sorted(set(old) | set(new), key=lambda k: (k not in defaults, k)):
        if key in MAY_CHANGE:
            continue
        was, now = old.get(key, defaults.get(key, missing)), new.get(key, defaults.get(key, missing))
        if not _same(was, now):
            diffs.append(f"{key}: {'(absent)' if was is missing else _show(was)} -> "
                         f"{'(absent)' if now is missing else _show(now)}")
    return diffs


# ---------------------------------------------------------------- the folder

def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def read_run_file(out: Path) -> dict | None:
    try:
        record = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "run_id" in record else None


def holds_run(out: Path) -> bool:
    """Whether output_dir already holds a run (rank logs alone do not count: a launcher writes them first)."""
    ckpts = dcp_checkpoint.checkpoints_dir(out)
    return ((out / RUN_FILE).exists() or (out / "final").exists() or (out / "metrics.jsonl").exists()
            or (out / "config.yaml").exists() or (ckpts.is_dir() and any(ckpts.iterdir())))


def folder_identity(out: Path) -> dict | None:
    """{run_id, fingerprint} of the run in `out`: run.json, else the newest checkpoint that names its run."""
    record = read_run_file(out)
    if record is not None:
        return record
    for _step, path, problems in reversed(dcp_checkpoint.scan(out)):
        if not problems and (run := dcp_checkpoint.read_state(path).get("run")):
            return run
    return None


def move_aside(out: Path) -> Path:
    """Move everything in `out` but this launch's logs/ to a sibling folder; nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = out.parent / f"{out.name}.replaced-{stamp}", 1
    while dest.exists():
        n += 1
        dest = out.parent / f"{out.name}.replaced-{stamp}-{n}"
    dest.mkdir()
    for entry in sorted(out.iterdir()):
        if entry.name != "logs":
            os.replace(entry, dest / entry.name)
    durable.fsync_path(dest)
    durable.fsync_path(out)
    return dest


@dataclass
class RunStart:
    """What rank 0 decided: the run's id and fingerprint, the checkpoint to resume from, and what to report."""
    run_id: str
    fingerprint: dict
    resume_from: str | None = None
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {"run_id": self.run_id, "fingerprint": self.fingerprint}

    def resumes_in_place(self, out: Path) -> bool:
        """Whether the checkpoint resumed from is one of output_dir's own (else output_dir has none of it yet)."""
        return (self.resume_from is not None
                and Path(self.resume_from).resolve().parent == dcp_checkpoint.checkpoints_dir(out).resolve())


def decide(cfg: Config, world_size: int) -> RunStart:
    """Rank 0: check the folder against the config and move a replaced run aside. run.json is written later, by
    `record`, once the run has been built: a start that fails on a config or data error leaves nothing behind
    that would block the corrected config."""
    out = Path(cfg.output_dir)
    fp = fingerprint(cfg, world_size)
    if cfg.resume not in ("auto", "none"):
        return _continue_from_path(cfg, out, fp)
    if not holds_run(out):
        return RunStart(new_run_id(), fp)
    if cfg.resume == "none":
        return _replace(cfg, out, fp, f"resume=none starts a fresh run, but output_dir '{out}' already holds "
                                      f"{_describe(out)}; continue it with resume=auto, or {_afresh(out)}")
    return _continue_folder(cfg, out, fp)


def record(out: Path, start: RunStart) -> None:
    """Rank 0: write (or bring up to date) output_dir/run.json."""
    old = read_run_file(out)
    if old is None or old.get("run_id") != start.run_id or old.get("fingerprint") != start.fingerprint:
        created = old.get("created") if old and old.get("run_id") == start.run_id else time.time()
        durable.replace_text(out / RUN_FILE, json.dumps({**start.record(), "created": created}, indent=1))


def _describe(out: Path) -> str:
    identity = folder_identity(out)
    steps = [s for s, _, problems in dcp_checkpoint.scan(out) if not problems]
    what = f"run {identity['run_id']}" if identity else "a run without a run id (an older fsdp_ft)"
    return what + (f", checkpoints up to step {steps[-1]}" if steps else ", no checkpoint")


def _replace(cfg: Config, out: Path, fp: dict, refusal: str) -> RunStart:
    """overwrite=true: move the run in `out` aside and start a new one; else refuse with `refusal`."""
    if not cfg.overwrite:
        raise ConfigError(refusal)
    moved = move_aside(out)
    return RunStart(new_run_id(), fp, notes=[f"overwrite=true: the run that was in '{out}' moved to '{moved}'"])


def _afresh(out: Path) -> str:
    return (f"start afresh with another output_dir or with overwrite=true (which moves the old run to "
            f"{out.name}.replaced-<time>, deleting nothing)")


def _continue_folder(cfg: Config, out: Path, fp: dict) -> RunStart:
    identity = folder_identity(out)
    if identity is None:
        newest = dcp_checkpoint.list_checkpoints(out)
        explicit = f"continue it anyway with resume={newest[-1][1]}, or " if newest else ""
        return _replace(cfg, out, fp, f"resume=auto: output_dir '{out}' holds {_describe(out)} ({RUN_FILE} is "
                                      f"missing), so it cannot tell whether this config continues it; "
                                      f"{explicit}{_afresh(out)}")
    diffs = differences(identity.get("fingerprint", {}), fp)
    if diffs:
        return _replace(cfg, out, fp, f"resume=auto: output_dir '{out}' holds run {identity['run_id']}, trained "
                                      f"with another config; keys that differ (saved -> now): {'; '.join(diffs)}. "
                                      f"Continue it with its own config ({out / 'config.yaml'}), or {_afresh(out)}")
    path, notes = dcp_checkpoint.newest_valid(out)
    return RunStart(identity["run_id"], fp, str(path) if path else None, notes)


def _continue_from_path(cfg: Config, out: Path, fp: dict) -> RunStart:
    ckpt = dcp_checkpoint.resolve_explicit(cfg.resume)
    run = dcp_checkpoint.read_state(ckpt).get("run")
    notes = []
    if run is None:
        notes.append(f"resume={ckpt}: the checkpoint names no run (an older fsdp_ft); its config cannot be "
                     "checked against this one")
        run = {"run_id": new_run_id()}
    elif diffs := differences(run.get("fingerprint", {}), fp):
        raise CheckpointError(f"resume={ckpt}: that checkpoint belongs to run {run['run_id']}, trained with another "
                              f"config; keys that differ (saved -> now): {'; '.join(diffs)}")
    here = folder_identity(out) if holds_run(out) else {"run_id": run["run_id"]}
    if here is None or here["run_id"] != run["run_id"]:  # another run is there: moved aside, or refused
        notes += _replace(cfg, out, fp, f"resume={ckpt} continues run {run['run_id']}, but output_dir '{out}' "
                                        f"holds {_describe(out)}; choose an empty output_dir, or {_afresh(out)}").notes
    return RunStart(run["run_id"], fp, str(ckpt), notes)
