"""Benchmark fsdp_ft against HF Trainer (FSDP2 through accelerate) and DeepSpeed ZeRO-2/3 in one run.

    python benchmarks/run.py --modes full,lora,qlora --repeats 3 --out runs/bench
    fsdp-ft bench --modes full --seq-len 128 --timed-steps 3 --repeats 1      # the same, through the CLI

Every system trains the same saved model, the same fixed-length samples in the same order, with the same global
batch, steps, optimizer settings and precision (benchmarks/workload.py). The systems run one after the other,
alternating over the repeats (A B C A B C ...), so slow drifts of the machine hit all of them alike. Writes
OUT/bench.json (everything), OUT/bench.md (the table), OUT/logs/ (each run's output) and OUT/bench-MODE.html
(fsdp_ft.observability.report's comparison page: the table and per-step charts of every system).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from html_page import write_pages  # noqa: E402
from summary import aggregate, comparability, markdown_table, ratios, run_numbers, table  # noqa: E402
from systems import DEFAULT_SYSTEMS, SYSTEMS, run_env, run_system  # noqa: E402
from workload import MODEL_PRESETS, Workload, prepare  # noqa: E402

MODES = ("full", "lora", "qlora")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fsdp-ft bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="full,lora,qlora", help="comma list of full, lora, qlora (default all)")
    p.add_argument("--systems", default=None,
                   help=f"comma list of {', '.join(SYSTEMS)} (default per mode: "
                        + "; ".join(f"{m}: {','.join(s)}" for m, s in DEFAULT_SYSTEMS.items()) + ")")
    p.add_argument("--model", default="smollm2-135m-shape",
                   help=f"random-init model: a preset ({', '.join(MODEL_PRESETS)}) or a folder with config.json")
    p.add_argument("--pretrained", default=None,
                   help="load weights and tokenizer from this folder instead (e.g. data/smollm2-135m-instruct, made "
                        "by `python -m fsdp_ft.prepare.smollm2 --out data`)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per system (default 2)")
    p.add_argument("--threads-per-rank", type=int, default=None,
                   help="OMP_NUM_THREADS for every rank of every system (default on CPU: cores / nproc)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--warmup-steps", type=int, default=2, help="steps run first and left out of the timing")
    p.add_argument("--timed-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="runs of each system, alternating (median reported)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16: bf16 compute, fp32 parameters (fsdp.mixed_precision=bf16 / Trainer bf16=True); "
                        "auto (default): bf16 where the hardware computes it natively (CUDA with bf16, or a CPU "
                        "with AVX512-BF16 / AMX), else fp32 — on an AVX2-only CPU a bf16 matmul is ~50x slower")
    p.add_argument("--no-reshard-after-forward", dest="reshard_after_forward", action="store_false",
                   help="fsdp_ft and hf_fsdp2 keep gathered blocks from forward to backward (ZeRO-2-like; default: "
                        "reshard, ZeRO-3-like)")
    p.add_argument("--fsdp-ft-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an fsdp_ft config override for fsdp_ft's runs only (repeatable; listed in the report), "
                        "e.g. fsdp.gather_once_per_step=true")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-flops-per-rank", type=float, default=None,
                   help="MFU denominator per rank in FLOP/s (default: fsdp_ft.observability.flops.peak_flops: the GPU's data sheet, "
                        "or a bf16/fp32 matmul measured once with one rank's threads on CPU and cached)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take before it counts as failed")
    p.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's checkpoints and exports")
    p.add_argument("--profile-step", type=int, default=None,
                   help="write torch.profiler traces of this step (1-based) of every run to RUN/profile/ "
                        "(inspection only: the profiler slows that step down)")
    return p.parse_args(argv)


def workload(args, mode: str) -> Workload:
    kw = {f.name: getattr(args, f.name) for f in fields(Workload) if hasattr(args, f.name)}
    return Workload(**{**kw, "mode": mode, "fsdp_ft_set": tuple(args.fsdp_ft_set)})


def machine(args, cuda: bool, threads: int | None) -> dict:
    import torch
    import transformers

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "cuda": cuda,
            "nproc": args.nproc, "threads_per_rank": threads, "load_average_at_start": os.getloadavg()}
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
    from importlib.metadata import PackageNotFoundError, version

    for name in ("accelerate", "deepspeed", "peft", "bitsandbytes", "torchao"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:  # an optional peer library missing: its runs fail and say so
            info[name] = "not installed"
    return info


def flops_and_peak(w: Workload, model_dir: Path, cuda: bool, threads: int | None,
                   peak_override: float | None = None) -> dict:
    """Model FLOPs per trained token and the peak FLOP/s of all ranks together, from fsdp_ft.observability.flops."""
    try:
        from fsdp_ft.observability import flops
    except ImportError as e:
        return {"note": f"no MFU: fsdp_ft.observability.flops unavailable ({e})"}
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdp_ft.config import Config
    from fsdp_ft.model import adapters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    if w.mode in ("lora", "qlora"):
        cfg = Config()
        cfg.finetune.method = "lora"
        cfg.finetune.lora.r, cfg.finetune.lora.alpha = w.lora_r, w.lora_alpha
        model = adapters.wrap(model, cfg)
    per_token = flops.train_flops_per_token(model, w.seq_len)
    if peak_override:
        peak, source = peak_override, "given by --peak-flops-per-rank"
    else:
        dtype = torch.bfloat16 if w.precision == "bf16" else torch.float32
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        before = torch.get_num_threads()
        if threads and not cuda:
            torch.set_num_threads(threads)  # one rank's share of the cores, as the ranks run
        try:
            peak, source = flops.peak_flops(device, dtype)
        finally:
            torch.set_num_threads(before)
    return {"flops_per_token": per_token, "peak_flops_per_rank": peak, "peak_flops_source": source,
            "peak_flops_total": peak * w.nproc}


def resolve_precision(requested: str, cuda: bool) -> tuple[str, str]:
    """The precision every system uses, and why."""
    if requested != "auto":
        return requested, "asked for"
    import torch

    if cuda:
        ok = torch.cuda.is_bf16_supported()
        return ("bf16" if ok else "fp32"), f"auto: {torch.cuda.get_device_name(0)} {'has' if ok else 'lacks'} bf16"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if native:
        return "bf16", f"auto: the CPU computes bf16 natively ({', '.join(native)})"
    return "fp32", ("auto: the CPU has no AVX512-BF16/AMX, where torch's bf16 matmuls run ~50x slower than fp32; "
                    "pass --precision bf16 to measure them anyway")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_case(args, mode: str, out: Path, env: dict, cuda: bool, threads: int | None) -> dict:
    w = workload(args, mode)
    systems = args.systems.split(",") if args.systems else list(DEFAULT_SYSTEMS[mode])
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"fsdp-ft bench: unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
    log(f"{mode}: preparing model and {w.steps * w.global_batch} samples of {w.seq_len} tokens")
    prep = prepare(w, out / "work")
    fl = flops_and_peak(w, prep.model_dir, cuda, threads, args.peak_flops_per_rank)
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    for rep in range(args.repeats):
        for system in systems:  # A B C A B C: machine drift is shared by all systems
            name = f"{mode}-{system}-r{rep + 1}"
            res = run_system(system, w, prep, out / "runs" / name, out / "logs" / f"{name}.log", env,
                             args.timeout, args.keep_runs, args.profile_step)
            if "error" not in res:
                try:
                    res["numbers"] = run_numbers(res, w.warmup_steps, fl.get("flops_per_token"),
                                                 fl.get("peak_flops_total"))
                except ValueError as e:
                    res["error"] = str(e)
            if "error" in res:
                log(f"{name}: FAILED after {res['wall_s']:.0f} s: {res['error']}")
            else:
                n = res["numbers"]
                log(f"{name}: {n['tokens_per_s']:.1f} tokens/s, median step {n['median_step_s']:.3f} s, "
                    f"peak {n['peak_mem_bytes'] / 1e9:.2f} GB/rank, loss@1 {res['losses'].get(1, float('nan')):.4f} "
                    f"({res['wall_s']:.0f} s)")
            runs[system].append(res)
    agg = {s: aggregate(r) for s, r in runs.items()}
    return {"workload": w.key(), "tokens_per_step": w.tokens_per_step, "model_dir": str(prep.model_dir),
            "train_jsonl": str(prep.train_jsonl), "samples_json": str(prep.samples_json),
            "block_class": prep.block_class, "flops": fl, "systems": agg, "ratios": ratios(agg),
            "comparability": comparability(agg, w.tokens_per_step), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"fsdp-ft bench: unknown mode(s) {bad}; choose from {list(MODES)}")
    import torch

    cuda = torch.cuda.is_available()
    args.precision, precision_why = resolve_precision(args.precision, cuda)
    log(f"precision {args.precision} ({precision_why})")
    threads = args.threads_per_rank or (None if cuda else max(1, (os.cpu_count() or 1) // args.nproc))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = run_env(threads, cuda)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:] if argv is None else argv,
              "machine": machine(args, cuda, threads), "precision": args.precision,
              "precision_reason": precision_why,
              "token_count": "every token of every sample: seq_len x global batch per step (samples have no padding)",
              "timing": "per optimizer step, from the end of the previous step's logging to the end of the "
                        "optimizer update; tokens/s = timed tokens / timed seconds; warm-up steps left out",
              "memory": "peak GPU memory allocated per rank (whole process)" if cuda else
                        "peak host RSS per rank (ru_maxrss, whole process life up to the end of training)",
              "cases": {}}
    for mode in modes:
        report["cases"][mode] = run_case(args, mode, out, env, cuda, threads)
        (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))  # partial results survive
    md = markdown_table(report)
    report["table"] = md
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "bench.md").write_text(_markdown_page(report, md))
    pages = write_pages(report, out, *table(report))
    print(md)
    log(f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + "".join(f", {p}" for p in pages))
    return 0


def _markdown_page(report: dict, md_table: str) -> str:
    m = report["machine"]
    lines = ["# fsdp_ft benchmark", "", f"- started {report['started']}; command: "
             f"`python benchmarks/run.py {' '.join(report['argv'])}`",
             f"- machine: {m['platform']}, {m['cpu_count']} cores" + (f", {m['gpu']}" if m.get("gpu") else "")
             + f"; torch {m['torch']}, transformers {m['transformers']}, accelerate {m['accelerate']}, "
             f"deepspeed {m['deepspeed']}, peft {m['peft']}, bitsandbytes {m['bitsandbytes']}",
             f"- {m['nproc']} ranks per system, {m['threads_per_rank']} threads per rank; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}",
             f"- precision: {report['precision']} ({report['precision_reason']})",
             f"- tokens counted: {report['token_count']}", f"- timing: {report['timing']}",
             f"- memory: {report['memory']}", ""]
    for mode, case in report["cases"].items():
        w, c = case["workload"], case["comparability"]
        lines.append(f"- {mode}: seq {w['seq_len']}, global batch {w['micro_batch_size']} x {w['grad_accum']} x "
                     f"{w['nproc']}, {w['warmup_steps']} warm-up + {w['timed_steps']} timed steps, {w['precision']}, "
                     f"FSDP reshard after forward: {w['reshard_after_forward']}; "
                     + (f"fsdp_ft only: {' '.join(w['fsdp_ft_set'])}; " if w.get("fsdp_ft_set") else "")
                     + f"same tokens per step: {c['same_tokens_per_step']}; step-1 loss relative to fsdp_ft: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in c["step1_loss_rel_diff_vs_fsdp_ft"].items()))
        if case["flops"].get("note"):
            lines.append(f"  - {case['flops']['note']}")
    return "\n".join(lines + ["", md_table, ""])


if __name__ == "__main__":
    sys.exit(main())
