"""`fsdp-ft` subcommands; the only argv parser in the package."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fsdp_ft.errors import UserError

TRAIN_EPILOG = "overrides: dotted keys with YAML values, e.g. optim.lr=2e-4 train.max_steps=100 output_dir=/tmp/run\n\n"
VERBOSE_HELP = ("show everything: third-party warnings that are filtered by default, optional libraries (torchao, "
                "bitsandbytes) imported even when the run does not use them, every tensor not in the checkpoint "
                "(same as FSDP_FT_VERBOSE=1; ranks and trials inherit it)")


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)


def _config_help() -> str:
    from fsdp_ft.config import help_text
    return TRAIN_EPILOG + help_text()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fsdp-ft", description="Fine-tune Hugging Face models on FSDP2.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train in this process (distributed when launched by torchrun/srun)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_help())
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.add_argument("--debug", action="store_true", help="one process, one device, deterministic algorithms, anomaly "
                   "detection, per-step logs, first batch dumped; writes to output_dir/debug")
    t.add_argument("--debug-steps", type=int, default=5, help="steps a --debug run takes (default 5)")
    _add_verbose(t)

    r = sub.add_parser("run", help="launch `train` on N local processes through torchrun",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    r.add_argument("--nproc-per-node", type=int, default=1, help="processes (ranks) on this machine")
    r.add_argument("--nnodes", type=int, default=1, help="machines taking part")
    r.add_argument("--node-rank", type=int, default=0, help="this machine's index among --nnodes")
    r.add_argument("--rdzv-endpoint", default=None,
                   help="HOST:PORT of node 0 for the rendezvous (default on one machine: a free local port)")
    r.add_argument("--shutdown-grace-s", type=float, default=600, metavar="S",
                   help="after SIGTERM/SIGUSR1/SIGUSR2 the ranks finish their step and save a checkpoint; ranks "
                        "still running S seconds after the signal are killed and the exit code says so (default "
                        "600: a 70B full fine-tune saves ~1 TB with its optimizer state, minutes at a few GB/s; "
                        "torchrun's own 30 s is not enough). SLURM kills after its KillWait (often 30 s) whatever "
                        "S is: there the save's time comes from the signal's lead (--signal-delay-s, #SBATCH "
                        "--signal=USR2@S)")
    _add_verbose(r)
    r.add_argument("config", help="YAML config file")
    r.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    _add_submit_parser(sub)
    _add_tune_parser(sub)

    e = sub.add_parser("export", help="write a Hugging Face folder from a run's sharded checkpoint")
    e.add_argument("run_dir", help="the run's output_dir")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    e.add_argument("--out", required=True, help="folder to create (must not exist)")
    e.add_argument("--merge-adapters", action="store_true",
                   help="PEFT runs: merge the adapters into the base (a dequantized base for QLoRA) and write a "
                        "plain HF model instead of a PEFT adapter folder")
    e.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    _add_verbose(e)
    _add_inference_parsers(sub)
    _add_performance_parsers(sub)
    sub.add_parser("bench", add_help=False, help="benchmark against HF Trainer (FSDP2) and DeepSpeed ZeRO-2/3: "
                   "benchmarks/run.py of a source checkout (`fsdp-ft bench --help`)")
    return p


def _add_performance_parsers(sub) -> None:
    """plan (memory before launch) and report (a run's HTML page)."""
    pl = sub.add_parser("plan", help="predict the peak memory per rank of a config (no weights loaded) and, given "
                        "a device memory size, the cheapest settings that fit",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    pl.add_argument("config", help="YAML config file")
    pl.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    pl.add_argument("--nproc", "--nproc-per-node", "--gpus-per-node", dest="nproc", type=int, default=1,
                    help="ranks per node (default 1)")
    pl.add_argument("--nodes", type=int, default=1, help="nodes (world size = nodes x nproc)")
    pl.add_argument("--gpu-mem-gb", "--gpu-memory-gib", dest="gpu_mem_gb", type=float, default=None,
                    help="memory of one device in GiB: say whether the config fits and, if not, what to change")
    pl.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="what the run trains on (default: cuda with --gpu-mem-gb or a visible GPU, else cpu)")
    pl.add_argument("--json", action="store_true", help="print the prediction(s) as JSON")
    pl.add_argument("--exact", action="store_true", help="simulate every block (slower) instead of two short "
                    "stacks extrapolated to the model's depth")

    rp = sub.add_parser("report", help="write a self-contained HTML page of a run (loss, eval metrics, lr, "
                        "tokens/s, MFU and memory over steps, and the set-up facts) or of a search (`fsdp-ft tune`: "
                        "trials, best so far, parameters, intermediate values, importances)")
    rp.add_argument("run_dir", help="the run's output_dir, or the search's")
    rp.add_argument("--out", default=None, help="HTML file to write (default RUN_DIR/report.html)")


MODEL_HELP = ("a run directory (its final/, or its newest checkpoint when there is no final/), an exported model "
              "folder, or a PEFT adapter folder (its base is loaded from adapter_config.json)")


TRUST_HELP = ("run custom modelling code from the model folder (transformers' trust_remote_code); a run folder's "
              "config.yaml alone does not switch it on: pass this only for a folder you trust")


MAX_MEMORY_HELP = ("cap the memory the weights may take per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB or cpu=2GB: "
                   "a model that does not fit is spread in order over the GPUs, then the CPU, then disk "
                   "(accelerate's big-model loading); devices not named get their free memory. Default: one GPU "
                   "when the model fits it, else spread; on a machine without a GPU the plain load")
OFFLOAD_HELP = ("where weights offloaded to disk go, in a temporary subfolder removed at the end (default: the "
                "system's temporary folder; give a large, fast disk for a big model)")


def _add_placement_options(parser) -> None:
    parser.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...", help=MAX_MEMORY_HELP)
    parser.add_argument("--offload-folder", default=None, metavar="DIR", help=OFFLOAD_HELP)


def _add_inference_parsers(sub) -> None:
    """eval / generate / predict: one process, no FSDP, on the GPU when there is one (spread when it does not
    fit)."""
    v = sub.add_parser("eval", help="the task's eval metrics (loss, accuracy, F1, confusion matrix, perplexity) "
                       "of a trained model on a data file", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="overrides: config keys of the run (or defaults), e.g. data.text_column=sentence "
                              "train.seq_len=256 task=seq_cls")
    v.add_argument("model", help=MODEL_HELP)
    v.add_argument("--data", required=True, help="data file (.jsonl/.json/.csv/.parquet) with the task's columns")
    v.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N rows")
    v.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    _add_placement_options(v)
    _add_verbose(v)
    v.add_argument("overrides", nargs="*", help="key.sub=value config overrides")

    g = sub.add_parser("generate", help="generate text from a causal LM")
    g.add_argument("model", help=MODEL_HELP)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; the completion is printed")
    src.add_argument("--prompts-file", help="a .jsonl file (--prompt-column of each row) or a text file (one prompt "
                     "per line); prints one JSON line {prompt, completion} per prompt")
    g.add_argument("--prompt-column", default="prompt", help="column of --prompts-file .jsonl rows (default prompt)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the tokenizer's chat "
                   "template and generate the assistant's answer")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling share (default 0.9)")
    g.add_argument("--top-k", type=int, default=50, help="sample among the K most likely tokens; 0: all (default 50)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, set before each prompt (default 0)")
    g.add_argument("--output", default=None, help="write the JSON lines to this file instead of stdout")
    g.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    _add_placement_options(g)
    _add_verbose(g)

    d = sub.add_parser("predict", help="label and class probabilities for each row of a JSON Lines file")
    d.add_argument("model", help=MODEL_HELP)
    d.add_argument("--input", required=True, help="JSON Lines file, one object per line with the text column")
    d.add_argument("--output", required=True, help="JSON Lines file to write: {label, score, probabilities} per row")
    d.add_argument("--text-column", default="text", help="column holding the text (default text)")
    d.add_argument("--text-pair-column", default=None, help="second text column for pair classifiers")
    d.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    d.add_argument("--max-length", type=int, default=None,
                   help="truncate to this many tokens (default: the run's train.seq_len, else the model's limit)")
    d.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    _add_placement_options(d)
    _add_verbose(d)


def _add_submit_parser(sub) -> None:
    s = sub.add_parser("submit", help="submit `train` to SLURM through submitit (one task per GPU; requeues itself "
                       "on preemption / time limit)", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=TRAIN_EPILOG)
    s.add_argument("config", help="YAML config file")
    s.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    s.add_argument("--nodes", type=int, default=1, help="nodes")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task (rank) per GPU")
    s.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: GPUs per node, or 1)")
    s.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per rank")
    s.add_argument("--mem-gb", type=float, default=None, help="memory per node in GiB")
    s.add_argument("--partition", default=None, help="SLURM partition")
    s.add_argument("--account", default=None, help="SLURM account")
    s.add_argument("--qos", default=None, help="SLURM quality of service")
    s.add_argument("--time", type=int, default=60, help="time limit in minutes (default 60)")
    s.add_argument("--constraint", default=None, help="node features (sbatch --constraint)")
    s.add_argument("--exclusive", action="store_true", help="whole nodes only")
    s.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE", help="extra sbatch option (repeat)")
    s.add_argument("--setup", action="append", default=[], metavar="LINE", help="shell line run before srun (repeat)")
    s.add_argument("--signal-delay-s", type=int, default=120,
                   help="seconds before the time limit at which the job checkpoints and requeues itself")
    s.add_argument("--job-name", default="fsdp-ft", help="SLURM job name")
    s.add_argument("--folder", default=None, help="submitit folder (pickles, SLURM logs); default output_dir/logs/slurm")
    s.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one array task per combination, each in output_dir/KEY=V (repeat for a grid)")
    s.add_argument("--tune", action="store_true", help="a hyper-parameter search instead of one run: the study is "
                   "created here, then a job array of --parallel tasks (one node each) pull trials from it until "
                   "--trials COMPLETE + PRUNED (docs/tuning.md)")
    s.add_argument("--parallel", type=int, default=1, help="--tune: array tasks pulling trials at once")
    s.add_argument("--trials", type=int, default=None, help="--tune: the study's budget (default tune.trials)")
    _add_verbose(s)
    s.add_argument("--storage", default=None, help="--tune: study storage URL (default output_dir/study.journal on "
                   "the shared file system)")
    s.add_argument("--timeout", type=float, default=None, metavar="S", help="--tune: ask no new trial after S s")
    s.add_argument("--space", default=None, help="--tune: YAML file holding the tune: section")
    s.add_argument("--stale-after-s", type=float, default=120.0, metavar="S",
                   help="--tune: take over a trial whose worker gave no heartbeat for S seconds")
    s.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    s.add_argument("--wait", action="store_true", help="wait for the job(s) to end; non-zero exit if one failed")


