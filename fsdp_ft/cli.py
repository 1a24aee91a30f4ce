"""`fsdp-ft` subcommands; the only argv parser in the package."""
from __future__ import annotations

import argparse
import os
import sys

from fsdp_ft.errors import UserError

TRAIN_EPILOG = "overrides: dotted keys with YAML values, e.g. optim.lr=2e-4 train.max_steps=100 output_dir=/tmp/run\n\n"


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

    r = sub.add_parser("run", help="launch `train` on N local processes through torchrun",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    r.add_argument("--nproc-per-node", type=int, default=1, help="processes (ranks) on this machine")
    r.add_argument("--nnodes", type=int, default=1, help="machines taking part")
    r.add_argument("--node-rank", type=int, default=0, help="this machine's index among --nnodes")
    r.add_argument("--rdzv-endpoint", default=None,
                   help="HOST:PORT of node 0 for the rendezvous (default on one machine: a free local port)")
    r.add_argument("config", help="YAML config file")
    r.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    _add_submit_parser(sub)

    e = sub.add_parser("export", help="write a Hugging Face folder from a run's sharded checkpoint")
    e.add_argument("run_dir", help="the run's output_dir")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    e.add_argument("--out", required=True, help="folder to create (must not exist)")
    e.add_argument("--merge-adapters", action="store_true",
                   help="PEFT runs: merge the adapters into the base (a dequantized base for QLoRA) and write a "
                        "plain HF model instead of a PEFT adapter folder")
    return p


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
    s.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    s.add_argument("--wait", action="store_true", help="wait for the job(s) to end; non-zero exit if one failed")


def cmd_train(args) -> int:
    from fsdp_ft.config import load_config

    cfg = load_config(args.config, args.overrides)  # before importing torch: a bad config fails in a blink
    from fsdp_ft import preemption, ranklog

    if args.debug:
        from fsdp_ft import debug
        debug.dump_first_batch(debug.prepare(cfg, args.debug_steps))
    ranklog.start()  # output_dir/logs/rank-N.log when a launcher asked for it
    preemption.install()
    from fsdp_ft.engine import train

    result = train(cfg)
    if preemption.stop_signal():
        if ranklog.rank_from_env() == 0:
            print(f"fsdp-ft: stopped by signal {preemption.stop_signal()} after step {result.state.step}; "
                  f"checkpoint saved, the same command resumes", file=sys.stderr)
        return 128 + preemption.stop_signal()
    return 0


def cmd_run(args) -> int:
    """torchrun in-process: its agent starts the ranks, forwards signals and reports the failing rank's code."""
    from fsdp_ft.config import load_config

    cfg = load_config(args.config, args.overrides)  # fail fast on a bad config, before starting N processes
    from fsdp_ft import launcher

    endpoint = launcher.resolve_endpoint(args.rdzv_endpoint, args.nnodes, args.node_rank)
    argv = launcher.torchrun_argv(args.nproc_per_node, args.nnodes, args.node_rank, endpoint,
                                  args.config, args.overrides)
    return launcher.run(argv, cfg.output_dir)


def cmd_submit(args) -> int:
    from fsdp_ft.slurm import SubmitOptions, submit

    opts = SubmitOptions(**{k: getattr(args, k) for k in SubmitOptions.__dataclass_fields__})
    return submit(args.config, args.overrides, opts)


def cmd_export(args) -> int:
    from fsdp_ft.export import export_run

    out = export_run(args.run_dir, args.step, args.out, merge_adapters=args.merge_adapters)
    print(f"exported to {out}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but overrides may also follow options (`submit CONFIG --nodes 2 optim.lr=1e-4`)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    handler = {"train": cmd_train, "run": cmd_run, "submit": cmd_submit, "export": cmd_export}[args.command]
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
