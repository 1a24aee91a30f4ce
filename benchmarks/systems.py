"""How each system is launched for one benchmark run, and how its raw output becomes one common result.

Every run is a fresh set of processes (torchrun with N ranks) with the same thread count per rank, so no
system inherits another's warm caches or memory. A common result holds, per optimizer step: seconds, global
tokens and loss; and per rank: peak memory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from workload import REPO, Prepared, Workload

PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "hf_trainer.py"
PEERS = {  # system name -> backend of the HF Trainer peer script
    "hf_fsdp2": "fsdp2",   # transformers Trainer + accelerate FSDP2 (fully_shard), like fsdp_ft
    "ds_zero2": "zero2",   # transformers Trainer + DeepSpeed ZeRO-2
    "ds_zero3": "zero3",   # transformers Trainer + DeepSpeed ZeRO-3
    "hf_ddp": "ddp",       # transformers Trainer + DDP (replicated model): the usual QLoRA recipe
}
SYSTEMS = ("fsdp_ft", *PEERS)
DEFAULT_SYSTEMS = {"full": ("fsdp_ft", "hf_fsdp2", "ds_zero2", "ds_zero3"),
                   "lora": ("fsdp_ft", "hf_fsdp2", "ds_zero2", "ds_zero3"),
                   "qlora": ("fsdp_ft", "hf_fsdp2", "hf_ddp")}
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(threads_per_rank: int | None, cuda: bool) -> dict:
    """The same environment for every system: threads per rank, no inherited rank variables, quiet hubs."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    if threads_per_rank:
        env["OMP_NUM_THREADS"] = str(threads_per_rank)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator; it falls back to gloo without oneCCL
    return env


# ---------------------------------------------------------------- fsdp_ft

def fsdp_ft_config(w: Workload, prep: Prepared, path: Path) -> Path:
    """The YAML fsdp_ft trains from: same model folder, texts, batch, steps and optimizer as the peers."""
    import yaml

    finetune = {"method": w.mode}
    if w.mode in ("lora", "qlora"):
        finetune["lora"] = {"r": w.lora_r, "alpha": w.lora_alpha, "dropout": 0.0}
    if w.mode == "qlora":
        finetune["quant"] = {"scaler_block_size": w.qlora_scaler_block or "auto"}
    cfg = {
        "task": "causal_lm",
        "model": {"path": str(prep.model_dir), "random_init": False, "dtype": "fp32"},
        # plain text, each row's first seq_len tokens, no packing: the samples the peers get as token ids
        "data": {"train": str(prep.train_jsonl), "format": "text", "truncation": "keep_start", "packing": False},
        "finetune": finetune,
        "fsdp": {"mixed_precision": w.precision, "reshard_after_forward": w.reshard_after_forward},
        "optim": {"lr": w.lr, "warmup_steps": 0, "schedule": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"max_steps": w.steps, "micro_batch_size": w.micro_batch_size, "grad_accum": w.grad_accum,
                  "seq_len": w.seq_len, "seed": w.seed, "log_every": 1, "eval_every": 0, "save_every": 0,
                  "progress_bar": False},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fsdp_ft_command(w: Workload, config: Path, run_dir: Path, profile_step: int | None = None) -> list[str]:
    profile = [f"train.profile_steps=[{profile_step},{profile_step}]"] if profile_step else []
    return [sys.executable, "-m", "fsdp_ft.cli", "run", "--nproc-per-node", str(w.nproc), str(config),
            f"output_dir={run_dir}", *w.fsdp_ft_set, *profile]


def read_fsdp_ft(run_dir: Path) -> dict:
    """Per step from metrics.jsonl: seconds = new tokens / tokens_per_s (the trainer's own step timer)."""
    from fsdp_ft.observability.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if "split" not in r and "loss" in r]
    if not rows:
        raise RuntimeError(f"no training rows in {run_dir / 'metrics.jsonl'}")
    step_s, tokens, losses, before = [], [], {}, 0
    for r in rows:
        new = r["tokens"] - before
        before = r["tokens"]
        tokens.append(new)
        step_s.append(new / r["tokens_per_s"])
        losses[r["step"]] = r["loss"]
    setup = next((r for r in read_metrics(run_dir) if r.get("split") == "setup"), {})
    return {"step_s": step_s, "tokens": tokens, "losses": losses,
            "peak_mem_bytes_per_rank": rows[-1]["peak_mem_bytes_per_rank"],
            "trainable_params": setup.get("trainable_params"),
            "optimizer": "AdamW (torch, fused)",
            "wrapping": f"fully_shard per block ({setup.get('blocks')} x {setup.get('block_class')}) and root"}


