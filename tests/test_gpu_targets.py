"""benchmarks/gpu_check.sh and gpu_targets.py, the short run for a lent GPU: its model shapes are the published
models', and the whole script runs here on the CPU (`--smoke`), so device time is not spent finding a typo."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_targets  # noqa: E402


def llama_params_by_hand(shape: dict) -> int:
    """Embedding (and an untied head), per block q, k, v, o, gate, up, down and two RMSNorm weights, final norm."""
    h, inter, layers, vocab = (shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "vocab_size"))
    hd = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    block = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    return vocab * h * (1 if shape.get("tie_word_embeddings") else 2) + layers * block + h


@pytest.mark.parametrize("shape,params", [
    # meta-llama/Llama-3.2-1B: the Hub's count of the tensors in its model.safetensors (bf16, one file, no index;
    # the model page rounds it to "1.24B params", the model card's table says 1B (1.23B)); tied embeddings
    (gpu_targets.LLAMA_32_1B_SHAPE, 1_235_814_400),
    # meta-llama/Llama-2-7b-hf: model.safetensors.index.json "total_size": 13,476,839,424 bytes = 2 bytes x
    # 6,738,415,616 fp16 weights + 8,192 bytes of the 32 layers' rotary_emb.inv_freq buffers (64 fp32 values each,
    # which that index also lists); the model card's "7B"
    (gpu_targets.LLAMA_2_7B_SHAPE, 6_738_415_616),
])
def test_shapes_have_the_published_parameter_counts(shape, params):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in shape.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(shape["model_type"], **fields))
    assert sum(p.numel() for p in model.parameters()) == params == llama_params_by_hand(shape)


def gpu_check(out, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], cwd=REPO, text=True,
                          capture_output=True, timeout=900,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env})
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def summary_rows(out) -> dict[str, str]:
    """summary.md's table of parts: name -> how it ended."""
    text = (out / "summary.md").read_text()
    table = text[text.index("| part |"):].split("\n\n")[0].splitlines()[2:]
    return {row.split("|")[1].strip(): row.split("|")[2].strip() for row in table}


def test_smoke_check_runs_every_part_with_the_recipes_settings(tmp_path):
    """`gpu_check.sh --smoke`: env, the GPU tests (all skip on a CPU), the Colab QLoRA recipe on 2- and 4-block
    stacks with the depth extrapolation and the planner beside it, the 1B full fine-tune; compile dropped."""
    out, work = tmp_path / "out", tmp_path / "work"
    gpu_check(out, "--smoke", "--no-compile", GPU_CHECK_WORK=str(work))
    assert summary_rows(out) == {"env": "ok", "gpu-tests": "ok", "qlora-7b": "ok", "full-1b": "ok",
                                 "full-1b-compiled": "skipped: --no-compile"}
    assert f"torch {torch.__version__}" in (out / "env.txt").read_text()
    assert "<testsuite" in (out / "gpu_tests.xml").read_text()
    results = json.loads((out / "gpu_targets.json").read_text())["results"]
    q = results["qlora-7b"]
    lo, hi = (q["stacks"][str(n)]["peak_mem_gib"] for n in gpu_targets.STACKS)
    assert q["per_block_gib"] == pytest.approx((hi - lo) / 2) and q["peak_mem_gib"] == pytest.approx(
        hi + (32 - 4) * q["per_block_gib"])
    assert q["planned_stack_gib"] > 0 and q["planned_model_gib"] > q["planned_stack_gib"]
    colab = yaml.safe_load((REPO / "configs" / "qlora_7b_colab.yaml").read_text())
    for run, method, micro in (("qlora-7b-2l", "qlora", colab["train"]["micro_batch_size"]),
                               ("qlora-7b-4l", "qlora", colab["train"]["micro_batch_size"]), ("full-1b", "full", 4)):
        cfg = yaml.safe_load((work / "targets" / "runs" / run / "config.yaml").read_text())
        assert (cfg["finetune"]["method"], cfg["train"]["micro_batch_size"]) == (method, micro)
        if method == "qlora":  # the recipe as it stands: adapters, base type, checkpointing
            lora = {k: cfg["finetune"]["lora"][k] for k in colab["finetune"]["lora"]}
            assert (lora, cfg["finetune"]["quant"]["type"]) == (colab["finetune"]["lora"],
                                                                colab["finetune"]["quant"]["type"])
            # the recipe says auto; the benchmark pins full so that both stack depths share one setting
            assert colab["activation_checkpointing"] == "auto" and cfg["activation_checkpointing"] == "full"
    full = results["full-1b"]
    # packed rows: each step's tokens nearly fill micro-batch x seq 64; tokens/s is timed tokens over timed seconds
    assert full["timed_steps"] == 2 and all(0.75 * 64 * 4 <= t <= 64 * 4 for t in full["tokens_per_step"])
    assert "| qlora-7b |" in (out / "summary.md").read_text() and "GPU tests:" in (out / "summary.md").read_text()


def test_parts_without_time_left_are_skipped_and_say_so(tmp_path):
    """The budget cuts every part's limit to what is left; a part that cannot get its minimum is skipped."""
    gpu_check(tmp_path, "--smoke", GPU_CHECK_BUDGET_S="12", check=False)  # env may time out in 12 s
    rows = summary_rows(tmp_path)
    assert [rows[p].split(":")[0] for p in ("gpu-tests", "qlora-7b", "full-1b", "full-1b-compiled")] == ["skipped"] * 4


def test_results_merge_part_by_part(tmp_path):
    """Each part (and each finished training of one) lands in the results file at once, beside what earlier
    parts wrote: a later time-out loses only itself."""
    path = tmp_path / "gpu_targets.json"
    gpu_targets.write_results(path, {"qlora-7b": {"stacks": {"2": {"peak_mem_gib": 1.0}}}}, smoke=True)
    gpu_targets.write_results(path, {"full-1b": {"error": "timed out after 70 s"}}, smoke=True)
    assert json.loads(path.read_text())["results"] == {"qlora-7b": {"stacks": {"2": {"peak_mem_gib": 1.0}}},
                                                       "full-1b": {"error": "timed out after 70 s"}}
    assert "not finished" in gpu_targets.table(json.loads(path.read_text())["results"])
