"""What a finished (or stopped) search leaves for people: a table on the terminal, `best.yaml` (the best trial's
config, rerun as it is with `fsdp-ft train best.yaml`) and `best/` (a link to that trial's final model or adapter).
With two objectives there is no single best: the table marks the Pareto front and nothing is linked."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from fsdp_ft.observability.units import fmt_bytes
from fsdp_ft.tuning import trial_dir

BEST_RUN = "best-run"  # best.yaml's output_dir, inside the search folder: a rerun never touches the trial's folder


def table(study, metrics: list[str]) -> str:
    """One row per trial: number, state, objective(s), step, wall time, tokens, peak memory, params."""
    from optuna.trial import TrialState

    front = {t.number for t in study.best_trials} if len(metrics) > 1 else set()
    best = _best(study, metrics)
    header = ["trial", "state", *metrics, "step", "wall s", "tokens", "peak mem", "params"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        values = t.values if t.state == TrialState.COMPLETE else [None] * len(metrics)
        mark = "*" if (best is not None and t.number == best.number) or t.number in front else ""
        rows.append([f"{t.number}{mark}", t.state.name, *[_fmt(v) for v in values],
                     _fmt(t.user_attrs.get("step")), _fmt(t.user_attrs.get("wall_s"), 0),
                     _fmt(t.user_attrs.get("tokens")),
                     fmt_bytes(t.user_attrs["peak_mem_bytes"]) if t.user_attrs.get("peak_mem_bytes") else "",
                     " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    note = "* best trial" if len(metrics) == 1 else "* on the Pareto front"
    return "\n".join(lines + [note])


def _best(study, metrics: list[str]):
    from optuna.trial import TrialState

    if len(metrics) != 1 or not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    return study.best_trial


def _fmt(v, digits: int = 5) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if digits else f"{v:.0f}"
    return str(v)


def write_best(study, output_dir: str | Path, metrics: list[str]) -> str | None:
    """best.yaml and the best/ link of a one-objective search; what was written, or None."""
    out = Path(output_dir)
    best = _best(study, metrics)
    if best is None:
        return None
    folder = trial_dir.trial_path(out, best.number)
    tree = yaml.safe_load((folder / "trial.yaml").read_text())
    tree["output_dir"] = str(out / BEST_RUN)
    header = (f"# the best trial ({best.number}) of the search in {out}: {metrics[0]}={best.value:.6g}\n"
              f"# params: {dict(best.params)}\n# rerun: fsdp-ft train {out / 'best.yaml'}\n")
    tmp = out / f".best.yaml.{os.getpid()}.tmp"  # workers of an array may finish together
    tmp.write_text(header + yaml.safe_dump(tree, sort_keys=False))
    os.replace(tmp, out / "best.yaml")
    link = out / "best"
    if (folder / "final").is_dir():
        tmp_link = out / f".best.{os.getpid()}.tmp"
        if tmp_link.is_symlink():
            tmp_link.unlink()
        tmp_link.symlink_to(Path(trial_dir.TRIALS) / folder.name / "final")
        os.replace(tmp_link, link)
    return f"best: trial {best.number} ({metrics[0]}={best.value:.6g}); config {out / 'best.yaml'}, model {link}"
