"""`fsdp-ft eval`: the task's eval metrics of a trained model on a data file, in one process.

Rows go through the same code as the Trainer's evaluation: the task's row preparation and drop rules
(`splits.prepare_rows`, as for splits.eval), batches of train.eval_batch_size or train.micro_batch_size, the task's
sums and metrics. So a run's eval file gives the numbers its eval row logged for the same model.
"""
from __future__ import annotations

import torch

from fsdp_ft.data import splits
from fsdp_ft.errors import DataError
from fsdp_ft.inference.loading import LoadedModel
from fsdp_ft.model import adapters
from fsdp_ft.model.build import check_seq_len
from fsdp_ft.tasks import get_task


def _check_labels(table, column: str, label2id: dict, path: str) -> None:
    """Every row's label must be one the model knows: name the first that is not, by row."""
    for n, value in enumerate(table[column], 1):
        if value is None or str(value) not in label2id:
            what = "has no label" if value is None else f"has label {value!r}"
            raise DataError(f"--data: file '{path}' row {n} {what} (column '{column}'); the model's labels are "
                            f"{list(label2id)[:20]}")


def _rows(task, cfg, path: str):
    """The file's rows as the task prepares eval rows, with the counts of rows dropped (empty text, ...)."""
    table = splits.load_table(path, cfg.data.eval_split, "--data")
    if hasattr(task, "resolve_format"):
        task.resolve_format(table.column_names)
    columns = task.columns()
    splits.check_columns(table, columns, "--data", path, cfg)
    if getattr(task, "check_rows", None) is not None:
        task.check_rows(table, f"--data: file '{path}'")
    if cfg.task == "seq_cls":
        _check_labels(table, cfg.data.label_column, task.label2id, path)
    return splits.prepare_rows(task, table, "eval", splits.Source("--data", path), cfg, columns)


@torch.no_grad()
def evaluate_file(loaded: LoadedModel, path: str, max_samples: int | None = None) -> dict:
    cfg = loaded.cfg
    check_seq_len(cfg, adapters.base_model(loaded.model).config)  # longer rows: an index error mid-eval
    task = get_task(cfg, loaded.tokenizer)
    if cfg.task == "seq_cls":  # class ids are the model's, not re-derived from this file
        task.label2id = {name: i for i, name in enumerate(loaded.labels)}
    rows, dropped = _rows(task, cfg, path)
    n = min(max_samples, len(rows)) if max_samples else len(rows)  # the first n rows, as splits.max_eval_samples
    sums_of = getattr(task, "eval_sums", task.loss_sums)
    size = cfg.train.eval_batch_size or cfg.train.micro_batch_size
    sums: dict[str, torch.Tensor] = {}
    for idx in splits.eval_batches(n, size, 1, 0):
        batch = {k: v.to(loaded.device) for k, v in task.collate([task.encode(rows[i]) for i in idx]).items()}
        for k, v in sums_of(loaded.model, batch).items():  # summed on the device: no wait for it per batch
            sums[k] = sums.get(k, 0) + v.detach().double()
    metrics = task.metrics({k: float(v) for k, v in sums.items()})
    return {"rows": n, "dropped_rows": {k.removeprefix("eval_"): n for k, n in dropped.items()}, **metrics}
