"""benchmarks/gpu_targets.py, the short script for a lent GPU: its model shapes are the published models' and its
code path runs (on CPU with tiny shapes), so device time is not spent finding a typo."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_targets  # noqa: E402


@pytest.mark.parametrize("shape,params", [
    (gpu_targets.LLAMA_32_1B_SHAPE, 1_235_814_400),  # Llama-3.2-1B: 1.24B (tied embeddings)
    (gpu_targets.LLAMA_3_8B_SHAPE, 8_030_261_248),   # Llama-3-8B: 8.03B
])
def test_shapes_have_the_published_parameter_counts(shape, params):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in shape.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(shape["model_type"], **fields))
    assert sum(p.numel() for p in model.parameters()) == params


def test_smoke_run_trains_both_targets_with_their_settings(tmp_path):
    assert gpu_targets.main(["--out", str(tmp_path), "--smoke", "--steps", "3", "--warmup-steps", "1"]) == 0
    results = json.loads((tmp_path / "gpu_targets.json").read_text())["results"]
    for name, (method, micro, checkpointed) in {"full-1b": ("full", 4, False), "qlora-8b": ("qlora", 2, True)}.items():
        r = results[name]
        rows = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        setup = next(x for x in rows if x.get("split") == "setup")
        steps = [x for x in rows if "split" not in x]
        cfg = yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())
        assert (cfg["finetune"]["method"], cfg["train"]["micro_batch_size"]) == (method, micro)
        assert (setup["checkpointed"] == setup["blocks"]) is checkpointed
        assert (max(setup["quantized_bytes_per_rank"]) > 0) is (method == "qlora")
        # packed rows: each step's tokens (the rows' `tokens` count all seen so far) nearly fill micro x seq
        assert r["tokens_per_step"] == [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + steps, steps)]
        assert all(0.75 * 64 * micro <= t <= 64 * micro for t in r["tokens_per_step"]), r["tokens_per_step"]
        # timed = steps after the warm-up; tokens/s is their tokens over their seconds
        timed, counts = steps[1:], r["tokens_per_step"][1:]
        want = sum(counts) / sum(n / x["tokens_per_s"] for n, x in zip(counts, timed))
        assert r["timed_steps"] == 2 and r["tokens_per_s"] == pytest.approx(want)
        assert r["peak_mem_gib"] * 2**30 == max(x["peak_mem_bytes"] for x in steps)
