"""The GPU targets of docs/benchmarks.md, sized for a lent GPU's few minutes (benchmarks/gpu_check.sh runs them).

    python benchmarks/gpu_targets.py --out /tmp/gt --targets qlora-7b,full-1b   # one CUDA GPU
    python benchmarks/gpu_targets.py --out /tmp/gt --smoke                      # the same code, tiny shapes, any device

- `qlora-7b`: configs/qlora_7b_colab.yaml as it stands (NF4 base, LoRA r 64 on every linear but the head, fp16
  compute, its micro-batch), with full activation checkpointing and no offload pinned where it says auto on random-init Llama-2-7B-shaped models, seq 2048.
  Building 32 blocks would take most of the time on set-up, so it trains stacks of 2 and 4 blocks of that shape
  and extrapolates the peak memory linearly in depth: per block = (peak(4) - peak(2)) / 2, 32 blocks =
  peak(4) + 28 x per block. Beside it, `fsdp-ft plan`'s prediction for the same 4-block run (measured against
  predicted, nothing extrapolated) and for the whole model.
- `full-1b`: full fine-tuning of a random-init Llama of Llama-3.2-1B's shape in bf16 (fp32 master weights), seq
  2048, micro-batch 4: MFU against the 45% target.
- `full-1b-compiled`: the same with every block compiled (`train.compile=true`), on fewer steps.

Each training is one `fsdp-ft train` process on packed rows of the test corpus (no download, no checkpoint read);
the first `--warmup-steps` steps are left out. Results go to `--json` (default OUT/gpu_targets.json) after every
training, merged with what an earlier call wrote there, so a part cut off by a time limit loses only itself.
`--smoke` swaps in the tiny test model at seq 64 so that CI runs this code on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from workload import MODEL_PRESETS, TEXT, TOKENIZER  # noqa: E402

# Llama-3.2-1B and Llama-2-7B (their config.json on the Hub): shapes only, random init
LLAMA_32_1B_SHAPE = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "vocab_size": 128256,
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
}
LLAMA_2_7B_SHAPE = {
    **LLAMA_32_1B_SHAPE, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 4096, "vocab_size": 32000,
    "tie_word_embeddings": False, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}
COLAB = REPO / "configs" / "qlora_7b_colab.yaml"
STACKS = (2, 4)  # blocks in the two short stacks the QLoRA peak is extrapolated from
MFU_TARGET = 0.45
TARGETS = ("qlora-7b", "full-1b", "full-1b-compiled")
STEPS = {"qlora-7b": (4, 1), "full-1b": (8, 3), "full-1b-compiled": (6, 3)}  # (steps, warm-up steps)


def plan_of(name: str, smoke: bool) -> dict:
    """name -> base YAML (None: a minimal one), model shape, config overrides."""
    seq = 64 if smoke else 2048
    common = {"train.seq_len": seq, "data.packing": True, "train.grad_accum": 1, "train.global_batch_size": None}
    if name == "qlora-7b":
        colab = yaml.safe_load(COLAB.read_text())
        return {"base": COLAB, "shape": MODEL_PRESETS["tiny"] if smoke else LLAMA_2_7B_SHAPE,
                # the micro-batch stays the recipe's (what its memory estimate is for); one micro-batch a step
                "set": {**common, "train.micro_batch_size": colab["train"]["micro_batch_size"],
                        # pinned where the recipe says auto: auto would decide per stack depth, and the 2- and
                        # 4-block peaks must share one setting for the extrapolation (full: the most frugal)
                        "activation_checkpointing": "full", "fsdp.cpu_offload": False,
                        "data.eval": None, "train.eval_every": 0, "train.save_every": 0,
                        # fp16 matmuls crawl on CPUs
                        **({"fsdp.mixed_precision": "fp32"} if smoke else {})}}
    return {"base": None, "shape": MODEL_PRESETS["tiny"] if smoke else LLAMA_32_1B_SHAPE,
            "set": {**common, "fsdp.mixed_precision": "bf16", "finetune.method": "full", "train.micro_batch_size": 4,
                    "optim.lr": 1e-4, "optim.warmup_steps": 0, "optim.schedule": "constant",
                    **({"train.compile": True} if name == "full-1b-compiled" else {})}}


def model_folder(out: Path, name: str, shape: dict) -> Path:
    """config.json of the shape beside the test tokenizer: enough for `model.random_init: true`."""
    folder = out / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(shape, indent=1))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def write_config(out: Path, run: str, spec: dict, shape: dict, steps: int) -> Path:
    """The run's YAML: the base config (or a minimal one) with the model, data, steps and overrides set."""
    tree: dict = yaml.safe_load(spec["base"].read_text()) if spec["base"] else {"task": "causal_lm"}
    settings = {"output_dir": str(out / "runs" / run), "model.path": str(model_folder(out, run, shape)),
                "model.random_init": True, "data.train": str(TEXT), "train.max_steps": steps, "train.log_every": 1,
                "train.eval_every": 0, "train.save_every": 0, "train.progress_bar": False,
                "resume": "none", **spec["set"]}
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = out / f"{run}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def summarize(run_dir: Path, warmup: int) -> dict:
    """Timed steps' tokens/s (timed tokens over timed seconds), median MFU, and the run's peak memory per rank."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    setup = next(r for r in rows if r.get("split") == "setup")
    steps = [r for r in rows if "split" not in r and "tokens_per_s" in r]
    seen = [0] + [r["tokens"] for r in steps]  # a row's `tokens` counts every token seen so far (log_every 1)
    for r, before in zip(steps, seen):
        r["step_tokens"] = r["tokens"] - before
    timed = [r for r in steps if r["step"] > warmup] or steps
    seconds = sum(r["step_tokens"] / r["tokens_per_s"] for r in timed)
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    out = {"device": setup.get("device"), "peak_flops": setup.get("peak_flops"),
           "peak_flops_source": setup.get("peak_flops_source"), "timed_steps": len(timed),
           "tokens_per_step": [r["step_tokens"] for r in steps],
           "tokens_per_s": sum(r["step_tokens"] for r in timed) / seconds,
           "mfu": statistics.median(mfus) if mfus else None,
           "peak_mem_gib": max(r["peak_mem_bytes"] for r in steps) / 2**30,
           "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"]}
    reserved = [r["peak_mem_reserved_bytes"] for r in steps if r.get("peak_mem_reserved_bytes")]
    if reserved:
        out["peak_reserved_gib"] = max(reserved) / 2**30
    return out


def train(out: Path, run: str, spec: dict, shape: dict, steps: int, warmup: int, extra: list[str],
          timeout: float) -> dict:
    """One `fsdp-ft train` process; its summary, or {"error": ...} with the end of its log printed."""
    config = write_config(out, run, spec, shape, steps)
    log = out / f"{run}.log"
    cmd = [sys.executable, "-m", "fsdp_ft.cli", "train", str(config), *extra]
    print(f"[gpu_targets] {run}: {' '.join(cmd)}", flush=True)
    try:
        with log.open("w") as fh:
            proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()
        print("\n".join(f"  | {line}" for line in tail[-25:]), flush=True)
        return {"error": f"exit {proc.returncode}: {(tail or ['no output'])[-1][:300]}"}
    return summarize(out / "runs" / run, warmup)


def start_plan(out: Path, run: str, config: Path) -> subprocess.Popen:
    """`fsdp-ft plan --json` of a written config for one GPU, in the background (CPU work beside the GPU runs)."""
    log = (out / f"{run}.plan.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "fsdp_ft.cli", "plan", str(config), "--nproc", "1", "--device",
                             "cuda", "--json"], cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)


def plan_peak_gib(proc: subprocess.Popen, timeout: float) -> float | None:
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
    lines = stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None
    return json.loads(lines[-1])["prediction"]["peak_bytes"] / 2**30


def qlora_7b(out: Path, smoke: bool, steps: int, warmup: int, extra: list[str], timeout: float, record) -> dict:
    """Two short stacks of the Colab recipe, the depth extrapolation, and the planner beside both."""
    spec = plan_of("qlora-7b", smoke)
    full, depth = spec["shape"], LLAMA_2_7B_SHAPE["num_hidden_layers"]
    plans = {}
    for n, layers in (("stack", STACKS[-1]), ("model", depth)):  # the 4-block run itself, and the whole model
        config = write_config(out, f"qlora-7b-plan-{n}", spec, {**full, "num_hidden_layers": layers}, steps)
        plans[n] = start_plan(out, f"qlora-7b-plan-{n}", config)
    result: dict = {"stacks": {}, "depth": depth, "note": (
        f"trained {' and '.join(map(str, STACKS))}-block stacks; the {depth}-block peak is extrapolated linearly "
        "in depth, not measured")}
    for layers in STACKS:
        run = train(out, f"qlora-7b-{layers}l", spec, {**full, "num_hidden_layers": layers}, steps, warmup, extra,
                    timeout)
        result["stacks"][str(layers)] = run
        record(result)
        if "error" in run:
            result["error"] = f"{layers} blocks: {run['error']}"
            break
    if "error" not in result:
        lo, hi = (result["stacks"][str(n)]["peak_mem_gib"] for n in STACKS)
        per_block = (hi - lo) / (STACKS[1] - STACKS[0])
        result.update(per_block_gib=per_block, peak_mem_gib=hi + (depth - STACKS[1]) * per_block,
                      tokens_per_s=result["stacks"][str(STACKS[1])]["tokens_per_s"],
                      mfu=result["stacks"][str(STACKS[1])]["mfu"])
    result["planned_stack_gib"] = plan_peak_gib(plans["stack"], 120)
    result["planned_model_gib"] = plan_peak_gib(plans["model"], 120)
    measured = result["stacks"].get(str(STACKS[-1]), {}).get("peak_mem_gib")
    if measured and result["planned_stack_gib"]:  # the planner against a GPU, nothing extrapolated
        result["plan_over_measured_stack"] = result["planned_stack_gib"] / measured
    return result


def run_target(name: str, out: Path, args, record) -> dict:
    steps, warmup = (args.steps, args.warmup_steps) if args.steps else (3, 1) if args.smoke else STEPS[name]
    if name == "qlora-7b":
        return qlora_7b(out, args.smoke, steps, warmup, args.set, args.timeout, record)
    spec = plan_of(name, args.smoke)
    return train(out, name, spec, spec["shape"], steps, warmup, args.set, args.timeout)


def table(results: dict) -> str:
    lines = ["| target | tokens/s | MFU | peak memory / rank (GiB) | beside |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r or "peak_mem_gib" not in r:  # failed, or cut off before its last training
            lines.append(f"| {name} | {r.get('error') or 'not finished'} | | | |")
            continue
        mfu = "–" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        if name == "qlora-7b":
            planned = r.get("planned_model_gib")
            ratio = r.get("plan_over_measured_stack")
            beside = (f"tokens/s, MFU of the {STACKS[-1]}-block stack; memory: {r['depth']} blocks extrapolated "
                      f"({r['per_block_gib']:.3f} GiB/block), plan "
                      + (f"{planned:.2f} GiB" if planned is not None else "failed")
                      + (f" (plan / measured on the {STACKS[-1]}-block stack: {ratio:.3f})" if ratio else ""))
        else:
            beside = f"target MFU {100 * MFU_TARGET:.0f}%"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.2f} | {beside} |")
    return "\n".join(lines)


def write_results(path: Path, results: dict, smoke: bool) -> None:
    """Merge into what is there (another part of the check may have written it) and replace atomically."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("results", {}).update(results)
    data["smoke"] = smoke
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def print_env() -> None:
    """What the machine runs: GPU, driver and the versions of everything the check exercises."""
    import importlib
    import platform

    import torch

    print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
          "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")
    for name in ("transformers", "peft", "torchao", "datasets", "accelerate", "bitsandbytes"):
        try:
            print(name, importlib.import_module(name).__version__)
        except Exception as e:  # a missing optional package is a finding, not a failure
            print(name, "missing:", type(e).__name__, str(e)[:120])
    try:
        print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        print("nvidia-smi: not available")