def _add_tune_parser(sub) -> None:
    u = sub.add_parser("tune", help="hyper-parameter search with Optuna over the config's tune: section; each trial "
                       "an ordinary run (N ranks) in output_dir/trials/NNNN", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=TRAIN_EPILOG + "the search space, objective, sampler and pruner: docs/tuning.md")
    u.add_argument("config", help="YAML config file with a tune: section (or see --space)")
    u.add_argument("overrides", nargs="*", help="key.sub=value overrides of the base config")
    u.add_argument("--trials", type=int, default=None, help="the study's budget: COMPLETE + PRUNED trials over every "
                   "worker and every re-run (default tune.trials, else 20)")
    u.add_argument("--parallel", type=int, default=1, help="trials at a time on this machine (each its own CPU "
                   "cores and GPUs)")
    u.add_argument("--nproc-per-node", type=int, default=1, help="ranks of each trial")
    u.add_argument("--storage", default=None, help="study storage URL: journal:PATH (default: output_dir/"
                   "study.journal), sqlite:///PATH (one worker), postgresql://..., mysql+pymysql://...")
    u.add_argument("--timeout", type=float, default=None, metavar="S", help="ask no new trial after S seconds")
    u.add_argument("--space", default=None, help="YAML file holding the tune: section instead of the config")
    u.add_argument("--resume", action="store_true", help="continue the search in output_dir and refuse to start a "
                   "new one (a re-run of the same command continues it anyway)")
    u.add_argument("--stale-after-s", type=float, default=120.0, metavar="S", help="take over a running trial "
                   "whose worker gave no heartbeat for S seconds (a killed machine or job; default 120)")
    u.add_argument("--shutdown-grace-s", type=float, default=600.0, metavar="S",
                   help="as `fsdp-ft run`: seconds a stopped trial's ranks get to save")
    u.add_argument("--max-failures", type=int, default=5, help="a worker stops after this many failed trials in a "
                   "row (default 5)")
    _add_verbose(u)