# ---------------------------------------------------------------- peers

def peer_spec(w: Workload, prep: Prepared, system: str, run_dir: Path, profile_step: int | None = None) -> Path:
    spec = {"backend": PEERS[system], "mode": w.mode, "model_dir": str(prep.model_dir),
            "samples": str(prep.samples_json), "block_class": prep.block_class, "result_dir": str(run_dir),
            "micro_batch_size": w.micro_batch_size, "grad_accum": w.grad_accum, "max_steps": w.steps,
            "lr": w.lr, "warmup_steps": 0, "schedule": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0,
            "betas": [0.9, 0.999], "eps": 1e-8, "precision": w.precision, "seed": w.seed,
            "lora": {"r": w.lora_r, "alpha": w.lora_alpha, "dropout": 0.0, "target_modules": "all-linear"},
            "reshard_after_forward": w.reshard_after_forward, "profile_step": profile_step}
    path = run_dir / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def peer_command(w: Workload, spec: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={w.nproc}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(PEER_SCRIPT), str(spec)]


def read_peer(run_dir: Path, nproc: int) -> dict:
    ranks = []
    for r in range(nproc):
        path = run_dir / f"rank-{r}.json"
        if not path.is_file():
            raise RuntimeError(f"rank {r} wrote no result ({path.name})")
        ranks.append(json.loads(path.read_text()))
    mem_key = "peak_gpu_allocated_bytes" if "peak_gpu_allocated_bytes" in ranks[0] else "peak_host_rss_bytes"
    # a step ends when the slowest rank ends it: take the max over ranks of each step's seconds
    step_s = [max(x) for x in zip(*(r["step_s"] for r in ranks))]
    tokens = [sum(x) for x in zip(*(r["tokens"] for r in ranks))]
    return {"step_s": step_s, "tokens": tokens, "losses": {int(k): v for k, v in ranks[0]["losses"].items()},
            "peak_mem_bytes_per_rank": [r[mem_key] for r in ranks],
            "trainable_params": ranks[0].get("trainable_params"),
            "optimizer": f"{ranks[0].get('optimizer')} ({ranks[0].get('optim_name')})",
            "wrapping": f"{ranks[0].get('wrapping')} ({ranks[0].get('distributed_type')})"}


# ---------------------------------------------------------------- one run

def failure_reason(log: str) -> str:
    """The most telling line of a failed run's output: the last exception line, else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        ln = re.sub(r"^\[rank\d+\]:\s*", "", ln)
        if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln) and "ChildFailedError" not in ln:
            return ln[:400]
    return (lines[-1] if lines else "no output")[:400]


def run_system(system: str, w: Workload, prep: Prepared, run_dir: Path, log_path: Path, env: dict,
               timeout_s: float, keep: bool = False, profile_step: int | None = None) -> dict:
    """Launch one system once; returns its common result, or {'error': reason} when it failed."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    if system == "fsdp_ft":
        cmd = fsdp_ft_command(w, fsdp_ft_config(w, prep, run_dir.parent / f"{run_dir.name}.yaml"), run_dir,
                              profile_step)
    else:
        cmd = peer_command(w, peer_spec(w, prep, system, run_dir, profile_step))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\ntimed out after {timeout_s:.0f} s"
        code = -1
    wall = time.perf_counter() - t0
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"$ {' '.join(cmd)}\n{output}")
    result = {"system": system, "wall_s": wall, "command": cmd, "log": str(log_path)}
    if code != 0:
        ranklog = _rank_logs(run_dir)
        result["error"] = failure_reason(output + "\n" + ranklog)
        return result
    try:
        result.update(read_fsdp_ft(run_dir) if system == "fsdp_ft" else read_peer(run_dir, w.nproc))
    except (RuntimeError, KeyError, ValueError) as e:
        result["error"] = f"unreadable result: {e}"
    if not keep:  # checkpoints and exports are large and not part of the comparison
        for sub in ("checkpoints", "final", "trainer"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    return result


def _rank_logs(run_dir: Path) -> str:
    logs = sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in logs)
