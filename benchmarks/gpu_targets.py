"""The GPU targets of docs/benchmarks.md, in one short run for a lent GPU machine.

    python benchmarks/gpu_targets.py --out runs/gpu-targets            # on a CUDA machine, one GPU
    python benchmarks/gpu_targets.py --out /tmp/gt --smoke             # the same code path, tiny shapes, any device

- `full-1b`: full fine-tuning of a random-init Llama of Llama-3.2-1B's shape in bf16 (fp32 master weights), seq
  2048, micro-batch 4: MFU against the 45% target.
- `full-1b-compiled`: the same with every block compiled (`train.compile=true`; not in the default list).
- `qlora-8b`: QLoRA of a random-init Llama of Llama-3-8B's shape (NF4 base, LoRA r 8 / alpha 16 on every linear but
  the head, bf16, full activation checkpointing), seq 2048, batch 2: peak memory and tokens/s beside torchtune's
  published 7.4 GiB and 2,413 tokens/s (RTX 4090).

Each is one `fsdp-ft train` process on packed rows of the test corpus (no download; the weights are random, so no
checkpoint is read either). The first `--warmup-steps` steps are left out. Writes OUT/gpu_targets.json and prints a
markdown table. `--smoke` swaps in the tiny test model at seq 64 so that a CPU test covers this script.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from workload import MODEL_PRESETS, TEXT, TOKENIZER  # noqa: E402

# Llama-3.2-1B and Llama-3-8B (their config.json on the Hub): shapes only, random init
LLAMA_32_1B_SHAPE = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "vocab_size": 128256,
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
}
LLAMA_3_8B_SHAPE = {
    **LLAMA_32_1B_SHAPE, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "head_dim": 128, "max_position_embeddings": 8192, "tie_word_embeddings": False,
}
MFU_TARGET = 0.45
TORCHTUNE_QLORA_8B = {"peak_gib": 7.4, "tokens_per_s": 2413, "where": "torchtune's published QLoRA Llama-3-8B "
                      "figure, RTX 4090, seq 2048, batch 2"}


def targets(smoke: bool) -> dict[str, dict]:
    """name -> model shape and config overrides."""
    common = {"train.seq_len": 64 if smoke else 2048, "fsdp.mixed_precision": "bf16", "data.packing": True}
    return {
        "full-1b": {"shape": MODEL_PRESETS["tiny"] if smoke else LLAMA_32_1B_SHAPE,
                    "set": {**common, "finetune.method": "full", "train.micro_batch_size": 4}},
        # the same with every block compiled (train.compile): what torch.compile adds on this GPU
        "full-1b-compiled": {"shape": MODEL_PRESETS["tiny"] if smoke else LLAMA_32_1B_SHAPE,
                             "set": {**common, "finetune.method": "full", "train.micro_batch_size": 4,
                                     "train.compile": True}},
        "qlora-8b": {"shape": MODEL_PRESETS["tiny"] if smoke else LLAMA_3_8B_SHAPE,
                     "set": {**common, "finetune.method": "qlora", "model.dtype": "bf16", "finetune.lora.r": 8,
                             "finetune.lora.alpha": 16.0, "activation_checkpointing": "full",
                             "train.micro_batch_size": 2,
                             # the tiny model's weights hold too few 4-bit blocks for the default 256
                             **({"finetune.quant.scaler_block_size": 32} if smoke else {})}},
    }


def model_folder(out: Path, name: str, shape: dict) -> Path:
    """config.json of the shape beside the test tokenizer: enough for `model.random_init: true`."""
    folder = out / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(shape, indent=1))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def write_config(out: Path, name: str, target: dict, steps: int) -> Path:
    tree: dict = {"output_dir": str(out / "runs" / name), "task": "causal_lm",
                  "model": {"path": str(model_folder(out, name, target["shape"])), "random_init": True},
                  "data": {"train": str(TEXT)},
                  "optim": {"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"},
                  "train": {"max_steps": steps, "grad_accum": 1, "log_every": 1, "eval_every": 0, "save_every": 0,
                            "progress_bar": False}}
    for key, value in target["set"].items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = out / f"{name}.yaml"
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
    return {"device": setup.get("device"), "peak_flops": setup.get("peak_flops"),
            "peak_flops_source": setup.get("peak_flops_source"), "timed_steps": len(timed),
            "tokens_per_step": [r["step_tokens"] for r in steps],
            "tokens_per_s": sum(r["step_tokens"] for r in timed) / seconds,
            "mfu": statistics.median(mfus) if mfus else None,
            "peak_mem_gib": max(r["peak_mem_bytes"] for r in steps) / 2**30,
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"]}


def table(results: dict) -> str:
    lines = ["| target | tokens/s | MFU | peak memory / rank (GiB) | beside |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | |")
            continue
        mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        beside = (f"target MFU {100 * MFU_TARGET:.0f}%" if name.startswith("full-1b") else
                  f"torchtune {TORCHTUNE_QLORA_8B['peak_gib']} GiB, {TORCHTUNE_QLORA_8B['tokens_per_s']:,} tokens/s")
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_mem_gib']:.2f} | {beside} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu-targets")
    p.add_argument("--targets", default="full-1b,qlora-8b", help="comma list of full-1b, full-1b-compiled, qlora-8b")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600, help="seconds one target may take")
    p.add_argument("--smoke", action="store_true", help="tiny model, seq 64: checks the script on any device")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    chosen = targets(args.smoke)
    results: dict[str, dict] = {}
    for name in args.targets.split(","):
        if name not in chosen:
            p.error(f"--targets: unknown target {name!r} (known: {', '.join(chosen)})")
        config = write_config(out, name, chosen[name], args.steps)
        log = out / f"{name}.log"
        cmd = [sys.executable, "-m", "fsdp_ft.cli", "train", str(config), *args.set]
        print(f"[gpu_targets] {name}: {' '.join(cmd)}", flush=True)
        try:
            with log.open("w") as fh:
                proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout)
            if proc.returncode != 0:
                tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
                results[name] = {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
            else:
                results[name] = summarize(out / "runs" / name, args.warmup_steps)
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"timed out after {args.timeout:.0f} s"}
        print(f"[gpu_targets] {name}: {json.dumps(results[name])}", flush=True)
    (out / "gpu_targets.json").write_text(json.dumps({"results": results, "steps": args.steps,
                                                      "warmup_steps": args.warmup_steps, "smoke": args.smoke,
                                                      "torchtune_qlora_8b": TORCHTUNE_QLORA_8B}, indent=1))
    print(table(results))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
