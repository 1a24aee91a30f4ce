"""The study: where it is stored (by URL), created once per search folder, and the record (`tune.json`) that lets
every worker, a re-run of the command and `fsdp-ft report` open the same one.

Storage URLs:
- default: Optuna's journal file `output_dir/study.journal` (no server; shared file systems across machines);
- `journal:PATH` or a path ending in `.journal`: a journal file elsewhere;
- `sqlite:///PATH`: one worker only (SQLite's file locks serialise, and fail on network file systems);
- `postgresql://...`, `mysql+pymysql://...`: Optuna's RDB storage, for many workers on a cluster.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fsdp_ft.errors import UserError

RECORD = "tune.json"
JOURNAL = "study.journal"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


class StudyError(UserError):
    """A storage URL that cannot be used, or a search folder that holds another search."""


def masked(url: str) -> str:
    """The URL without its password, for messages and the terminal."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


def resolve_url(url: str | None, output_dir: str | Path, workers: int) -> str:
    """The storage URL a search uses; refuses what cannot work with `workers` concurrent workers."""
    if url is None:
        return f"journal:{Path(output_dir).resolve() / JOURNAL}"
    if url.startswith("journal:") or url.endswith(".journal"):
        path = url.removeprefix("journal:")
        return f"journal:{Path(path).resolve()}"
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in RDB_SCHEMES:
        raise StudyError(f"--storage '{masked(url)}' is not a storage URL fsdp_ft knows: use journal:PATH (or a "
                         "path ending in .journal), sqlite:///PATH, postgresql://USER:PASS@HOST/DB or "
                         "mysql+pymysql://USER:PASS@HOST/DB")
    if scheme == "sqlite" and workers > 1:
        raise StudyError(f"--storage '{url}': SQLite takes one writer at a time and its locks fail on network file "
                         f"systems, so it cannot serve {workers} workers; leave --storage out (a journal file in "
                         "output_dir), or use postgresql:// or mysql+pymysql://")
    return url


