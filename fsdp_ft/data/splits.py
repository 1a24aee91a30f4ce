"""Training data: load rows (local files or hub ids through `datasets`), validate, and plan batches.

The batch plan is pure index arithmetic over a seeded per-epoch permutation, so the data position is two
integers (epoch, step in epoch): resume restores it exactly without replaying the loader, and the global
batch is the same samples whatever the number of ranks.
"""
from __future__ import annotations

import codecs
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
        if fmt != "parquet":
            check_utf8(p, f"config key '{key}': data file '{path}'")
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


def check_utf8(path: str | Path, what: str, chunk: int = 1 << 24) -> None:
    """Fail, naming the line and byte, when a text data file is not UTF-8. `datasets` does not check: a latin-1
    byte in a .jsonl reaches Arrow as is and fails with a bare UnicodeDecodeError (or decodes wrongly) when rows are
    first read, far from the file; the fallback readers here replace bad bytes silently. One streaming pass."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    start = newlines = 0  # byte offset of the chunk in the file, and newlines before it
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk's end
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                offset = start - pending + e.start
                line = newlines + data[:max(offset - start, 0)].count(b"\n") + 1
                bad = (e.object[e.start:e.end] or b"?")[:4].hex(" ")
                raise DataError(f"{what} is not UTF-8 text: line {line}, byte offset {offset} (0x{bad}: {e.reason}); "
                                "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not data:
                return
            start += len(data)
            newlines += data.count(b"\n")


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
    except RecursionError:  # json is recursive: `[[[[...` a few thousand deep exhausts the stack
        if text.lstrip().startswith("["):
            return _too_deep(text, 1)
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError as e:
                return f"line {n} is not valid JSON: {e.msg} (column {e.colno})"
            except RecursionError:
                return _too_deep(line, n)
    return None


MAX_JSON_DEPTH = 500  # rows nest a few levels (chat messages: 3); Python's and Arrow's parsers stop near 1000


def _too_deep(text: str, first_line: int) -> str:
    """Where JSON `text` (starting at line `first_line`) first nests deeper than MAX_JSON_DEPTH."""
    depth, line = 0, first_line
    for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"|[\[\]{}\n]', text):
        token = m.group()
        if token == "\n":
            line += 1
        elif token in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return f"line {line} nests JSON deeper than {MAX_JSON_DEPTH} levels (arrays or objects in each other)"
        elif token in "]}":
            depth -= 1
    return f"JSON from line {first_line} on nests too deeply for the parser (arrays or objects in each other)"


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
    if d is not None and cfg.task == "causal_lm":  # the SFT formats' columns (fsdp_ft.data.formats)
        for name in ("prompt_column", "completion_column", "messages_column"):
            if getattr(d, name) == col or (name == "messages_column" and col in ("messages", "conversations")):
                return f"data.{name}"
        if col in ("instruction", "output"):
            return "data.format (alpaca rows need instruction and output)"
    for name in ("prompt_column", "chosen_column", "rejected_column"):
        if cfg is not None and getattr(cfg.preference, name) == col:
            return f"preference.{name}"
    return "data.text_column / data.label_column"


@dataclass
class Splits:
    train: object
    eval: object | None
    dropped: dict


# ---------------------------------------------------------------- row validation: drop, count, or fail

class BadRow(Exception):
    """Raised by a task's `prepare` for a malformed row (index within the table it was given); load_splits turns
    it into a DataError naming the file and the row."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index
        self.message = message


class Drops:
    """Rows left out of one split, by reason, with the first offending row of each (and what was wrong with it)."""

    def __init__(self, reasons: tuple[str, ...] = ()):
        self.counts = {r: 0 for r in reasons}
        self.first: dict[str, tuple[int, str]] = {}

    def add(self, reason: str, index: int, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, (index, detail))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Source:
    """Where a split's rows come from: the config key, the file, and each row's 0-based row in that file."""
    key: str
    path: str
    rows: list[int] | None = None  # None: row i of the table is row i of the file

    def row(self, index: int) -> int:
        return (self.rows[index] if self.rows is not None else index) + 1


def _default_prepare(table, split: str, cfg: Config, columns: list[str], known_labels: set | None):
    """Tasks without their own `prepare`: drop rows with empty text and (seq_cls eval) labels training never shows
    (they have no class id). The table keeps its type; dropped rows are counted."""
    d = cfg.data
    drops = Drops(("empty_text",) + (("unknown_label",) if known_labels is not None else ()))
    texts = table[d.text_column] if d.text_column in columns else None
    labels = table[d.label_column] if known_labels is not None else None
    keep = []
    for i in range(len(table)):
        if texts is not None and not (isinstance(texts[i], str) and texts[i].strip()):
            drops.add("empty_text", i)
        elif labels is not None and not _label_known(labels[i], known_labels, cfg.model.num_labels):
            drops.add("unknown_label", i, f"label {labels[i]!r} (column '{d.label_column}') that data.train never "
                                          f"uses; training labels: {sorted(known_labels)[:20]}")
        else:
            keep.append(i)
    return (table if len(keep) == len(table) else table.select(keep)), drops