def print_summary(out: Path) -> None:
    """The GPU tests' counts (pytest's junit XML) and the targets' table, for gpu_check's summary.md."""
    import xml.etree.ElementTree as ET

    if (out / "gpu_tests.xml").is_file():
        suite = ET.parse(out / "gpu_tests.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        print(f"\nGPU tests: {suite.get('tests')} run, {suite.get('failures')} failed, {suite.get('errors')} errors, "
              f"{suite.get('skipped')} skipped")
    if (out / "gpu_targets.json").is_file():
        print("\n" + table(json.loads((out / "gpu_targets.json").read_text())["results"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu-targets", help="working folder: models, configs, runs, logs")
    p.add_argument("--json", help="results file (default OUT/gpu_targets.json), merged with an existing one")
    p.add_argument("--targets", default="qlora-7b,full-1b", help=f"comma list of {', '.join(TARGETS)}")
    p.add_argument("--steps", type=int, help="steps per training (default per target: " + ", ".join(
        f"{k} {s} with {w} warm-up" for k, (s, w) in STEPS.items()) + ")")
    p.add_argument("--warmup-steps", type=int, default=1, help="with --steps: steps left out of the timing")
    p.add_argument("--timeout", type=float, default=600, help="seconds one training may take")
    p.add_argument("--smoke", action="store_true", help="tiny model, seq 64: checks the script on any device")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    p.add_argument("--env", action="store_true", help="print the machine's GPU and package versions, and stop")
    p.add_argument("--summary", metavar="DIR", help="print the results gpu_check left in DIR, and stop")
    args = p.parse_args(argv)
    if args.env or args.summary:
        print_env() if args.env else print_summary(Path(args.summary))
        return 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.json).resolve() if args.json else out / "gpu_targets.json"
    names = args.targets.split(",")
    for name in names:
        if name not in TARGETS:
            p.error(f"--targets: unknown target {name!r} (known: {', '.join(TARGETS)})")
    results: dict[str, dict] = {}
    for name in names:
        results[name] = run_target(name, out, args, lambda partial, n=name: write_results(path, {n: partial},
                                                                                           args.smoke))
        write_results(path, {name: results[name]}, args.smoke)
        print(f"[gpu_targets] {name}: {json.dumps(results[name])}", flush=True)
    print(table(results))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
