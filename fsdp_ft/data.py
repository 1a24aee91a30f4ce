"""Training data: load rows (local files or hub ids through `datasets`), validate, and plan batches.

The batch plan is pure index arithmetic over a seeded per-epoch permutation, so the data position is two
integers (epoch, step in epoch): resume restores it exactly without replaying the loader, and the global
batch is the same samples whatever the number of ranks.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fsdp_ft.config import Config
from fsdp_ft.errors import DataError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def load_table(path: str, split: str, key: str):
    """A `datasets.Dataset` from a local file, or a split of a hub dataset."""
    p = Path(path)
    if p.suffix.lower() in FORMATS or p.exists():
        if not p.is_file():
            what = "is not a file" if p.exists() else "does not exist"
            raise DataError(f"config key '{key}': data file '{path}' {what}")
        fmt = FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise DataError(f"config key '{key}': '{path}' is not .jsonl, .json, .csv or .parquet")
        if p.stat().st_size == 0:
            raise DataError(f"config key '{key}': data file '{path}' is empty")
        datasets = _datasets()  # imported before quieting: its import resets its logger's level
        try:
            with _quiet_datasets():
                return datasets.load_dataset(fmt, data_files=str(p), split="train")
        except Exception as e:  # malformed rows: name the file and the parser's complaint
            if fmt != "parquet" and _has_no_rows(p, fmt):
                raise DataError(f"config key '{key}': data file '{path}' has no rows") from None
            problem = (_bad_json_line(p) if fmt == "json" else None) or _first_line(_reason(e))
            raise DataError(f"config key '{key}': cannot read '{path}': {problem}") from None
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise DataError(f"config key '{key}': data file '{path}' does not exist")
    try:
        return _datasets().load_dataset(path, split=split)
    except Exception as e:
        raise DataError(f"config key '{key}': cannot load hub dataset '{path}' split '{split}': "
                        f"{_first_line(e)}") from None


def _datasets():
    """Imported only once a file passed the cheap checks, so a missing file fails without the import."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


class _quiet_datasets:
    """`datasets` logs a parser failure before raising it; the DataError we raise says it once, in one line."""

    def __enter__(self):
        self.logger = logging.getLogger("datasets")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _has_no_rows(p: Path, fmt: str) -> bool:
    """Blank lines only (or a CSV header only): `datasets` fails on these with messages that do not say so."""
    with p.open(encoding="utf-8", errors="replace") as fh:
        lines = sum(1 for _ in itertools.islice((line for line in fh if line.strip()), 2))
    return lines <= (1 if fmt == "csv" else 0)


def _bad_json_line(p: Path) -> str | None:
    """The first line of a JSON Lines file that is not JSON, so the error names the line to fix."""
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)  # a single JSON document (a list of records) is fine as well
        return None
    except ValueError as e:
        if text.lstrip().startswith("["):  # meant as one document: its parser knows the line
            return f"line {e.lineno} is not valid JSON: {e.msg} (column {e.colno})"
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError as e:
                return f"line {n} is not valid JSON: {e.msg} (column {e.colno})"
    return None


