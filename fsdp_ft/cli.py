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

    r = sub.add_parser("run", help="launch `train` on N local processes through torchrun",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    r.add_argument("--nproc-per-node", type=int, default=1, help="processes (ranks) on this machine")
    r.add_argument("--nnodes", type=int, default=1, help="machines taking part")
    r.add_argument("--node-rank", type=int, default=0, help="this machine's index among --nnodes")
    r.add_argument("--rdzv-endpoint", default="127.0.0.1:29500", help="HOST:PORT of node 0 for the rendezvous")
    r.add_argument("config", help="YAML config file")
    r.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    e = sub.add_parser("export", help="write a Hugging Face folder from a run's sharded checkpoint")
    e.add_argument("run_dir", help="the run's output_dir")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    e.add_argument("--out", required=True, help="folder to create (must not exist)")
    return p


def cmd_train(args) -> int:
    from fsdp_ft.config import load_config

    cfg = load_config(args.config, args.overrides)  # before importing torch: a bad config fails in a blink
    from fsdp_ft.engine import train

    train(cfg)
    return 0


def cmd_run(args) -> int:
    """torchrun in-process: its agent starts the ranks, forwards signals and reports the failing rank's code."""
    from fsdp_ft.config import load_config

    load_config(args.config, args.overrides)  # fail fast on a bad config, before starting N processes
    from torch.distributed.run import main as torchrun_main

    host, _, port = args.rdzv_endpoint.rpartition(":")
    argv = [f"--nproc-per-node={args.nproc_per_node}", f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}",
            f"--master-addr={host or '127.0.0.1'}", f"--master-port={port}",
            "-m", "fsdp_ft.cli", "train", args.config, *args.overrides]
    try:
        torchrun_main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # ChildFailedError: torchrun already printed which rank failed
        return getattr(e, "exitcode", None) or _child_exit_code(e)
    return 0


def _child_exit_code(e: Exception) -> int:
    failures = getattr(e, "failures", None) or {}
    for failure in failures.values():
        if getattr(failure, "exitcode", 0):
            return failure.exitcode
    return 1


def cmd_export(args) -> int:
    from fsdp_ft.export import export_run

    out = export_run(args.run_dir, args.step, args.out)
    print(f"exported to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"train": cmd_train, "run": cmd_run, "export": cmd_export}[args.command]
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
