"""Training data files: .json, .csv, .parquet and .pq load the same rows in the same order as .jsonl (so a run
trains on the same batches, step for step); data.text_pair_column feeds both texts to a classifier; the last
partial global batch of an epoch is dropped. Hub datasets need the network and are not tested here.

Runs are 1-process runs of a few steps in this process (cls_helpers.train_here)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cls_helpers import train_here
from conftest import ASSETS, eval_rows, losses
from fsdp_ft.observability.metrics import read_metrics

DATA = ASSETS / "data"
TOKENIZER = ASSETS / "tiny-llama"
SEQ_LEN = 64  # FAST's train.seq_len
STEPS = ["train.max_steps=4"]  # 4 steps x 8 rows drawn from a shuffle of all 1500: any other row order shows


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(rows: list[dict], path: Path) -> Path:
    """The rows in the format of path's suffix, written with the standard tools of each format (not `datasets`)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":  # one JSON document: a list of records
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:  # .parquet, .pq
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory):
    return train_here(tmp_path_factory.mktemp("fmt") / "jsonl", *STEPS)


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet", ".pq"])
def test_each_format_loads_the_same_rows_and_trains_like_jsonl(jsonl_run, tmp_path, suffix):
    """The file's rows, read back by the loader, are the .jsonl rows in the same order (texts with commas and
    quotes included), and a run on them logs the .jsonl run's losses bit for bit, at every step and at eval."""
    from fsdp_ft.data.splits import load_table

    train_rows, eval_rows_ = _read(DATA / "tiny_text_train.jsonl"), _read(DATA / "tiny_text_eval.jsonl")
    assert any('"' in r["text"] for r in train_rows) and any("," in r["text"] for r in train_rows)  # CSV quoting
    train = write_rows(train_rows, tmp_path / f"train{suffix}")
    evaluation = write_rows(eval_rows_, tmp_path / f"eval{suffix}")
    assert [dict(r) for r in load_table(str(train), "train", "data.train")] == train_rows

    out = train_here(tmp_path / "run", *STEPS, f"data.train={train}", f"data.eval={evaluation}")
    want = losses(jsonl_run)
    assert sorted(want) == [1, 2, 3, 4] and len(set(want.values())) == 4
    assert losses(out) == want
    assert [(r["step"], r["loss"]) for r in eval_rows(out)] == [(r["step"], r["loss"]) for r in eval_rows(jsonl_run)]


# ---------------------------------------------------------------- text pairs

def _pair_rows(src: Path, shift: int) -> list[dict]:
    """Each row's text paired with the text `shift` rows on (a different paragraph), keeping the row's label."""
    rows = _read(src)
    return [{"text": r["text"], "text2": rows[(i + shift) % len(rows)]["text"], "label": r["label"]}
            for i, r in enumerate(rows)]


def _cls(train: Path, evaluation: Path, *extra: str) -> list[str]:
    return [f"model.path={TOKENIZER}", "task=seq_cls", f"data.train={train}", f"data.eval={evaluation}",
            "data.max_eval_samples=16", "train.micro_batch_size=4", "train.max_steps=3", *extra]


