"""Best-checkpoint selection: which evaluated step is best by `train.best_metric`.

The choice lives in the trainer state (`TrainState.best`), so it is written into every checkpoint's state.json
and survives a resume; checkpoint pruning never deletes the best step, and `final/` is exported from it.
"""
from __future__ import annotations

from fsdp_ft.config import Config
from fsdp_ft.errors import ConfigError

LOWER_IS_BETTER = ("loss", "perplexity")


def resolve_mode(metric: str, mode: str) -> str:
    """`auto`: lower is better for losses and perplexity, higher for everything else (accuracy, F1, ...)."""
    if mode != "auto":
        return mode
    return "min" if any(word in metric for word in LOWER_IS_BETTER) else "max"


def enabled(cfg: Config) -> bool:
    return bool(cfg.train.best_metric)


def check_metric(cfg: Config, task) -> None:
    """Fail before training when the task never reports the metric (tasks list theirs in `eval_metrics`)."""
    names = getattr(task, "eval_metrics", None)
    if enabled(cfg) and names is not None and cfg.train.best_metric not in names:
        raise ConfigError(f"config key 'train.best_metric': task '{cfg.task}' reports {list(names)}, "
                          f"not {cfg.train.best_metric!r}")


def start(cfg: Config, saved: dict) -> dict:
    """The best so far after a resume: kept when the run still ranks by the same metric and mode, else reset."""
    if not enabled(cfg):
        return {}
    mode = resolve_mode(cfg.train.best_metric, cfg.train.best_mode)
    if saved.get("metric") == cfg.train.best_metric and saved.get("mode") == mode:
        return dict(saved)
    return {"metric": cfg.train.best_metric, "mode": mode}


def update(best: dict, metrics: dict, step: int) -> bool:
    """Record `step` as best when its metric beats the best so far (ties keep the earlier step)."""
    name = best["metric"]
    value = metrics.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        numeric = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        raise ConfigError(f"config key 'train.best_metric': eval reports {numeric}, not {name!r}")
    old = best.get("value")
    better = old is None or (value > old if best["mode"] == "max" else value < old)
    if better:
        best.update(step=step, value=float(value))
    return better