def cmd_tune(args) -> int:
    from fsdp_ft.tuning.search import TuneOptions, tune

    opts = TuneOptions(trials=args.trials, parallel=args.parallel, nproc_per_node=args.nproc_per_node,
                       storage=args.storage, timeout_s=args.timeout, space=args.space, resume=args.resume,
                       stale_after_s=args.stale_after_s, shutdown_grace_s=args.shutdown_grace_s,
                       max_failures=args.max_failures)
    return tune(args.config, args.overrides, opts)


def cmd_train(args) -> int:
    from fsdp_ft.config import batch, load_config, require_extras

    cfg = load_config(args.config, args.overrides)  # before importing torch: a bad config fails in a blink
    require_extras(cfg, "train")
    batch.resolve(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # a global batch these ranks cannot make, too
    from fsdp_ft.config.extras import unused_libraries
    from fsdp_ft.runtime import preemption, quiet, ranklog

    quiet.hide(unused_libraries(cfg))  # before transformers is imported

    if args.debug:
        from fsdp_ft.training import debug
        debug.dump_first_batch(debug.prepare(cfg, args.debug_steps))
    ranklog.start()  # output_dir/logs/rank-N.log when a launcher asked for it
    preemption.install()
    from fsdp_ft.api import train

    result = train(cfg)
    from fsdp_ft.runtime import distributed

    distributed.finish()  # every rank returns from train() together, stopped by a signal or not
    if preemption.stop_signal():
        if ranklog.rank_from_env() == 0:
            print(f"fsdp-ft: stopped by signal {preemption.stop_signal()} after step {result.state.step}; "
                  f"checkpoint saved, the same command resumes", file=sys.stderr)
        return 128 + preemption.stop_signal()
    if result.pruned_at is not None and ranklog.rank_from_env() == 0:
        print(f"fsdp-ft: the search pruned this trial at step {result.pruned_at}", file=sys.stderr)
    final = Path(result.output_dir) / "final"
    if result.pruned_at is None and ranklog.rank_from_env() == 0 and final.is_dir():
        print(f"[fsdp_ft] done at step {result.state.step}: the model is in {final}", flush=True)
    return 0


def cmd_run(args) -> int:
    """torchrun in-process: its agent starts the ranks; this process forwards signals, gives the ranks the shutdown
    grace to save, and exits with what the ranks did (fsdp_ft.launchers.torchrun)."""
    from fsdp_ft.config import batch, load_config, require_extras
    from fsdp_ft.launchers import torchrun

    torchrun.check_sizes(args.nproc_per_node, args.nnodes, args.node_rank, args.shutdown_grace_s)
    cfg = load_config(args.config, args.overrides)  # fail fast on a bad config, before starting N processes
    require_extras(cfg, "run")
    batch.resolve(cfg, args.nproc_per_node * args.nnodes)
    endpoint = torchrun.resolve_endpoint(args.rdzv_endpoint, args.nnodes, args.node_rank)
    argv = torchrun.torchrun_argv(args.nproc_per_node, args.nnodes, args.node_rank, endpoint,
                                  args.config, args.overrides)
    from pathlib import Path

    from fsdp_ft.runtime import rank_env

    rank_env.apply(Path(cfg.output_dir) / "logs", args.nproc_per_node, endpoint.rpartition(":")[0], args.nnodes)
    return torchrun.run(argv, cfg.output_dir, args.shutdown_grace_s, hosts_rank0=args.node_rank == 0)


def cmd_submit(args) -> int:
    from fsdp_ft.launchers.slurm import SubmitOptions, submit

    if args.verbose:  # the job's ranks are quiet too unless told, whatever the cluster exports of this shell
        args.setup = [*args.setup, "export FSDP_FT_VERBOSE=1"]
    opts = SubmitOptions(**{k: getattr(args, k) for k in SubmitOptions.__dataclass_fields__})
    return submit(args.config, args.overrides, opts)


def cmd_export(args) -> int:
    from fsdp_ft.checkpoint.export import export_run

    out = export_run(args.run_dir, args.step, args.out, merge_adapters=args.merge_adapters,
                     trust_remote_code=args.trust_remote_code)
    print(f"exported to {out}")
    return 0


def _check_input(path: str | None, option: str) -> None:
    """A missing input file fails in a blink, before a model is loaded."""
    from pathlib import Path

    from fsdp_ft.errors import DataError

    if path is not None and not Path(path).is_file():
        raise DataError(f"{option}: file '{path}' " + ("is not a file" if Path(path).exists() else "does not exist"))


def _placement(args):
    """--max-memory / --offload-folder; a bad cap fails before a model is loaded."""
    from fsdp_ft.inference.placement import Placement, parse_max_memory

    return Placement(parse_max_memory(args.max_memory), args.offload_folder)


def cmd_eval(args) -> int:
    import json

    _check_input(args.data, "--data")
    from fsdp_ft.inference.evaluate import evaluate_file
    from fsdp_ft.inference.loading import load_model

    loaded = load_model(args.model, args.overrides, trust_remote_code=args.trust_remote_code,
                        placement=_placement(args))
    print(json.dumps(evaluate_file(loaded, args.data, args.max_samples)))
    return 0


def cmd_generate(args) -> int:
    import json

    _check_input(args.prompts_file, "--prompts-file")
    from fsdp_ft.inference.generate import Sampling, generate_texts, read_prompts
    from fsdp_ft.inference.loading import load_model
    from fsdp_ft.inference.predict import check_output, write_lines

    if args.prompts_file and args.output:
        check_output(args.prompts_file, args.output, "--prompts-file")

    sampling = Sampling(args.max_new_tokens, args.greedy, args.temperature, args.top_p, args.top_k, args.seed)
    sampling.check()
    placement = _placement(args)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file, args.prompt_column)
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code, placement=placement)
    completions = generate_texts(loaded, prompts, args.chat, sampling)
    if args.prompt is not None and args.output is None:
        print(completions[0])
        return 0
    lines = "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(prompts, completions))
    if args.output:
        write_lines(args.output, [lines])
    else:
        sys.stdout.write(lines)
    return 0