def open_storage(url: str):
    """Optuna's storage object for a resolved URL; one line when the database cannot be reached."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        if not path.parent.is_dir():
            raise StudyError(f"--storage '{url}': folder '{path.parent}' does not exist")
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except ImportError as e:
        raise StudyError(f"--storage '{masked(url)}' needs a database driver that is not installed: {e}; e.g. "
                         "pip install pymysql (mysql+pymysql://) or psycopg2-binary (postgresql://)") from None
    except Exception as e:  # sqlalchemy's OperationalError and friends: the first line says why
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise StudyError(f"--storage '{masked(url)}': cannot open the database: {line}") from None


@dataclass
class Record:
    """tune.json: what every worker and `fsdp-ft report` need to open the study."""
    study_name: str
    storage: str
    fingerprint: str
    objectives: list[dict]
    pruner: str
    sampler: str
    seed: int
    trials: int

    @staticmethod
    def read(output_dir: str | Path) -> "Record | None":
        path = Path(output_dir) / RECORD
        if not path.is_file():
            return None
        try:
            return Record(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise StudyError(f"'{path}' is damaged ({e}); it names the study of this folder: restore it, or "
                             "search in another output_dir") from None

    def write(self, output_dir: str | Path) -> None:
        path = Path(output_dir) / RECORD
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(vars(self), indent=1))
        os.replace(tmp, path)


def default_study_name(output_dir: str | Path) -> str:
    import hashlib

    out = Path(output_dir).resolve()
    return f"fsdp-ft-{out.name}-{hashlib.sha256(str(out).encode()).hexdigest()[:8]}"


def create_or_continue(spec, output_dir: str | Path, url: str):
    """The study of this search folder: created on the first run of the command, continued by a re-run with the
    same search; a different search in the same folder is refused (it would mix two searches in one study)."""
    import optuna

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = Record.read(out)
    if old is not None:
        if old.fingerprint != spec.fingerprint():
            raise StudyError(f"'{out / RECORD}' holds a search with another space, objective, sampler or base config "
                             f"(fingerprint {old.fingerprint}, now {spec.fingerprint()}); search in another "
                             "output_dir, or restore the config this study was started with")
        if old.storage != url:
            raise StudyError(f"'{out / RECORD}' keeps its study in '{masked(old.storage)}', not '{masked(url)}': "
                             "re-run with the same --storage (or none)")
        study = optuna.load_study(study_name=old.study_name, storage=open_storage(url),
                                  sampler=make_sampler(spec), pruner=make_pruner(**spec.pruner_settings()))
        return study, old
    name = spec.study_name or default_study_name(out)
    directions = [o.direction for o in spec.objectives]
    storage = open_storage(url)
    if name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}:
        raise StudyError(f"storage '{masked(url)}' already holds a study named '{name}' that this folder has no "
                         f"{RECORD} for; set tune.study_name to another name, or search in that study's folder")
    study = optuna.create_study(study_name=name, storage=storage, directions=directions, sampler=make_sampler(spec),
                                pruner=make_pruner(**spec.pruner_settings()))
    study.set_metric_names([o.metric for o in spec.objectives])
    study.set_user_attr("fingerprint", spec.fingerprint())
    study.set_user_attr("base_config", spec.config_path)
    if spec.baseline and spec.sampler != "grid":  # a grid visits every point; an enqueued one would be run twice
        with _quiet_optuna():
            study.enqueue_trial(spec.baseline_params(), user_attrs={"baseline": True})
    record = Record(study_name=name, storage=url, fingerprint=spec.fingerprint(),
                    objectives=[o.as_dict() for o in spec.objectives], pruner=spec.pruner, sampler=spec.sampler,
                    seed=spec.seed, trials=spec.trials)
    record.write(out)
    return study, record


def load(output_dir: str | Path, spec=None):
    """The study of a search folder and its record (for workers, `fsdp-ft report`, the summary)."""
    import optuna

    record = Record.read(output_dir)
    if record is None:
        raise StudyError(f"'{output_dir}' holds no search ({RECORD} is missing): start one with `fsdp-ft tune`")
    kwargs = {"sampler": make_sampler(spec), "pruner": make_pruner(**spec.pruner_settings())} if spec is not None else {}
    return optuna.load_study(study_name=record.study_name, storage=open_storage(record.storage), **kwargs), record


def make_sampler(spec, seed: int | None = None):
    """The sampler tune.sampler names, seeded with `seed` (default tune.seed; each worker passes its own)."""
    import optuna

    seed = spec.seed if seed is None else seed
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constant_liar=True)  # parallel workers spread out instead of repeating
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    grid = {d.name: d.grid() for d in spec.dimensions}

    class Grid(optuna.samplers.GridSampler):
        """Optuna's grid calls study.stop() once the grid is covered, which raises outside study.optimize and
        would lose the tell of the last trial; the workers ask `is_exhausted` instead."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Grid(grid, seed=seed)


def make_pruner(pruner: str, warmup_steps: int = 0, startup_trials: int = 2, percentile: float = 25.0):
    """Optuna's pruner by name (tune.pruner), with the warm-up of tune.pruner_warmup_steps / _startup_trials."""
    import optuna

    p = optuna.pruners
    warm = dict(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)
    if pruner == "none":
        return p.NopPruner()
    if pruner == "median":
        return p.MedianPruner(**warm)
    if pruner == "percentile":
        return p.PercentilePruner(percentile, **warm)
    inner = p.SuccessiveHalvingPruner() if pruner == "successive_halving" else p.HyperbandPruner()
    return _warmed_up(inner, warmup_steps) if warmup_steps else inner


def _warmed_up(inner, warmup: int):
    """Successive halving and Hyperband have no warm-up of their own: no pruning before `warmup` steps."""
    import optuna

    class WarmedUp(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            step = trial.last_step
            return step is not None and step >= warmup and inner.prune(study, trial)

    return WarmedUp()


@contextlib.contextmanager
def _quiet_optuna():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
