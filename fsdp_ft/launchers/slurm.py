"""`fsdp-ft submit`: SLURM jobs through submitit, one task per GPU, that checkpoint and requeue themselves.

Each srun task runs `TrainJob`: it turns SLURM's variables into the env:// ones (rank 0's node is the rendezvous
host, the port comes from the job id) and calls the same `train(cfg)` as every launcher. Stop signals are only
recorded (`preemption`); ranks agree, save a checkpoint, and then:
- SIGUSR2 (submitit's signal before the time limit, `--signal-delay-s`, or a preemption notice) -> rank 0 hands
  over to submitit's own handler, which calls `TrainJob.checkpoint` (the same job with `resume=auto`) and
  requeues it with `scontrol requeue`;
- SIGTERM (`scontrol requeue`, preemption with PreemptMode=REQUEUE, scancel) -> SLURM decides; if it requeues,
  the job resumes from that checkpoint.

`--tune` submits a search instead of one run (`TuneJob`): the study is created here, once, then a job array of
--parallel tasks, each one node and one process, runs `fsdp_ft.tuning.search.tune` there: a worker named after its
array task that pulls trials from the shared study and trains each with torchrun over its node's GPUs. A stop signal
reaches the running trial, which saves; the worker releases it and the task is requeued as above. The trial resumes
from its checkpoint under the same number and parameters: taken up by the requeued worker (same name, its own
released trials first), or by another task's worker that is free before it comes back.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from fsdp_ft.errors import UserError


class SlurmError(UserError):
    """SLURM is missing or refused the job (unknown partition, bad option)."""


@dataclass
class SubmitOptions:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None   # default: gpus_per_node, or 1 on CPU nodes
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int = 60                      # minutes
    constraint: str | None = None
    exclusive: bool = False
    sbatch: list[str] = field(default_factory=list)   # extra KEY=VALUE sbatch options
    signal_delay_s: int = 120
    job_name: str = "fsdp-ft"
    folder: str | None = None           # submitit's folder; default output_dir/logs/slurm
    setup: list[str] = field(default_factory=list)    # shell lines run before srun (module load ...)
    sweep: list[str] = field(default_factory=list)    # KEY=V1,V2,... -> one array task per combination
    dry_run: bool = False
    wait: bool = False
    # --tune: a search; a job array of `parallel` one-node tasks pulling trials from one study (fsdp_ft.tuning)
    tune: bool = False
    parallel: int = 1
    trials: int | None = None
    storage: str | None = None
    timeout: float | None = None        # seconds; a task asks no new trial after this long
    space: str | None = None
    stale_after_s: float = 120.0


# ---------------------------------------------------------------- inside the job


def _node_address(name: str) -> str:
    """An address for a node name: DNS, else the NodeAddr SLURM itself uses (simulated nodes share one host)."""
    try:
        return socket.gethostbyname(name)
    except OSError:
        out = subprocess.run(["scontrol", "show", "node", name], capture_output=True, text=True).stdout
        m = re.search(r"NodeAddr=(\S+)", out)
        return m.group(1) if m else name


def set_torch_env(job_env) -> None:
    """env:// variables from submitit's view of SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_JOB_NODELIST ...)."""
    os.environ.update(RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
                      LOCAL_RANK=str(job_env.local_rank),
                      LOCAL_WORLD_SIZE=str(job_env.num_tasks // max(job_env.num_nodes, 1)))
    os.environ.setdefault("MASTER_ADDR", _node_address(job_env.hostnames[0]))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


class TrainJob:
    """The callable submitit pickles: train from a resolved config (a dict), requeue-safe."""

    def __init__(self, config: dict):
        self.config = config

    def __call__(self) -> dict:
        import submitit

        from fsdp_ft.runtime import rank_env

        job_env = submitit.JobEnvironment()
        set_torch_env(job_env)
        # before torch is imported: OpenMP reads OMP_NUM_THREADS when it loads
        rank_env.apply(Path(self.config["output_dir"]) / "logs", ranks_on_node=1,
                       master_addr=os.environ["MASTER_ADDR"], nnodes=job_env.num_nodes)
        from fsdp_ft.config import config_from_dict
        from fsdp_ft.config.extras import unused_libraries
        from fsdp_ft.runtime import quiet

        cfg = config_from_dict(self.config)
        quiet.install()  # as `fsdp-ft train` (`submit -v` exports FSDP_FT_VERBOSE=1 in the job script)
        quiet.hide(unused_libraries(cfg))  # before transformers is imported
        from fsdp_ft.api import train
        from fsdp_ft.runtime import distributed, preemption, ranklog

        ranklog.start(Path(cfg.output_dir) / "logs")
        submitit_handlers = preemption.install()
        result = train(cfg)
        sig = preemption.stop_signal()
        if not sig:
            distributed.finish()
            return {"output_dir": str(result.output_dir), "step": result.state.step}
        print(f"[fsdp_ft] stopped on {signal.Signals(sig).name} at step {result.state.step}; checkpoint saved",
              file=sys.stderr, flush=True)
        handler = submitit_handlers.get(sig)
        try:
            if sig == signal.SIGUSR2 and callable(handler):
                handler(sig, None)  # rank 0: submitit calls self.checkpoint(), requeues the job and exits
        finally:  # the other ranks wait until the requeue is done: an early exit would make srun kill rank 0
            distributed.barrier()
            distributed.shutdown()
        raise SystemExit(128 + sig)  # no result file: the job is not over

    def checkpoint(self) -> "object":
        """What submitit resubmits on requeue: the same job, resuming from the newest checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob({**self.config, "resume": "auto"}))


class TuneJob:
    """The callable of each array task of `submit --tune`: one search worker on its node, named after its array
    task (a name that survives requeues), running one trial at a time with torchrun over the node's GPUs.

    `tune()` handles the stop signals while it runs (the trial saves, its claim is released) and returns 128 + the
    signal; then, as TrainJob does, SIGUSR2 goes on to submitit's handler (checkpoint() and requeue), any other
    signal ends the task with that code and SLURM requeues it (scontrol requeue, preemption) or not (scancel)."""

    def __init__(self, config: str, overrides: list[str], options, cwd: str):
        self.config, self.overrides, self.options, self.cwd = config, list(overrides), options, cwd

    def __call__(self) -> dict:
        import submitit

        from fsdp_ft.tuning.search import tune

        if os.path.isdir(self.cwd):  # relative paths of the overrides mean what they meant where it was submitted
            os.chdir(self.cwd)
        name = f"slurm-{submitit.JobEnvironment().job_id}"  # ARRAYID_TASK: the same after a requeue
        task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)  # its sampler seed differs from the others'
        submitit_handler = signal.getsignal(signal.SIGUSR2)  # tune() puts its own in place while it runs
        code = tune(self.config, self.overrides, self.options, name=name, worker_offset=task)
        if code == 0:
            return {"worker": name}
        if code < 128:
            raise SlurmError(f"worker {name} ended before the search spent its budget (trials failed, or the worker "
                             "stopped): see its log above and trials/*/console.log of the search")
        sig = code - 128
        print(f"[tune] worker {name} stopped on {signal.Signals(sig).name}: the running trial saved a checkpoint "
              "and resumes under the same number", file=sys.stderr, flush=True)
        if sig == signal.SIGUSR2 and callable(submitit_handler):
            submitit_handler(sig, None)  # submitit calls self.checkpoint(), requeues the task and exits
        raise SystemExit(code)  # no result file: the task is not over (SLURM requeues it, or scancel ended it)

    def checkpoint(self) -> "object":
        """What submitit resubmits on requeue: the same worker, which takes up its stopped trial first."""
        import submitit

        return submitit.helpers.DelayedSubmission(TuneJob(self.config, self.overrides, self.options, self.cwd))


# ---------------------------------------------------------------- submitting


def _parse_kv(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SlurmError(f"{what} '{item}' must look like KEY=VALUE")
        out[key.lstrip("-")] = value
    return out


def sweep_overrides(sweep: list[str]) -> list[list[str]]:
    """KEY=V1,V2 entries -> the cartesian product as override lists ([[]] without a sweep)."""
    axes = [[f"{k}={v}" for v in vals.split(",")] for k, vals in _parse_kv(sweep, "--sweep").items()]
    return [list(combo) for combo in itertools.product(*axes)]


def run_name(overrides: list[str]) -> str:
    return "_".join(re.sub(r"[^\w.=-]+", "-", o) for o in overrides) or "run"


# CPUs per rank when sinfo cannot tell (a --dry-run away from the cluster): nearly every GPU node has at least 8
# cores per GPU (DGX H100: 112 cores for 8 GPUs; most cloud H100 nodes 12 or more), and asking for more than a node
# has would leave the job pending forever
DEFAULT_CPUS_PER_TASK = 8


@dataclass
class NodeShape:
    cpus: int
    mem_mb: int
    gpus: int


def _gpu_count(gres: str) -> int:
    """GPUs in a node's GRES as sinfo prints it: 'gpu:8', 'gpu:h100:8(S:0-1)', 'gpu:a100:4,nvme:1', '(null)'."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


def parse_sinfo(text: str, partition: str | None) -> NodeShape | None:
    """The smallest node (CPUs, memory, GPUs, each the minimum) of `partition` (comma list; None: the default
    partition, marked '*') from `sinfo -h -N -o %P|%c|%m|%G`."""
    wanted = set(partition.split(",")) if partition else None
    shapes = []
    for line in text.splitlines():
        part, _, rest = line.strip().partition("|")
        if not ((part.rstrip("*") in wanted) if wanted else part.endswith("*")):
            continue
        cpus, _, rest = rest.partition("|")
        mem, _, gres = rest.partition("|")
        if cpus.isdigit() and re.match(r"\d+", mem):
            shapes.append(NodeShape(int(cpus), int(re.match(r"\d+", mem).group()), _gpu_count(gres)))
    if not shapes:
        return None
    return NodeShape(min(s.cpus for s in shapes), min(s.mem_mb for s in shapes), min(s.gpus for s in shapes))


def node_shape(partition: str | None) -> NodeShape | None:
    """What sinfo says about the partition's nodes; None without sinfo (or when it fails)."""
    try:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_sinfo(res.stdout, partition) if res.returncode == 0 else None


def resources(opts: SubmitOptions, shape: NodeShape | None) -> tuple[int | None, str | None, str]:
    """(CPUs per rank, --mem value, why) for what the user left open. SLURM's default is 1 CPU per task: one core
    for a rank's main thread, its batch thread, NCCL's proxy threads and its set-up work (loading, quantizing).
    So each rank gets the node's cores divided among its ranks, or its GPUs' share of them when the job takes only
    some of a node's GPUs; memory the same share (--mem=0, the whole node, when the job takes the whole node).
    Without sinfo: DEFAULT_CPUS_PER_TASK and the cluster's default memory."""
    extra = _parse_kv(opts.sbatch, "--sbatch")
    tasks = opts.tasks_per_node or max(opts.gpus_per_node, 1)
    share = 1.0
    if shape and shape.gpus and opts.gpus_per_node and not opts.exclusive:
        share = min(1.0, opts.gpus_per_node / shape.gpus)
    cpus, why = opts.cpus_per_task, "--cpus-per-task"
    if cpus is None and str(extra.get("cpus-per-task", "")).isdigit():
        cpus, why = int(extra["cpus-per-task"]), "--sbatch cpus-per-task"
    if cpus is None and "cpus-per-gpu" not in extra:
        if shape:
            cpus = max(1, int(shape.cpus * share) // tasks)
            why = f"{shape.cpus} CPUs per node" + (f" x {opts.gpus_per_node}/{shape.gpus} GPUs" if share < 1 else "") \
                + f" / {tasks} ranks"
        else:
            cpus, why = DEFAULT_CPUS_PER_TASK, "default, sinfo not available"
    mem = None
    if opts.mem_gb is None and shape and not extra.keys() & {"mem", "mem-per-cpu", "mem-per-gpu"}:
        mem = "0" if share >= 1 else f"{int(shape.mem_mb * share)}M"
    return cpus, mem, why


def _describe(opts: SubmitOptions, shape: NodeShape | None) -> str:
    cpus, mem, why = resources(opts, shape)
    text = f"{cpus} CPUs per rank ({why})" if cpus else "CPUs per --sbatch cpus-per-gpu"
    return text + {None: "", "0": ", the whole node's memory"}.get(mem, f", {mem}B of memory per node")


def build_executor(opts: SubmitOptions, folder: Path, shape: NodeShape | None = None):
    import submitit

    tasks = opts.tasks_per_node or max(opts.gpus_per_node, 1)
    cpus, mem, _ = resources(opts, shape)
    extra = _parse_kv(opts.sbatch, "--sbatch")
    ex = _dry_run_executor(folder) if opts.dry_run else submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = dict(nodes=opts.nodes, tasks_per_node=tasks, timeout_min=opts.time, name=opts.job_name,
                  slurm_signal_delay_s=opts.signal_delay_s, slurm_additional_parameters=extra,
                  # one failing task ends the step at once instead of leaving the others in a collective; srun
                  # restates the CPUs per task: Slurm 22.05-23.02's srun no longer takes them from sbatch
                  slurm_srun_args=["--kill-on-bad-exit=1", *([f"--cpus-per-task={cpus}"] if cpus else [])])
    optional = dict(gpus_per_node=opts.gpus_per_node or None,
                    cpus_per_task=None if "cpus-per-task" in extra else cpus, mem_gb=opts.mem_gb, slurm_mem=mem,
                    slurm_partition=opts.partition, slurm_account=opts.account, slurm_qos=opts.qos,
                    slurm_constraint=opts.constraint, slurm_exclusive=opts.exclusive or None,
                    slurm_setup=opts.setup or None)
    ex.update_parameters(**params, **{k: v for k, v in optional.items() if v is not None})
    return ex


def _dry_run_executor(folder: Path):
    """submitit's executor for --dry-run, also where srun is not on PATH (submitit refuses to build one there)."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    affinity = SlurmExecutor.__dict__["affinity"]
    SlurmExecutor.affinity = classmethod(lambda cls: 1)
    try:
        return submitit.AutoExecutor(folder=folder, cluster="slurm")
    finally:
        SlurmExecutor.affinity = affinity


def batch_script(ex, array_size: int | None = None) -> str:
    """The sbatch file submitit would submit (what --dry-run prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    inner = ex._executor
    return _make_sbatch_string(command=inner._submitit_command_str, folder=inner.folder,
                               map_count=array_size, **inner.parameters)


def submit(config_path: str, overrides: list[str], opts: SubmitOptions) -> int:
    from fsdp_ft.config import batch, load_config, require_extras

    if opts.tune:
        return submit_tune(config_path, overrides, opts)
    _refuse_tune_options(opts)

    base = load_config(config_path, overrides)  # validate (and resolve paths) here, before anything is queued
    combos = sweep_overrides(opts.sweep)
    configs = [load_config(config_path, [*overrides, *combo,
                                         *([f"output_dir={Path(base.output_dir) / run_name(combo)}"] if combo else [])])
               for combo in combos] if opts.sweep else [base]
    ranks = opts.nodes * (opts.tasks_per_node or max(opts.gpus_per_node, 1))
    for cfg in configs:  # submitit, what each run's config asks for, and its global batch, before anything is queued
        require_extras(cfg, "submit")
        batch.resolve(cfg, ranks)
    folder = Path(opts.folder or Path(base.output_dir) / "logs" / "slurm").absolute()
    if not opts.dry_run and shutil.which("sbatch") is None:
        raise SlurmError("`sbatch` is not on PATH: `fsdp-ft submit` needs a SLURM cluster "
                         "(use `fsdp-ft run` on a workstation, or --dry-run to see the batch script)")
    shape = None if opts.cpus_per_task and opts.mem_gb is not None else node_shape(opts.partition)
    ex = build_executor(opts, folder, shape)
    if opts.dry_run:
        print(batch_script(ex, len(configs) if opts.sweep else None))
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    _test_only(batch_script(ex, len(configs) if opts.sweep else None), folder)
    submitted_at = time.time()
    try:
        with ex.batch():
            jobs = [ex.submit(TrainJob(cfg.to_dict())) for cfg in configs]
    except Exception as e:  # sbatch's own message ("invalid partition specified: x") is the useful line
        raise SlurmError(f"sbatch refused the job: {_sbatch_reason(e)}") from None
    for job, cfg in zip(jobs, configs):
        print(f"submitted job {job.job_id}: {cfg.output_dir}\n  slurm logs: {folder}/{job.job_id}_<task>_log.out|err"
              f"\n  rank logs:  {cfg.output_dir}/logs/rank-<N>.log\n  resources:  {_describe(opts, shape)}", flush=True)
    if not opts.wait:
        return 0
    watcher = _sacct_since(submitted_at)
    for job in jobs:
        job.watcher = watcher
    return _wait(jobs)


TUNE_ONLY = (("--parallel", "parallel", 1), ("--trials", "trials", None), ("--storage", "storage", None),
             ("--timeout", "timeout", None), ("--space", "space", None), ("--stale-after-s", "stale_after_s", 120.0))


def _refuse_tune_options(opts: SubmitOptions) -> None:
    for flag, key, default in TUNE_ONLY:
        if getattr(opts, key) != default:
            raise SlurmError(f"{flag} belongs to a search: add --tune (or leave {flag} out to submit one run)")


def submit_tune(config_path: str, overrides: list[str], opts: SubmitOptions) -> int:
    """`submit --tune`: check the search, create (or continue) its study here, then queue a job array of
    --parallel one-node tasks (TuneJob) that pull trials from it until --trials are COMPLETE or PRUNED."""
    from fsdp_ft.config import require_extras
    from fsdp_ft.tuning.search import TuneOptions, prepare, require_optuna
    from fsdp_ft.tuning.space import read_spec
    from fsdp_ft.tuning.study import masked, resolve_url

    if opts.sweep:
        raise SlurmError("--sweep and --tune do not go together: the search chooses the values (put the swept keys "
                         "in tune.space)")
    if opts.nodes != 1:
        raise SlurmError(f"--tune runs each trial on one node, so --nodes must be 1 (got {opts.nodes}); "
                         "--parallel K runs K trials at once, one node each")
    for flag, value in (("--parallel", opts.parallel), ("--trials", 1 if opts.trials is None else opts.trials)):
        if value < 1:
            raise SlurmError(f"{flag} must be at least 1 (got {value})")
    require_extras(None, "submit --tune")  # submitit and optuna (reading the space needs optuna)
    require_optuna()
    nproc = opts.tasks_per_node or max(opts.gpus_per_node, 1)  # ranks of each trial: the node's GPUs
    config = str(Path(config_path).resolve())  # the tasks read it again, maybe from another working directory
    space = str(Path(opts.space).resolve()) if opts.space else None
    spec = read_spec(config, overrides, space)  # a bad space or config: one line, before anything is written
    require_extras(spec.base, "submit --tune")
    out = Path(spec.base.output_dir)
    resolve_url(opts.storage, out, opts.parallel)  # sqlite with K tasks, an unknown URL: refused here
    folder = Path(opts.folder or out / "logs" / "slurm").absolute()
    if not opts.dry_run and shutil.which("sbatch") is None:
        raise SlurmError("`sbatch` is not on PATH: `fsdp-ft submit --tune` needs a SLURM cluster "
                         "(use `fsdp-ft tune` on a workstation, or --dry-run to see the batch script)")
    # each array task: one node, one process (the worker) with the node's CPUs; --cpus-per-task counts per rank
    task_opts = replace(opts, tasks_per_node=1, cpus_per_task=opts.cpus_per_task and opts.cpus_per_task * nproc)
    shape = None if opts.cpus_per_task and opts.mem_gb is not None else node_shape(opts.partition)
    ex = build_executor(task_opts, folder, shape)
    array = opts.parallel if opts.parallel > 1 else None
    if opts.dry_run:  # nothing created: the study is made when the search is really submitted
        print(batch_script(ex, array))
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    _test_only(batch_script(ex, array), folder)
    options = TuneOptions(trials=opts.trials, parallel=1, nproc_per_node=nproc, storage=opts.storage,
                          timeout_s=opts.timeout, space=space, stale_after_s=opts.stale_after_s,
                          workers_elsewhere=opts.parallel - 1)
    spec, study, record = prepare(config, overrides, options)  # the study, created once, before any task starts
    done = _finished_trials(study)
    submitted_at = time.time()
    try:
        with ex.batch():
            jobs = [ex.submit(TuneJob(config, overrides, options, os.getcwd())) for _ in range(opts.parallel)]
    except Exception as e:
        raise SlurmError(f"sbatch refused the job: {_sbatch_reason(e)}") from None
    array_id = jobs[0].job_id.split("_")[0]
    tasks = f"array of {opts.parallel} tasks ({array_id}_0..{opts.parallel - 1}), each" if array else "1 task,"
    print(f"submitted job {array_id}: a search, {tasks} one trial at a time on one node x {nproc} ranks\n"
          f"  study:      {record.study_name} in {masked(record.storage)}: {spec.trials} trials (COMPLETE + PRUNED)"
          f"{f', {done} done before' if done else ''}\n"
          f"  trials:     {out}/trials/NNNN (trial.yaml, console.log, metrics.jsonl); `fsdp-ft report {out}`\n"
          f"  slurm logs: {folder}/{array_id}{'_<task>' if array else ''}_0_log.out|err\n"
          f"  resources:  {_describe(task_opts, shape).replace(' / 1 ranks', '').replace('per rank', 'per task')}",
          flush=True)
    if not opts.wait:
        return 0
    watcher = _sacct_since(submitted_at)
    for job in jobs:
        job.watcher = watcher
    code = _wait(jobs)
    from fsdp_ft.tuning import results
    from fsdp_ft.tuning.study import load

    study, _ = load(out)
    print(results.table(study, [o.metric for o in spec.objectives]), flush=True)
    return code


def _finished_trials(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def _test_only(script: str, folder: Path) -> None:
    """`sbatch --test-only` first: SLURM's own one-line reason (unknown partition, too many nodes ...) and nothing
    queued, instead of sbatch's multi-line output from inside submitit."""
    path = folder / ".test-only.sh"
    path.write_text(script)
    try:
        res = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=60)
    finally:
        path.unlink(missing_ok=True)
    if res.returncode != 0:
        lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        raise SlurmError(f"sbatch refused the job: {(lines or ['no reason given'])[0][:300]}")


def _sbatch_reason(e: Exception) -> str:
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower() and line.strip()]
    return (lines[-1] if lines else text.strip().splitlines()[-1] if text.strip() else repr(e))[:300]


RESULT_PATIENCE_S = 90  # how long a COMPLETED job's result files may lag its state
CLOCK_SKEW_S = 300      # how far this host's clock may run ahead of the controller's
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
         "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "UNKNOWN"}  # UNKNOWN: accounting has no record of it yet


def _sacct_since(submitted_at: float):
    """submitit's sacct watcher, asking only for jobs that ran after our submission.

    `sacct -j ID` without `-S` returns every job that ever had ID, and job ids repeat: a controller started with
    fresh state (or a cluster whose ids wrapped) numbers from 1 again while accounting keeps the old jobs. An old
    `ID_0 COMPLETED` then made submitit call a job done that had not started, and --wait failed after 15 s with
    "has not produced any output (state: RUNNING)"."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(submitted_at - CLOCK_SKEW_S))

    class SinceSubmission(SlurmInfoWatcher):
        def _make_command(self):
            command = super()._make_command()
            return None if command is None else [*command, "-S", since]

    return SinceSubmission(delay_s=60)


def _wait(jobs) -> int:
    """Block until every job ends; non-zero if any failed (its traceback is in its log)."""
    code = 0
    for job in jobs:
        try:
            results_when_ready(job)
            print(f"job {job.job_id} finished", flush=True)
        except Exception as e:
            last = (str(e).strip().splitlines() or [""])[-1][:300]
            print(f"fsdp-ft: job {job.job_id} failed ({job.state}): {type(e).__name__}: {last}\n"
                  f"  see {job.paths.stderr}", file=sys.stderr, flush=True)
            code = 1
    return code


def results_when_ready(job, patience_s: float = RESULT_PATIENCE_S, poll_s: float = 3.0):
    """`job.results()`, asked again while SLURM calls the job COMPLETED: a task's result file can appear after
    the job's state does (a loaded node, a slow shared filesystem), and submitit gives up after 15 s.
    Also asked again while a fresh sacct call says the job is still alive: submitit's own check of the state is
    cached and can call a job done that is pending, running or requeued."""
    from submitit.core.utils import UncompletedJobError

    deadline = time.monotonic() + patience_s
    while True:
        try:
            return job.results()
        except UncompletedJobError:  # no result file; a job that raised has one and fails at once
            state = job.watcher.get_state(job.job_id, mode="force").split()[0].upper()
            if not (state in ALIVE or state == "COMPLETED" and time.monotonic() < deadline):
                raise
            time.sleep(poll_s)
