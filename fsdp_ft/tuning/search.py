"""`fsdp-ft tune`: check the search, create (or continue) its study, run the workers, leave the results."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fsdp_ft.config import require_extras
from fsdp_ft.errors import UserError
from fsdp_ft.tuning import results
from fsdp_ft.tuning.space import read_spec
from fsdp_ft.tuning.study import create_or_continue, masked, resolve_url


@dataclass
class TuneOptions:
    trials: int | None = None           # default: tune.trials of the config
    parallel: int = 1
    nproc_per_node: int = 1
    storage: str | None = None
    timeout_s: float | None = None
    space: str | None = None
    stale_after_s: float = 120.0
    shutdown_grace_s: float = 600.0
    max_failures: int = 5
    resume: bool = False                # require an existing study (a re-run continues one anyway)
    workers_elsewhere: int = 0          # SLURM array tasks beside this process (for the SQLite check)


def require_optuna() -> None:
    """One line when optuna is missing; Optuna's own info lines and experimental-feature warnings kept quiet."""
    import warnings

    require_extras(None, "tune")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def prepare(config: str, overrides: list[str], opts: TuneOptions):
    """The checked spec and the study (created once, or continued), before any worker starts."""
    require_optuna()
    for name, value, low in (("--parallel", opts.parallel, 1), ("--nproc-per-node", opts.nproc_per_node, 1),
                             ("--trials", opts.trials if opts.trials is not None else 1, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low} (got {value})")
    spec = read_spec(config, overrides, opts.space)
    require_extras(spec.base, "tune")  # what the trials' config asks for (gguf, tensorboard ...), before trial 1
    if opts.trials is not None:
        spec.trials = opts.trials
    out = Path(spec.base.output_dir)
    url = resolve_url(opts.storage, out, opts.parallel + opts.workers_elsewhere)
    if opts.resume and not (out / "tune.json").is_file():
        raise UserError(f"--resume: '{out}' holds no search to continue (no tune.json); leave --resume out to "
                        "start one")
    study, record = create_or_continue(spec, out, url)
    return spec, study, record


def tune(config: str, overrides: list[str], opts: TuneOptions, name: str = "", worker_offset: int = 0) -> int:
    """Run this process's workers to the end of the search; `name` and `worker_offset` tell a SLURM array task's
    workers apart from the others' (claims, sampler seeds)."""
    spec, study, record = prepare(config, overrides, opts)
    from fsdp_ft.tuning.worker import Search, WorkerOptions  # imports torch: after the checks, which fail fast

    out = Path(spec.base.output_dir)
    print(f"[tune] study {record.study_name} in {masked(record.storage)}: {spec.trials} trials "
          f"(COMPLETE + PRUNED), {opts.parallel} at a time x {opts.nproc_per_node} ranks; trials in {out}/trials",
          flush=True)
    search = Search(spec, out, record, WorkerOptions(
        trials=spec.trials, parallel=opts.parallel, nproc_per_node=opts.nproc_per_node, timeout_s=opts.timeout_s,
        stale_after_s=opts.stale_after_s, shutdown_grace_s=opts.shutdown_grace_s, max_failures=opts.max_failures,
        name=name, worker_offset=worker_offset))
    code = search.run()
    metrics = [o.metric for o in spec.objectives]
    print(results.table(study, metrics), flush=True)
    line = results.write_best(study, out, metrics)
    if line:
        print(f"[tune] {line}", flush=True)
    return code