def cmd_predict(args) -> int:
    _check_input(args.input, "--input")
    from fsdp_ft.inference.loading import load_model
    from fsdp_ft.inference.predict import check_output, predict_file

    check_output(args.input, args.output)  # before a model is loaded
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code, placement=_placement(args))
    n = predict_file(loaded, args.input, args.output, args.text_column, args.text_pair_column,
                     args.batch_size, args.max_length)
    print(f"wrote {n} predictions to {args.output}")
    return 0


def cmd_plan(args) -> int:
    from fsdp_ft.config import load_config, require_extras

    require_extras(load_config(args.config, args.overrides), "plan")  # a bad config fails in a blink, before torch
    if args.nproc < 1 or args.nodes < 1:
        from fsdp_ft.errors import ConfigError
        raise ConfigError("fsdp-ft plan: --nproc and --nodes must be >= 1")
    import torch

    from fsdp_ft.planner.plan import run_plan

    target = args.device or ("cuda" if args.gpu_mem_gb or torch.cuda.is_available() else "cpu")
    return run_plan(args.config, args.overrides, args.nodes * args.nproc, target, args.gpu_mem_gb, args.json,
                    args.exact)


def cmd_report(args) -> int:
    from pathlib import Path

    if (Path(args.run_dir) / "tune.json").is_file():  # a search folder: the study's page
        from fsdp_ft.tuning.report import write_study_report

        print(f"wrote {write_study_report(args.run_dir, args.out)}")
        return 0
    from fsdp_ft.observability.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but overrides may also follow options (`submit CONFIG --nodes 2 optim.lr=1e-4`)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:  # one line, not argparse's usage block: the README promises one line for a bad option
        command = f" {args.command}" if getattr(args, "command", None) else ""
        print(f"fsdp-ft{command}: error: unrecognized arguments: {' '.join(stray)} (fsdp-ft{command} --help lists "
              "the options)", file=sys.stderr)
        raise SystemExit(2)
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def cmd_bench(argv: list[str]) -> int:
    """benchmarks/run.py with its own arguments (it lives beside the package in a source checkout)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    if not script.is_file():
        print(f"fsdp-ft: error: fsdp-ft bench needs a source checkout ({script} not found)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("fsdp_ft_bench_run", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options belong to benchmarks/run.py's own parser
        return cmd_bench(argv[1:])
    args = _parse(argv)
    from fsdp_ft.runtime import quiet

    quiet.set_verbose(getattr(args, "verbose", False))
    quiet.install()
    handler = {"train": cmd_train, "run": cmd_run, "submit": cmd_submit, "export": cmd_export, "eval": cmd_eval,
               "generate": cmd_generate, "predict": cmd_predict, "plan": cmd_plan, "report": cmd_report,
               "tune": cmd_tune}[args.command]
    try:
        return handler(args)
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"fsdp-ft: error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"fsdp-ft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
