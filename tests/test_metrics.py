"""metrics.jsonl rows carry the contract's keys with consistent values; TensorBoard gets the same scalars."""
from __future__ import annotations

import math

import pytest

from conftest import FAST, TINY
from fsdp_ft.config import load_config
from fsdp_ft.engine import train
from fsdp_ft.metrics import read_metrics


def test_metrics_rows_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(load_config(TINY, [f"output_dir={out}", *FAST, "train.max_steps=4", "train.log_every=2",
                             "train.eval_every=2", "train.tensorboard=true",
                             "optim.warmup_steps=2", "optim.lr=3e-3"]))
    rows = read_metrics(out)
    setup = [r for r in rows if r.get("split") == "setup"]
    trains = [r for r in rows if "split" not in r]
    evals = [r for r in rows if r.get("split") == "eval"]
    assert len(setup) == 1 and setup[0]["trainable_params"] == setup[0]["total_params"]
    assert [r["step"] for r in trains] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for r in trains:
        for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_bytes"):
            assert key in r, key
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
    assert trains[1]["tokens"] > trains[0]["tokens"] > 0  # cumulative
    # the rate each logged step used: end of the 2-step warmup, then half-way down the cosine over steps 3-4
    assert [r["lr"] for r in trains] == [pytest.approx(3e-3), pytest.approx(1.5e-3)]
    for r in evals:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in trains]
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
