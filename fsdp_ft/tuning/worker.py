"""Workers that pull trials from the study until the budget is spent: take over a stopped trial or ask a new one,
train it as an ordinary run (`fsdp-ft run` in a child process, N ranks), then tell the study how it ended.

The budget (`--trials`) counts COMPLETE and PRUNED trials of the whole study, whoever ran them; asking happens
under a lock file in the search folder, so parallel workers, on one machine or many, never ask more trials than
the budget leaves. No batch barrier: each worker asks again as soon as its trial ends.

A stop signal (SIGTERM, SIGUSR1/2, Ctrl-C) reaches the running trials, which checkpoint as any run does; their
claims are released and a re-run of the command (or the requeued SLURM task) resumes them under the same number
with the same parameters. A worker killed outright leaves a claim whose process is gone or whose heartbeat stops;
the next worker takes the trial over from its newest checkpoint, or, with none, fails it and queues its
parameters again.
"""
from __future__ import annotations

import importlib.metadata
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fsdp_ft.config import dump_config
from fsdp_ft.errors import ConfigError, UserError
from fsdp_ft.observability.metrics import read_metrics_file
from fsdp_ft.tuning import trial_dir
from fsdp_ft.tuning.space import TuneSpec
from fsdp_ft.tuning.study import Record, make_pruner, make_sampler, open_storage

HEARTBEAT_S = 10.0
STOPPED = {128 + signal.SIGTERM, 128 + signal.SIGUSR1, 128 + signal.SIGUSR2}  # a run saved and stopped
PACKAGES = ("fsdp_ft", "torch", "transformers", "peft", "optuna", "torchao")


@dataclass
class WorkerOptions:
    trials: int                         # the study's budget: COMPLETE + PRUNED trials
    parallel: int = 1                   # trials at a time in this process
    nproc_per_node: int = 1             # ranks of each trial
    timeout_s: float | None = None      # ask no new trial after this many seconds
    stale_after_s: float = 120.0        # a claim without heartbeat for this long is taken over
    shutdown_grace_s: float = 600.0     # `fsdp-ft run --shutdown-grace-s` of each trial
    max_failures: int = 5               # a worker stops after this many failed trials in a row
    name: str = ""                      # a stable name for this process's workers (SLURM: array job and task)
    worker_offset: int = 0              # this process's place among the search's processes (SLURM: array task id)


@dataclass
class Job:
    number: int
    folder: Path
    params: dict
    resumed: str = ""                   # why it was taken over, when it was


@dataclass
class Outcome:
    state: str                          # COMPLETE / PRUNED / FAIL / STOPPED
    values: list[float] = field(default_factory=list)
    reason: str = ""
    facts: dict = field(default_factory=dict)


