"""A run that is one trial of a search (`fsdp-ft tune`): rank 0 reports each eval's objective to the study and asks
the pruner; every rank gets the answer in the same step, as they do a stop signal, and the run ends there.

The search's worker starts the trial with FSDP_FT_TRIAL pointing at the trial's `trial.json` (storage URL, study
name, trial number, objective). Without it a run is an ordinary run: rerunning a trial's config by hand, or
`best.yaml`, reports nothing.
"""
from __future__ import annotations

import json
import math
import os

from fsdp_ft.runtime.distributed import max_over_ranks
from fsdp_ft.tuning.trial_dir import TRIAL_ENV


class TrialLink:
    def __init__(self, spec: dict, is_main: bool):
        self.metric, self.is_main = spec["objective"], is_main
        self.reports = spec["report"]  # one objective: its eval values are the trial's intermediate values
        self.prunes = self.reports and spec["pruner"]["pruner"] != "none"
        self.trial = None
        if is_main and self.reports:
            import optuna

            from fsdp_ft.tuning.study import make_pruner, open_storage

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            storage = open_storage(spec["storage"])
            study = optuna.load_study(study_name=spec["study_name"], storage=storage,
                                      pruner=make_pruner(**spec["pruner"]), sampler=optuna.samplers.RandomSampler())
            study_id = storage.get_study_id_from_name(spec["study_name"])
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, spec["number"])
            self.trial = optuna.trial.Trial(study, trial_id)

    def should_prune(self, step: int, metrics: dict, last: bool = False) -> bool:
        """Report this eval (rank 0) and agree on pruning (every rank; one tiny all-reduce). The last step's eval
        is reported only: the trial is complete."""
        if not self.reports:
            return False
        decision = 0
        if self.trial is not None:
            value = metrics.get(self.metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.trial.report(float(value), step)
                decision = int(not last and self.trial.should_prune())
        if last or not self.prunes:  # every rank knows it: no collective
            return False
        return bool(max_over_ranks(decision))


def _spec() -> dict | None:
    """The trial.json the search's worker pointed this run at, or None."""
    path = os.environ.get(TRIAL_ENV)
    if not path:
        return None
    with open(path) as f:
        return json.load(f)


def study_name() -> str | None:
    """The search this run is a trial of, or None."""
    spec = _spec()
    return None if spec is None else spec["study_name"]


def from_env(is_main: bool) -> TrialLink | None:
    spec = _spec()
    return None if spec is None else TrialLink(spec, is_main)