def _label_known(v, known: set, num_labels: int | None) -> bool:
    in_range = num_labels is not None and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_labels
    return str(v) in known or in_range


def _checked(rows, drops: Drops, total: int, source: Source, split: str, cfg: Config) -> dict[str, int]:
    """Fail when more than data.max_drop_share of a split would be dropped; else the counts for the setup row."""
    share = cfg.data.max_drop_share
    if total and (drops.total > share * total or drops.total == total):
        parts = []
        for reason, n in sorted(drops.counts.items(), key=lambda kv: -kv[1]):
            if n:
                index, detail = drops.first[reason]
                parts.append(f"{reason} {n} (first: row {source.row(index)}{': ' + detail if detail else ''})")
        raise DataError(f"{source.key}: file '{source.path}': {drops.total} of {total} rows would be dropped "
                        f"({100 * drops.total / total:.1f}%, more than data.max_drop_share={share:g}): "
                        f"{'; '.join(parts)}")
    return {f"{split}_{reason}": n for reason, n in drops.counts.items()}


def prepare_rows(task, table, split: str, source: Source, cfg: Config, columns: list[str], known_labels=None):
    """The task's rows for one split (its own `prepare`, or the default drops), with the drop counts checked."""
    prepare = getattr(task, "prepare", None)
    try:
        if prepare is not None:
            rows, drops = prepare(table, split)
        else:
            rows, drops = _default_prepare(table, split, cfg, columns, known_labels)
    except BadRow as e:
        raise DataError(f"{source.key}: file '{source.path}' row {source.row(e.index)}: {e.message}") from None
    return rows, _checked(rows, drops, len(table), source, split, cfg)


def _carve(table, share: float, seed: int):
    """Hold out `share` of the training rows with a fixed seed; also returns each part's rows in the file."""
    marked = table.add_column("__fsdp_ft_row__", list(range(len(table))))
    parts = marked.train_test_split(test_size=share, seed=seed, shuffle=True)
    rows = [parts[k]["__fsdp_ft_row__"] for k in ("train", "test")]
    return (parts["train"].remove_columns("__fsdp_ft_row__"), parts["test"].remove_columns("__fsdp_ft_row__"),
            *rows)


def load_splits(cfg: Config, task, check_rows=None) -> Splits:
    """Train and eval rows, checked, with rows that cannot train dropped and counted per split and reason.

    `task` is the task object, or just the list of columns it needs. The task's optional hooks:
    `resolve_format(column_names)` (decide the row format from the training file's columns, before `columns()`),
    `check_rows(table, source)` (its own checks on whole files, raising a DataError naming file and row), and
    `prepare(table, split) -> (rows, Drops)` (validate and encode every row once, e.g. tokenize and pack; raise
    BadRow for a malformed row). A split of which more than data.max_drop_share would be dropped fails, naming
    the file, the reasons and the first offending row of each.
    """
    d = cfg.data
    train = load_table(d.train, d.train_split, "data.train")
    if hasattr(task, "resolve_format"):
        task.resolve_format(train.column_names)
    columns = task.columns() if hasattr(task, "columns") else list(task)
    check_rows = check_rows or getattr(task, "check_rows", None)
    check_columns(train, columns, "data.train", d.train, cfg)
    if check_rows is not None:
        check_rows(train, f"data.train: file '{d.train}'")
    train_source, evaluation, eval_source = Source("data.train", d.train), None, None
    if d.eval:
        evaluation = load_table(d.eval, d.eval_split, "data.eval")
        check_columns(evaluation, columns, "data.eval", d.eval, cfg)
        if check_rows is not None:
            check_rows(evaluation, f"data.eval: file '{d.eval}'")
        eval_source = Source("data.eval", d.eval)
    elif d.eval_share > 0:
        train, evaluation, train_rows, eval_rows = _carve(train, d.eval_share, cfg.train.seed)
        train_source = Source("data.train", d.train, train_rows)
        eval_source = Source("data.eval_share (rows held out of data.train)", d.train, eval_rows)
    train, dropped = prepare_rows(task, train, "train", train_source, cfg, columns)
    if evaluation is not None:
        known = None
        if cfg.task == "seq_cls":  # a label training never shows has no class id
            known = {str(v) for v in train[d.label_column]}
        evaluation, dropped_eval = prepare_rows(task, evaluation, "eval", eval_source, cfg, columns, known)
        dropped.update(dropped_eval)
        if d.max_eval_samples:
            evaluation = evaluation.select(range(min(d.max_eval_samples, len(evaluation))))
    return Splits(train, evaluation, dropped)


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
