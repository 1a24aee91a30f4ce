"""`fsdp-ft train --debug`: one process on one device, deterministic, with anomaly detection, a few steps logged
one by one, and a dump of the first batch, so a user sees exactly what the model trains on before a long run.

It writes into output_dir/debug, so it never mixes with, or prunes, a real run's checkpoints. That folder is wiped
at each debug run only when a marker file says a debug run made it: a folder of the same name the user made is
refused, never deleted.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from fsdp_ft.config import Config, batch as global_batch
from fsdp_ft.errors import ConfigError

NO_LOSS = ("«", "»")  # marks tokens that carry no loss in the inline view
MARKER = ".fsdp-ft-debug"  # written into output_dir/debug when a debug run creates it: only then is it ours to wipe


def _fresh_debug_dir(out: Path) -> None:
    """Empty `out` for a new debug run: wipe it when a debug run made it (the marker), make it when missing, and
    refuse (deleting nothing) when it holds anything else."""
    ours = out.is_dir() and not out.is_symlink() and (out / MARKER).is_file()
    if ours:
        shutil.rmtree(out)
    elif out.is_symlink() or (out.exists() and not (out.is_dir() and not any(out.iterdir()))):
        raise ConfigError(f"--debug writes to '{out}', which exists and was not made by a debug run (no {MARKER} "
                          "file in it): move or delete it yourself, or set output_dir elsewhere; nothing was deleted")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `fsdp-ft train --debug`; the next debug run deletes this folder\n")


def prepare(cfg: Config, steps: int) -> Config:
    """Turn a config into its debug run (in place) and switch on deterministic algorithms and anomaly detection."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        raise ConfigError("--debug runs one process: start it with `fsdp-ft train --debug`, not torchrun/srun")
    out = Path(cfg.output_dir) / "debug"
    _fresh_debug_dir(out)
    cfg.output_dir, cfg.resume = str(out), "none"
    t = cfg.train
    t.max_steps = min(t.max_steps, steps) if t.max_steps else steps
    t.log_every, t.progress_bar, t.save_every, t.eval_every = 1, False, 0, 0
    cfg.wandb.project = None  # a throw-away run: not one more run in the team's W&B project
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic matmuls
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.autograd.set_detect_anomaly(True)
    return cfg


def first_batch(cfg: Config) -> tuple[dict, object, list[dict]]:
    """The first micro-batch rank 0 trains on (a single process: world size 1), its tokenizer and source rows."""
    from fsdp_ft.data.splits import BatchPlan, load_splits
    from fsdp_ft.model.build import load_tokenizer, resolve_model_dir
    from fsdp_ft.tasks import get_task

    tokenizer = load_tokenizer(cfg, resolve_model_dir(cfg))
    task = get_task(cfg, tokenizer)
    rows = load_splits(cfg, task).train  # tokenized (and packed) exactly as training sees them
    accum = global_batch.resolve(cfg, 1).train.grad_accum
    plan = BatchPlan(len(rows), cfg.train.micro_batch_size, accum, 1, 0, cfg.train.seed)
    indices = plan.micro_batches(plan.permutation(0), 0)[0]
    return task.collate([task.encode(rows[i]) for i in indices]), tokenizer, [rows[i] for i in indices]


def describe_batch(batch: dict, tokenizer) -> str:
    """Each sample as decoded text, then token by token with the tokens that carry no loss marked «like this».

    Causal LM: token i carries loss when labels[i] is not -100 and i > 0 (nothing predicts the first token).
    Classification: the sample's label carries the loss.
    """
    ids, mask = batch["input_ids"], batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    labels = batch.get("labels")
    token_labels = labels is not None and labels.shape == ids.shape
    lines = [f"first batch: {ids.shape[0]} samples x {ids.shape[1]} tokens "
             f"(keys: {', '.join(f'{k} {tuple(v.shape)}' for k, v in batch.items())})"]
    for i in range(ids.shape[0]):
        real = [int(t) for t, m in zip(ids[i], mask[i]) if m]
        if token_labels:
            carries = [j > 0 and int(labels[i, j]) != -100 for j in range(ids.shape[1]) if mask[i, j]]
        else:
            carries = [False] * len(real)
        lines.append(f"--- sample {i}: {len(real)} tokens, {sum(carries)} carry loss"
                     + ("" if token_labels else f", label {labels[i].tolist() if labels is not None else None}"))
        lines.append("text: " + tokenizer.decode(real))
        pieces = tokenizer.convert_ids_to_tokens(real)
        lines.append("tokens: " + " ".join(p if c else f"{NO_LOSS[0]}{p}{NO_LOSS[1]}" for p, c in zip(pieces, carries)))
    return "\n".join(lines)


def dump_first_batch(cfg: Config) -> Path:
    """Write output_dir/first_batch.txt and print it (to stderr)."""
    batch, tokenizer, _ = first_batch(cfg)
    text = describe_batch(batch, tokenizer)
    path = Path(cfg.output_dir) / "first_batch.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    print(f"[debug] {text}\n[debug] written to {path}", file=sys.stderr, flush=True)
    return path