def test_text_pair_column_feeds_both_texts(tmp_path):
    """With data.text_pair_column each row is encoded as the tokenizer encodes (text, pair) (checked on the
    collated first micro-batch against the HF tokenizer called directly); both texts are in the ids; and the run's
    losses differ from the same file trained on the first text alone."""
    from fsdp_ft.config import load_config
    from fsdp_ft.data.splits import BatchPlan, load_splits
    from fsdp_ft.model.build import load_tokenizer, resolve_model_dir
    from fsdp_ft.tasks import get_task

    train = write_rows(_pair_rows(DATA / "tiny_cls_train.jsonl", 7), tmp_path / "pairs_train.jsonl")
    evaluation = write_rows(_pair_rows(DATA / "tiny_cls_eval.jsonl", 7), tmp_path / "pairs_eval.jsonl")
    single = train_here(tmp_path / "single", *_cls(train, evaluation))
    pair = train_here(tmp_path / "pair", *_cls(train, evaluation, "data.text_pair_column=text2"))
    a, b = losses(single), losses(pair)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(abs(a[s] - b[s]) > 1e-4 * abs(a[s]) for s in a), (a, b)  # step 1 too: same weights, other inputs
    assert eval_rows(single)[-1]["loss"] != pytest.approx(eval_rows(pair)[-1]["loss"], rel=1e-4)

    # the batch the pair run's first step trains on, built by the task as the trainer builds it
    cfg = load_config(pair / "config.yaml")
    task = get_task(cfg, load_tokenizer(cfg, resolve_model_dir(cfg)))
    rows = load_splits(cfg, task).train
    names = task.labels(rows)
    plan = BatchPlan(len(rows), 4, 1, 1, 0, cfg.train.seed)
    idx = plan.micro_batches(plan.permutation(0), 0)[0]
    batch = task.collate([task.encode(rows[i]) for i in idx])
    hf = AutoTokenizer.from_pretrained(TOKENIZER)
    for j, i in enumerate(idx):
        row = rows[i]
        want = hf(row["text"], row["text2"], truncation=True, max_length=SEQ_LEN)["input_ids"]
        assert want != hf(row["text"], truncation=True, max_length=SEQ_LEN)["input_ids"]
        assert batch["input_ids"][j, :len(want)].tolist() == want
        assert int(batch["attention_mask"][j].sum()) == len(want)
        assert names[int(batch["labels"][j])] == row["label"]

    # rows short enough not to be truncated hold both texts' tokens, whole
    def contains(ids: list[int], part: list[int]) -> bool:
        return any(ids[k:k + len(part)] == part for k in range(len(ids) - len(part) + 1))

    checked = 0
    for i in range(len(rows)):
        first, second = (hf(rows[i][c], add_special_tokens=False)["input_ids"] for c in ("text", "text2"))
        if len(first) + len(second) + 4 > SEQ_LEN:
            continue
        ids = task.encode(rows[i])["input_ids"]
        assert contains(ids, first) and contains(ids, second), i
        checked += 1
    assert checked >= 5


# ---------------------------------------------------------------- the last partial global batch

def test_last_partial_global_batch_of_each_epoch_is_dropped(tmp_path):
    """11 rows, global batch 2 x 2 = 4, 2 epochs: floor(11/4) = 2 steps per epoch (not 3), 4 steps in all; each
    step's logged tokens are exactly its 4 rows' tokens (rows of the epoch's shuffle, 4 at a time, the last 3 rows
    of each shuffle never seen), so no step trains on a partial batch or on rows of the next epoch."""
    from fsdp_ft.data.splits import BatchPlan

    hf = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = [r for r in _read(DATA / "tiny_cls_train.jsonl")
            if len(hf(r["text"])["input_ids"]) < SEQ_LEN][:11]  # untruncated: a row's tokens are its own length
    n, global_batch, epochs = len(rows), 4, 2
    lengths = [len(hf(r["text"])["input_ids"]) for r in rows]
    train = write_rows(rows, tmp_path / "train.jsonl")
    labels = {r["label"] for r in rows}
    evaluation = write_rows([r for r in _read(DATA / "tiny_cls_eval.jsonl") if r["label"] in labels][:8],
                            tmp_path / "eval.jsonl")
    out = train_here(tmp_path / "run", f"model.path={TOKENIZER}", "task=seq_cls", f"data.train={train}",
                     f"data.eval={evaluation}", "train.max_steps=0", f"train.epochs={epochs}",
                     "train.micro_batch_size=2", "train.grad_accum=2")
    per_epoch = n // global_batch
    assert (n, per_epoch) == (11, 2)
    trains = [r for r in read_metrics(out) if "split" not in r]
    setup = next(r for r in read_metrics(out) if r.get("split") == "setup")
    assert setup["total_steps"] == epochs * per_epoch
    assert [r["step"] for r in trains] == [1, 2, 3, 4]
    assert [r["epoch"] for r in trains] == [0, 1, 1, 2]  # the epoch after each step: it ends every 2 steps
    assert [r["step"] for r in eval_rows(out)] == [2, 4]  # train.eval_every=0: at each epoch's end

    step_tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *trains], trains)]
    plan = BatchPlan(n, 2, 2, 1, 0, 0)
    want = []
    for epoch in range(epochs):
        perm = plan.permutation(epoch).tolist()
        assert sorted(perm) == list(range(n))
        seen = perm[:per_epoch * global_batch]
        assert len(set(seen)) == 8 and sum(lengths[i] for i in perm[8:]) > 0  # 3 rows left out of this epoch
        want += [sum(lengths[i] for i in seen[s * global_batch:(s + 1) * global_batch]) for s in range(per_epoch)]
    assert step_tokens == want
    assert sum(step_tokens) < epochs * sum(lengths)