def _reason(e: BaseException) -> BaseException:
    """The parser's own error: `datasets` wraps it in a vague 'An error occurred while generating the dataset'."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def check_columns(table, columns: list[str], key: str, path: str, cfg: Config | None = None) -> None:
    for col in columns:
        if col not in table.column_names:
            raise DataError(f"{key}: file '{path}' has no column '{col}' (it has {table.column_names}); "
                            f"set {_column_key(col, cfg)} to the right column")


def _column_key(col: str, cfg: Config | None) -> str:
    """The config key that named the missing column, so the error says what to change."""
    d = cfg.data if cfg is not None else None
    for name in ("text_column", "text_pair_column", "label_column"):
        if d is not None and getattr(d, name) == col:
            return f"data.{name}"
    return "data.text_column / data.label_column"


def check_eval_labels(train, evaluation, cfg: Config, source: str) -> None:
    """An eval label that training never shows has no class id: fail at load, not at the first evaluation."""
    col, num_labels = cfg.data.label_column, cfg.model.num_labels
    known = {str(v) for v in train[col]}
    for v in evaluation[col]:
        in_range = num_labels is not None and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_labels
        if str(v) not in known and not in_range:
            raise DataError(f"{source} has label {v!r} (column '{col}') that data.train never uses; "
                            f"training labels: {sorted(known)[:20]}")


@dataclass
class Splits:
    train: object
    eval: object | None
    dropped: dict


def drop_empty(table, column: str):
    """Rows whose text is missing or blank cannot train; drop and count them."""
    before = len(table)
    table = table.filter(lambda v: isinstance(v, str) and v.strip() != "", input_columns=[column])
    return table, before - len(table)


def load_splits(cfg: Config, columns: list[str]) -> Splits:
    """Train and eval tables with the task's columns checked and empty texts dropped."""
    d = cfg.data
    train = load_table(d.train, d.train_split, "data.train")
    check_columns(train, columns, "data.train", d.train, cfg)
    train, dropped_train = drop_empty(train, d.text_column)
    if len(train) == 0:
        raise DataError(f"data.train: '{d.train}' has no usable rows (empty file or all texts empty)")
    evaluation, dropped_eval = None, 0
    if d.eval:
        evaluation = load_table(d.eval, d.eval_split, "data.eval")
        check_columns(evaluation, columns, "data.eval", d.eval, cfg)
        evaluation, dropped_eval = drop_empty(evaluation, d.text_column)
        if len(evaluation) == 0:
            raise DataError(f"data.eval: '{d.eval}' has no usable rows (empty file or all texts empty)")
        if cfg.task == "seq_cls":
            check_eval_labels(train, evaluation, cfg, f"data.eval: file '{d.eval}'")
    elif d.eval_share > 0:
        parts = train.train_test_split(test_size=d.eval_share, seed=cfg.train.seed, shuffle=True)
        train, evaluation = parts["train"], parts["test"]
        if cfg.task == "seq_cls":  # a rare label can land only in the held-out share
            check_eval_labels(train, evaluation, cfg, f"data.eval_share: a row held out of '{d.train}'")
    if evaluation is not None and d.max_eval_samples:
        evaluation = evaluation.select(range(min(d.max_eval_samples, len(evaluation))))
    if evaluation is not None and len(evaluation) == 0:
        evaluation = None
    return Splits(train, evaluation, {"train_empty_text": dropped_train, "eval_empty_text": dropped_eval})


# ---------------------------------------------------------------- batch plan

@dataclass
class BatchPlan:
    """Which sample indices each rank uses at each micro-step, for a seeded shuffle per epoch.

    Global batch = micro_batch_size x grad_accum x world_size. Micro-step a of rank r in a step takes the
    slice (a * world + r) of the step's global batch, so 1 rank x 2 accum and 2 ranks x 1 accum see the
    same micro-batches. The last partial global batch of an epoch is dropped (every rank must run the same
    number of steps).
    """

    num_samples: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def micro_batches(self, perm: torch.Tensor, step_in_epoch: int) -> list[list[int]]:
        base = step_in_epoch * self.global_batch
        out = []
        for a in range(self.grad_accum):
            start = base + (a * self.world_size + self.rank) * self.micro_batch_size
            out.append(perm[start:start + self.micro_batch_size].tolist())
        return out


def eval_batches(num_samples: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """Every rank gets the same number of eval batches (FSDP's collectives need it); an empty list pads."""
    per_round = batch_size * world_size
    rounds = math.ceil(num_samples / per_round)
    out = []
    for k in range(rounds):
        start = k * per_round + rank * batch_size
        out.append(list(range(start, min(start + batch_size, num_samples))))
    return out
