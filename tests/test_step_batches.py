"""train.prefetch_batches: the next step's batches are built by a worker thread while this step computes, and
nothing a run computes changes (on CPU it is off by default; these tests switch it on)."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from conftest import ASSETS, FAST, losses, TINY
from fsdp_ft.observability.metrics import read_metrics
from fsdp_ft.training.step_batches import StepBatches, enabled


class Builder:
    """Builds one tensor per position and records which thread built what."""

    def __init__(self, fail_at=None):
        self.calls: list[tuple[tuple[int, int], str]] = []
        self.fail_at = fail_at

    def __call__(self, position):
        self.calls.append((position, threading.current_thread().name))
        if position == self.fail_at:
            raise ValueError(f"bad row at {position}")
        return [{"input_ids": torch.tensor([position[0], position[1]])}]


def test_default_is_on_for_gpus_only():
    assert enabled(None, torch.device("cuda", 0)) and not enabled(None, torch.device("cpu"))
    assert enabled(True, torch.device("cpu")) and not enabled(False, torch.device("cuda", 0))


def test_next_step_is_built_by_the_worker_and_handed_over():
    build = Builder()
    loader = StepBatches(build, torch.device("cpu"), prefetch=True)
    try:
        first = loader.get((0, 0), (0, 1))
        second = loader.get((0, 1), (1, 0))
        third = loader.get((1, 0), None)
        loader.wait()
    finally:
        loader.close()
    assert [b[0]["input_ids"].tolist() for b in (first, second, third)] == [[0, 0], [0, 1], [1, 0]]
    positions = [p for p, _ in build.calls]
    assert positions == [(0, 0), (0, 1), (1, 0)]  # each position built once; nothing built past the last step
    threads = [t for _, t in build.calls]
    assert threads[0] == threading.main_thread().name and all(t.startswith("fsdp_ft-batches") for t in threads[1:])


def test_a_prefetched_position_the_run_does_not_reach_is_dropped():
    build = Builder()
    loader = StepBatches(build, torch.device("cpu"), prefetch=True)
    try:
        loader.get((0, 0), (0, 1))
        got = loader.get((0, 5), None)  # e.g. a resumed or re-planned position
    finally:
        loader.close()
    assert got[0]["input_ids"].tolist() == [0, 5]
    assert [p for p, _ in build.calls] == [(0, 0), (0, 1), (0, 5)]


def test_a_worker_error_surfaces_when_its_step_is_asked_for():
    build = Builder(fail_at=(0, 1))
    loader = StepBatches(build, torch.device("cpu"), prefetch=True)
    try:
        loader.get((0, 0), (0, 1))
        with pytest.raises(ValueError, match=r"bad row at \(0, 1\)"):
            loader.get((0, 1), (0, 2))
    finally:
        loader.close()


def test_without_prefetch_everything_is_built_on_the_main_thread():
    build = Builder()
    loader = StepBatches(build, torch.device("cpu"), prefetch=False)
    loader.get((0, 0), (0, 1))
    loader.get((0, 1), None)
    loader.close()
    assert build.calls == [((0, 0), threading.main_thread().name), ((0, 1), threading.main_thread().name)]


@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_prefetching_changes_no_number(tmp_path, monkeypatch, task):
    """A run crossing an epoch boundary, evaluating between steps (seq_cls tokenizes at encode time, so the worker
    and the evaluation share a tokenizer), trains bit-equal with and without the worker, and the setting is the
    one that decides who builds: with train.prefetch_batches=true every step after the first is built by the
    worker thread, with false every step is built on the main thread. (Runs in this process, so the trainer's
    batch builder can be watched.)"""
    from fsdp_ft.api import train
    from fsdp_ft.config import load_config
    from fsdp_ft.training.trainer import Trainer

    built: list[tuple[tuple[int, int], str]] = []
    real = Trainer._host_step_batches

    def watched(self, position):
        built.append((position, threading.current_thread().name))
        return real(self, position)

    monkeypatch.setattr(Trainer, "_host_step_batches", watched)
    data = ASSETS / "data" / ("tiny_cls_train.jsonl" if task == "seq_cls" else "tiny_text_train.jsonl")
    rows = data.read_text().splitlines()[:60]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    # 60 rows, 8 per step: 7 steps an epoch, so step 8 starts the second epoch's order
    common = [*FAST, f"task={task}", f"data.train={tmp_path / 'train.jsonl'}", "train.micro_batch_size=4",
              "train.grad_accum=2", "train.max_steps=10", "train.eval_every=3", "data.max_eval_samples=24"]
    if task == "seq_cls":
        common.append(f"data.eval={ASSETS / 'data' / 'tiny_cls_eval.jsonl'}")
    runs, builders = {}, {}
    for setting in ("true", "false"):
        out = tmp_path / f"prefetch-{setting}"
        built.clear()
        train(load_config(TINY, [f"output_dir={out}", *common, f"train.prefetch_batches={setting}"]))
        runs[setting], builders[setting] = read_metrics(out), list(built)
    positions = [(0, i) for i in range(7)] + [(1, 0), (1, 1), (1, 2)]  # each step's position, built once
    main = threading.main_thread().name
    assert [p for p, _ in builders["true"]] == [p for p, _ in builders["false"]] == positions
    assert builders["true"][0][1] == main and all(t.startswith("fsdp_ft-batches") for _, t in builders["true"][1:])
    assert all(t == main for _, t in builders["false"]), builders["false"]
    assert losses(tmp_path / "prefetch-true") == losses(tmp_path / "prefetch-false")
    assert len(losses(tmp_path / "prefetch-true")) == 10
    evals = {k: [json.dumps(r, sort_keys=True) for r in v if r.get("split") == "eval"] for k, v in runs.items()}
    assert evals["true"] == evals["false"] and len(evals["true"]) == 4  # steps 3, 6, 9 and the end
    assert max(r.get("epoch", 0) for r in runs["true"]) == 1