class Search:
    """The workers of this process: K threads, each running one trial at a time in a child process."""

    def __init__(self, spec: TuneSpec, output_dir: str | Path, record: Record, opts: WorkerOptions):
        self.spec, self.out, self.record, self.opts = spec, Path(output_dir), record, opts
        self.name = opts.name or f"{socket.gethostname()}:{os.getpid()}"
        self.started = time.monotonic()
        self.stop_signal = 0
        self.children: dict[int, subprocess.Popen] = {}
        self.mutex = threading.Lock()       # this process's threads; the lock file serves other processes
        self.print_lock = threading.Lock()
        self.slices = _resource_slices(opts.parallel, opts.nproc_per_node)

    # ------------------------------------------------------------ running

    def run(self) -> int:
        """Run the workers to the end of the budget; 0, or 128 + the stop signal, or 1 when workers gave up."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
                previous[sig] = signal.signal(sig, self.stop)
        threads = [threading.Thread(target=self.work, args=(i,), name=f"tune-worker-{i}", daemon=True)
                   for i in range(self.opts.parallel)]
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.5)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.stop_signal:
            return 128 + self.stop_signal
        return 0 if self.finished() else 1

    def finished(self) -> bool:
        """The search got what was asked: the budget spent, or the grid covered or the time up with a trial
        complete."""
        import optuna
        from optuna.trial import TrialState

        study = optuna.load_study(study_name=self.record.study_name, storage=open_storage(self.record.storage),
                                  sampler=make_sampler(self.spec))
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        elsewhere = sum(t.state == TrialState.RUNNING and not trial_dir.adoptable(  # live workers of other processes
            self._folder(t.number), self.opts.stale_after_s, None)[0] for t in trials)
        if done + elsewhere >= self.opts.trials and elsewhere:
            self.say(f"{done} of {self.opts.trials} trials done; the last {elsewhere} run in other workers")
            return True
        ended_early = self._timed_out() or (self.spec.sampler == "grid" and study.sampler.is_exhausted(study))
        if done >= self.opts.trials or ended_early and any(t.state == TrialState.COMPLETE for t in trials):
            return True
        self.say(f"the search ended with {done} of {self.opts.trials} trials done: see the failures above")
        return False

    def stop(self, signum, frame=None) -> None:
        """A stop signal: running trials save and stop (Ctrl-C and SIGHUP reach them as SIGTERM); no new trial."""
        self.stop_signal = self.stop_signal or int(signum)
        forward = signal.SIGTERM if signum in (signal.SIGINT, signal.SIGHUP) else signum
        for proc in list(self.children.values()):
            try:
                proc.send_signal(forward)
            except ProcessLookupError:
                pass
        self.say(f"stopping on {signal.Signals(signum).name}: running trials save a checkpoint; the same command "
                 "resumes them")

    def work(self, index: int) -> None:
        """One worker thread; an error ends this worker with one line (the others go on)."""
        try:
            self._work(index)
        except Exception as e:  # noqa: BLE001 - the thread's last word; a traceback for what is not the user's
            if isinstance(e, UserError):
                self.say(f"worker {index} stopped: {e}")
            else:
                import traceback

                self.say(f"worker {index} stopped by an error:\n{traceback.format_exc()}")

    def _work(self, index: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(self.record.storage)
        study = optuna.load_study(study_name=self.record.study_name, storage=storage,
                                  sampler=make_sampler(self.spec, self.sampler_seed(index)),
                                  pruner=make_pruner(**self.spec.pruner_settings()))
        failures = 0
        while not self.stop_signal:
            job = self.next_job(study, storage, index)
            if job is None:
                return
            code = self.launch(job, index)
            outcome = self.judge(job, code)
            owner = trial_dir.claimed_by(job.folder)
            if owner != f"{self.name}/{index}":  # taken over while this worker looked dead (a long pause)
                self.say(f"trial {job.number} was taken over by {owner}; its result is theirs to tell")
                continue
            if outcome.state == "STOPPED":
                trial_dir.release(job.folder)
                self.say(f"trial {job.number} stopped at step {outcome.facts.get('step', 0)}: checkpoint saved, "
                         "the same command resumes it")
                if not self.stop_signal:
                    continue  # stopped from outside this search: take it up again
                return
            self.tell(study, storage, job, outcome)
            failures = failures + 1 if outcome.state == "FAIL" else 0
            if failures >= self.opts.max_failures:
                self.say(f"worker {index}: {failures} trials failed in a row; it stops (see trials/*/console.log)")
                return

    # ------------------------------------------------------------ choosing a trial

    def sampler_seed(self, index: int) -> int:
        """tune.seed for the first worker; each other worker (thread, array task) its own, so their random
        start-up trials differ, and the same on every re-run."""
        return self.spec.seed + 1009 * (self.opts.worker_offset * self.opts.parallel + index)

    def next_job(self, study, storage, index: int) -> Job | None:
        from optuna.storages.journal import JournalFileSymlinkLock

        lock = JournalFileSymlinkLock(str(self.out / "budget"))
        with self.mutex:
            while not lock.acquire():
                time.sleep(0.05)
            try:
                return self._next_job_locked(study, storage, index)
            finally:
                lock.release()

    def _next_job_locked(self, study, storage, index: int) -> Job | None:
        from optuna.trial import TrialState

        worker = f"{self.name}/{index}"
        while True:
            trials = study.get_trials(deepcopy=False)
            running = [t for t in trials if t.state == TrialState.RUNNING]
            for t in sorted(running, key=lambda t: trial_dir.claimed_by(self._folder(t.number)) != worker):
                folder = self._folder(t.number)
                free, why = trial_dir.adoptable(folder, self.opts.stale_after_s,
                                                t.datetime_start.timestamp() if t.datetime_start else None)
                if not free:
                    continue
                if trial_dir.has_checkpoint(folder):
                    trial_dir.claim(folder, trial_dir.Claim.mine(worker))
                    return Job(t.number, folder, dict(t.params), resumed=why)
                self._requeue(study, storage, t, why)
                break  # the list changed: look again
            else:
                done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
                if self.stop_signal or done + len(running) >= self.opts.trials or self._timed_out():
                    return None
                if self.spec.sampler == "grid" and study.sampler.is_exhausted(study):
                    return None
                job = self._ask(study, storage, worker)
                if job is not None:
                    return job

    def _timed_out(self) -> bool:
        return self.opts.timeout_s is not None and time.monotonic() - self.started > self.opts.timeout_s

    def _requeue(self, study, storage, t, why: str) -> None:
        """A trial taken over before its first checkpoint: FAIL, and the same parameters asked again."""
        from optuna.trial import TrialState

        reason = f"its worker stopped before the first checkpoint ({why}); its parameters were queued again"
        storage.set_trial_user_attr(self._trial_id(storage, t.number), "fail_reason", reason)
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number, **_baseline_attr(t)})
        self.say(f"trial {t.number} FAIL: {reason}")

    def _ask(self, study, storage, worker: str) -> Job | None:
        """A new trial, with its folder, config and provenance; None when its config is refused (told FAIL)."""
        from optuna.trial import TrialState

        trial = study.ask()
        settings = self.spec.suggest(trial)
        folder = self._folder(trial.number)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            cfg = self.spec.trial_config(settings, str(folder))
        except ConfigError as e:
            trial.set_user_attr("fail_reason", f"config refused: {e}")
            study.tell(trial, state=TrialState.FAIL)
            self.say(f"trial {trial.number} FAIL: config refused: {e}")
            return None
        dump_config(cfg, folder / "trial.yaml")
        provenance = {"seed": cfg.train.seed, "sampler": self.spec.sampler, "sampler_seed": self.spec.seed,
                      "worker_sampler_seed": self.sampler_seed(int(worker.rpartition("/")[2])),
                      "config_hash": _sha256((folder / "trial.yaml").read_bytes()), "git": _git_revision(),
                      "versions": _versions(), "run_dir": str(folder), "settings": settings}
        for key, value in provenance.items():
            trial.set_user_attr(key, value)
        objective = self.spec.objectives[0]
        trial_dir.write_json(folder / "trial.json", {
            "storage": self.record.storage, "study_name": self.record.study_name, "number": trial.number,
            "objective": objective.metric, "report": len(self.spec.objectives) == 1 and objective.source == "eval",
            "pruner": self.spec.pruner_settings(), "params": dict(trial.params), **provenance})
        trial_dir.claim(folder, trial_dir.Claim.mine(worker))
        return Job(trial.number, folder, dict(trial.params))

    def _trial_id(self, storage, number: int) -> int:
        return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.record.study_name),
                                                               number)

    def _folder(self, number: int) -> Path:
        return trial_dir.trial_path(self.out, number)

    # ------------------------------------------------------------ running a trial

    def launch(self, job: Job, index: int) -> int:
        """`fsdp-ft run` of the trial's config in a child process; the heartbeat goes on while it runs."""
        cpus, gpus = self.slices[index]
        # through fsdp_ft.tuning.child: it dies with this worker and keeps to its cores (no preexec_fn in threads)
        cmd = [sys.executable, "-m", "fsdp_ft.tuning.child", ",".join(map(str, sorted(cpus or ()))),
               sys.executable, "-m", "fsdp_ft.cli", "run", f"--nproc-per-node={self.opts.nproc_per_node}",
               f"--shutdown-grace-s={self.opts.shutdown_grace_s:g}", str(job.folder / "trial.yaml")]
        env = {**os.environ, trial_dir.TRIAL_ENV: str(job.folder / "trial.json")}
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        what = f"resumes ({job.resumed})" if job.resumed else "starts"
        self.say(f"trial {job.number} {what}: {_params_text(job.params)}")
        t0 = time.monotonic()
        with open(job.folder / "console.log", "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {self.name}: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.children[index] = proc
            if self.stop_signal:  # a signal that came while it started
                proc.send_signal(signal.SIGTERM)
            last_beat = 0.0
            while proc.poll() is None:
                if time.monotonic() - last_beat > HEARTBEAT_S:
                    trial_dir.beat(job.folder)
                    last_beat = time.monotonic()
                time.sleep(0.2)
            self.children.pop(index, None)
        info = trial_dir.read_json(job.folder / "trial.json") or {}
        info["wall_s"] = info.get("wall_s", 0.0) + time.monotonic() - t0
        trial_dir.write_json(job.folder / "trial.json", info)
        return proc.returncode

    def judge(self, job: Job, code: int) -> Outcome:
        """How the run ended, from its exit code and its metrics.jsonl."""
        rows, _ = read_metrics_file(job.folder / "metrics.jsonl")
        train = [r for r in rows if "split" not in r]
        evals = [r for r in rows if r.get("split") == "eval"]
        info = trial_dir.read_json(job.folder / "trial.json") or {}
        facts = {"step": max((r.get("step", 0) for r in rows), default=0), "wall_s": round(info.get("wall_s", 0), 2),
                 "tokens": train[-1].get("tokens") if train else None,
                 "peak_mem_bytes": max((r.get("peak_mem_bytes", 0) for r in train), default=None),
                 "tokens_per_s": _mean([r.get("tokens_per_s") for r in train])}
        if code in STOPPED:  # it saved (or was stopped in its set-up: taken over, it fails and is asked again)
            return Outcome("STOPPED", facts=facts)
        if code != 0:
            return Outcome("FAIL", reason=_failure_line(job.folder / "console.log", code), facts=facts)
        bad = next((r for r in train if not _finite(r.get("loss"))), None)
        if bad is not None:
            return Outcome("FAIL", reason=f"training loss is {bad.get('loss')} at step {bad.get('step')}", facts=facts)
        if any(r.get("split") == "pruned" for r in rows):
            return Outcome("PRUNED", facts=facts)
        values = []
        for objective in self.spec.objectives:
            value = facts.get(objective.metric) if objective.source == "run" else _eval_value(evals, objective.metric)
            if not _finite(value):
                have = sorted({k for r in evals for k, v in r.items() if isinstance(v, (int, float))} - {"step", "epoch"})
                why = (f"is {value}" if value is not None else f"is not reported (eval rows have {have})")
                return Outcome("FAIL", reason=f"objective '{objective.metric}' {why}", facts=facts)
            values.append(float(value))
        return Outcome("COMPLETE", values=values, facts=facts)

    def tell(self, study, storage, job: Job, outcome: Outcome) -> None:
        from optuna.trial import TrialState

        trial_id = self._trial_id(storage, job.number)
        for key, value in outcome.facts.items():
            if value is not None:
                storage.set_trial_user_attr(trial_id, key, value)
        if outcome.reason:
            storage.set_trial_user_attr(trial_id, "fail_reason", outcome.reason)
        state = {"COMPLETE": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED, "FAIL": TrialState.FAIL}[outcome.state]
        study.tell(job.number, outcome.values if outcome.state == "COMPLETE" else None, state=state)
        self.say(self._progress(study, job, outcome))

    def _progress(self, study, job: Job, outcome: Outcome) -> str:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        names = [o.metric for o in self.spec.objectives]
        result = {"COMPLETE": ", ".join(f"{n}={v:.5g}" for n, v in zip(names, outcome.values)),
                  "PRUNED": f"at step {outcome.facts.get('step')}", "FAIL": outcome.reason}[outcome.state]
        best = ""
        if len(names) == 1 and any(t.state == TrialState.COMPLETE for t in trials):
            b = study.best_trial
            best = f" | best: trial {b.number} {names[0]}={b.value:.5g}"
        return (f"trial {job.number} {outcome.state} {result} | {_params_text(job.params)} | "
                f"{outcome.facts.get('wall_s', 0):.0f} s{best} | {done}/{self.opts.trials} done")

    def say(self, line: str) -> None:
        with self.print_lock:
            print(f"[tune] {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- helpers


def _eval_value(evals: list[dict], metric: str):
    """The trial's objective: the best eval value when train.best_metric ranks by it (final/ is that step), else
    the last eval's."""
    if not evals:
        return None
    last = evals[-1]
    if last.get("best_step") is not None and metric in last and _finite(last.get("best_value")):
        best_row = next((r for r in evals if r.get("step") == last["best_step"]), None)
        if best_row is not None and best_row.get(metric) == last["best_value"]:
            return last["best_value"]
    return last.get(metric)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: list) -> float | None:
    values = [v for v in values if _finite(v)]
    return sum(values) / len(values) if values else None


def _failure_line(console: Path, code: int) -> str:
    """The line that says why a run failed: its one-line error, else the last traceback line, else the code."""
    try:
        lines = [ln.strip() for ln in console.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    for marker in ("fsdp-ft: error", "Error:", "error:"):
        hit = [ln for ln in lines if marker in ln]
        if hit:
            return hit[-1][:300]
    return f"exit code {code}" + (f": {lines[-1][:200]}" if lines else "")


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _baseline_attr(t) -> dict:
    return {"baseline": True} if t.user_attrs.get("baseline") else {}


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


def _git_revision() -> str | None:
    """The source revision of the fsdp_ft that runs the trials (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return res.stdout.strip() + ("+changes" if dirty else "")


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _resource_slices(parallel: int, nproc: int) -> list[tuple[set[int] | None, str | None]]:
    """Each parallel trial's CPU cores (its share of this process's) and GPUs (CUDA_VISIBLE_DEVICES), so K trials
    at a time do not fight over the same ones. One trial at a time keeps everything."""
    if parallel == 1:
        return [(None, None)]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    per = len(cores) // parallel
    cpu = [set(cores[i * per:(i + 1) * per]) if per else None for i in range(parallel)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g] if visible is not None else _gpu_indices()
    if gpus and len(gpus) < parallel * nproc:
        raise UserError(f"--parallel {parallel} x --nproc-per-node {nproc} needs {parallel * nproc} GPUs; "
                        f"{len(gpus)} are visible")
    gpu = [",".join(gpus[i * nproc:(i + 1) * nproc]) if gpus else None for i in range(parallel)]
    return list(zip(cpu, gpu))


def _gpu_indices() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, _ in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]
