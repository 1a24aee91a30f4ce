"""Sequence classification: eval metrics (accuracy, macro F1, confusion matrix) summed over ranks, and the best
checkpoint by a chosen metric kept on disk, exported as final/, and remembered across a resume."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cls_helpers import CLS, EVAL_ROWS, classifier_run, eval_file_rows, export_step, hand_metrics, train_here
from conftest import FAST, TINY, cli, eval_rows
from fsdp_ft.checkpoint.dcp_checkpoint import list_checkpoints
from fsdp_ft.observability.metrics import read_metrics
from fsdp_ft.tasks.seq_cls import SeqClsTask, classification_metrics, confusion_from_sums

SAMPLE = ["Open the file and return a stream.", "Send the data to the socket.", "Split the string at commas."]


@pytest.fixture(scope="module")
def run(session_tmp):
    return classifier_run(session_tmp)


def _final_row(out):
    return [r for r in read_metrics(out) if r.get("split") == "final"][-1]


@torch.no_grad()
def _logits(model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return torch.cat([model(**tok(t, return_tensors="pt")).logits for t in SAMPLE])


class _FixedLogits(torch.nn.Module):
    """Stands in for a classifier: returns the logits it was given (the metric arithmetic is under test)."""

    def __init__(self, logits):
        super().__init__()
        self.out = logits

    def forward(self, input_ids, attention_mask):
        return type("Output", (), {"logits": self.out})()


def test_metrics_from_confusion_counts_match_a_hand_count():
    """eval_sums' per-cell counts summed over two 'ranks' give the hand-counted matrix, accuracy and macro F1;
    a label that is neither true nor predicted does not count in the macro average (as scikit-learn's)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (40,), generator=g)  # label 3 ('d') never occurs
    logits = torch.randn(40, 4, generator=g)
    logits[:, 3] -= 100  # ... and is never predicted
    pred = logits.argmax(-1)
    task = SeqClsTask(cfg=None, tokenizer=None)
    task.label2id = {n: i for i, n in enumerate("abcd")}
    sums = {}
    for part in (slice(0, 25), slice(25, 40)):  # two ranks' shares, summed as the trainer's all-reduce does
        batch = {"input_ids": torch.zeros(1), "attention_mask": torch.zeros(1), "labels": labels[part]}
        for k, v in task.eval_sums(_FixedLogits(logits[part]), batch).items():
            sums[k] = sums.get(k, 0) + float(v)
    got = task.metrics(sums)
    matrix = [[int(((labels == t) & (pred == p)).sum()) for p in range(4)] for t in range(4)]
    f1 = []
    for c in range(3):
        tp = int(((labels == c) & (pred == c)).sum())
        precision, recall = tp / max(int((pred == c).sum()), 1), tp / int((labels == c).sum())
        f1.append(2 * precision * recall / (precision + recall) if tp else 0.0)
    assert got["confusion_matrix"] == {"labels": list("abcd"), "matrix": matrix}
    assert got["accuracy"] == pytest.approx(float((pred == labels).float().mean()))
    assert got["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))
    assert 0 < got["f1_macro"] < 1 and got["accuracy"] > 0  # a mixed case, not all right or all wrong
    assert classification_metrics(confusion_from_sums(sums, 4)) == {k: got[k] for k in ("accuracy", "f1_macro")}


@pytest.mark.distributed
def test_two_rank_eval_metrics_equal_hand_count_with_exported_model(run, tmp_path):
    """Each logged eval row (2 ranks) equals a hand count from the exported checkpoint of that step."""
    rows = eval_file_rows()
    evals = {r["step"]: r for r in eval_rows(run)}
    checked = 0
    for step, _ in list_checkpoints(run):
        want = hand_metrics(export_step(run, step, tmp_path / f"step-{step}"), rows)
        got = evals[step]
        assert got["confusion_matrix"] == {"labels": want["labels"], "matrix": want["matrix"]}, step
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
        assert got["f1_macro"] == pytest.approx(want["f1_macro"], abs=1e-12)
        assert sum(map(sum, want["matrix"])) == EVAL_ROWS
        checked += 1
    assert checked == 2  # the best and the newest checkpoint (keep_last=1)
    last = evals[max(evals)]["confusion_matrix"]["matrix"]
    assert sum(1 for col in zip(*last) if sum(col)) >= 2  # the trained model predicts more than one label


@pytest.mark.distributed
def test_best_checkpoint_is_kept_and_becomes_final(run, tmp_path):
    evals = eval_rows(run)
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    best_step = max(evals, key=lambda r: r["loss"])["step"]  # best_mode=max of loss (see cls_helpers.CLS)
    last_step = evals[-1]["step"]
    assert best_step != last_step  # later checkpoints are worse: the case under test
    assert [r["best_step"] for r in evals] == [max(evals[:i + 1], key=lambda r: r["loss"])["step"]
                                               for i in range(len(evals))]
    assert all(r["is_best"] == (r["best_step"] == r["step"]) for r in evals)
    # keep_last=1 keeps the newest; the best is never pruned
    assert [s for s, _ in list_checkpoints(run)] == sorted({best_step, last_step})
    assert _final_row(run)["final_from_step"] == best_step and _final_row(run)["best_metric"] == "loss"
    final = _logits(run / "final")
    torch.testing.assert_close(final, _logits(export_step(run, best_step, tmp_path / "best")), rtol=0, atol=0)
    assert not torch.allclose(final, _logits(export_step(run, last_step, tmp_path / "last")), atol=1e-4)


def test_best_choice_survives_resume(tmp_path):
    """A run resumed with more steps still knows its best step (from the checkpoint's state): it keeps that
    checkpoint and exports it, instead of ranking only the evals after the resume."""
    out = tmp_path / "resume"
    args = [*CLS, "train.eval_every=1", "optim.schedule=constant", "optim.warmup_steps=0", "data.max_eval_samples=16"]
    train_here(out, *args, "train.max_steps=3")
    first = eval_rows(out)
    train_here(out, *args, "train.max_steps=6")
    evals = {r["step"]: r for r in eval_rows(out)}  # the resumed run's rows follow the first run's
    assert sorted(evals) == [1, 2, 3, 4, 5, 6] and [r["step"] for r in first] == [1, 2, 3]
    best_step = max(evals.values(), key=lambda r: r["loss"])["step"]
    assert best_step <= 3  # the best came before the resume: the case under test
    assert evals[6]["best_step"] == best_step
    assert [s for s, _ in list_checkpoints(out)] == [best_step, 6]
    assert _final_row(out)["final_from_step"] == best_step
    state = json.loads((out / "checkpoints" / "step-6" / "state.json").read_text())
    assert state["best"] == {"metric": "loss", "mode": "max", "step": best_step, "value": evals[best_step]["loss"]}


@pytest.mark.parametrize("metric,mode", [("loss", "min"), ("accuracy", "max")])
def test_best_mode_auto_is_min_for_loss_and_max_for_accuracy(tmp_path, metric, mode):
    """train.best_mode=auto (the default): the smallest eval loss, the largest accuracy. The expected best step is
    the argmin / argmax (the earlier step on ties) of the logged eval rows, after each eval and at the end; the
    series is checked to have its best at another step than its worst, so the opposite mode would fail."""
    args = [a for a in CLS if not a.startswith(("train.best_mode=", "train.best_metric="))]
    out = train_here(tmp_path / metric, *args, f"train.best_metric={metric}", "train.max_steps=12",
                     "train.eval_every=2")
    evals = eval_rows(out)
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10, 12]
    pick = min if mode == "min" else max

    def best(rows):  # the first step holding the extreme value
        value = pick(r[metric] for r in rows)
        return next(r["step"] for r in rows if r[metric] == value)

    worst = (max if mode == "min" else min)
    assert best(evals) != next(r["step"] for r in evals if r[metric] == worst(e[metric] for e in evals))
    assert [r["best_step"] for r in evals] == [best(evals[:i + 1]) for i in range(len(evals))]
    assert all(r["is_best"] == (r["best_step"] == r["step"]) for r in evals)
    assert _final_row(out)["final_from_step"] == best(evals)
    state = json.loads((out / "checkpoints" / "step-12" / "state.json").read_text())
    assert state["best"]["mode"] == mode and state["best"]["step"] == best(evals)


def test_best_metric_config_errors(tmp_path):
    """Unknown metric for the task, or no eval data: one-line errors naming the key, before any training."""
    unknown = cli("train", str(TINY), f"output_dir={tmp_path / 'a'}", *FAST, *CLS, "train.best_metric=bleu",
                  check=False)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "train.best_metric" in unknown.stderr and "f1_macro" in unknown.stderr
    assert not list_checkpoints(tmp_path / "a")
    no_eval = cli("train", str(TINY), f"output_dir={tmp_path / 'b'}", *FAST, *CLS, "data.eval=null", check=False)
    assert no_eval.returncode == 2 and "train.best_metric" in no_eval.stderr and "data.eval" in no_eval.stderr


def test_the_bare_final_folder_evaluates_as_the_classifier_it_is(run):
    """final/ names the class that was trained (the base config names none), so `fsdp-ft eval` of
    the folder alone, without the run's config, scores it as a classifier: the numbers the run folder gives."""
    from cls_helpers import EVAL_FILE

    arch = json.loads((run / "final" / "config.json").read_text())["architectures"]
    assert arch == ["LlamaForSequenceClassification"]
    bare, whole = (json.loads(cli("eval", str(folder), "--data", str(EVAL_FILE), "train.seq_len=64").stdout)
                   for folder in (run / "final", run))
    assert "accuracy" in bare and bare["accuracy"] == whole["accuracy"] and bare["f1_macro"] == whole["f1_macro"]
