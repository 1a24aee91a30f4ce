"""The search space and the search's settings: the `tune:` section of a config file (or `--space FILE`), checked
against the config schema before any trial starts.

    tune:
      objective: accuracy                  # an eval metric of the task; direction auto: min for losses
      space:
        optim.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
        optim.warmup_steps: {type: int, low: 0, high: 20, step: 5}
        finetune.method: {type: categorical, choices: [lora, full]}
        finetune.lora.r: {type: int, low: 4, high: 32, log: true, when: {finetune.method: [lora, qlora]}}
        lora_shape: {type: paired, keys: [finetune.lora.r, finetune.lora.alpha], choices: [[8, 16], [16, 32]]}

A dimension is named by its config key, except a paired set (several keys that change together), which takes a
free name. `when` makes a dimension depend on values of earlier dimensions (or of the base config).
Every bound and choice is loaded into the base config and validated like a run's own config, so a value a key
rejects fails here, with the dimension's name, and nothing runs.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsdp_ft.config import TUNE_SECTION, Config, all_keys, load_config, read_tree, show_value
from fsdp_ft.errors import ConfigError

SAMPLERS = ("tpe", "gp", "cmaes", "random", "grid")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")
DIRECTIONS = ("auto", "maximize", "minimize")
LOWER_IS_BETTER = ("loss", "perplexity", "mem", "bytes", "_s")  # objective names whose auto direction is minimize
SECOND_OBJECTIVES = {"tokens_per_s": "maximize", "peak_mem_bytes": "minimize", "wall_s": "minimize"}
PER_TRIAL_KEYS = ("output_dir", "resume", "overwrite")  # set by the search for each trial
TYPES = ("float", "int", "categorical", "paired")


@dataclass
class Dimension:
    name: str                   # the config key, or a paired set's own name
    kind: str                   # one of TYPES
    keys: list[str]             # the config keys it sets (one, except for paired)
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list = field(default_factory=list)   # categorical: values; paired: lists of values (one per key)
    when: dict[str, list] = field(default_factory=dict)

    def labels(self) -> list:
        """What Optuna sees for a categorical or paired choice: the value itself when Optuna can store it, else
        its YAML text (lists, paired values)."""
        if self.kind == "categorical" and all(c is None or isinstance(c, (bool, int, float, str)) for c in self.choices):
            return list(self.choices)
        return [show_value(c) for c in self.choices]

    def settings(self, sampled) -> dict[str, Any]:
        """Config key -> value for what Optuna sampled."""
        if self.kind in ("categorical", "paired"):
            value = self.choices[self.labels().index(sampled)]
            return dict(zip(self.keys, value)) if self.kind == "paired" else {self.keys[0]: value}
        return {self.keys[0]: sampled}

    def distribution(self):
        import optuna.distributions as d

        if self.kind == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return d.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return d.CategoricalDistribution(self.labels())

    def grid(self) -> list:
        """Every value of the dimension, for the grid sampler."""
        if self.kind in ("categorical", "paired"):
            return self.labels()
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ConfigError(f"tune.space '{self.name}': the grid sampler needs a step for a float dimension")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [self.low + i * self.step for i in range(n + 1)]


@dataclass
class Objective:
    metric: str
    direction: str              # maximize / minimize (auto resolved)
    source: str = "eval"        # eval: an eval row's metric; run: tokens_per_s, peak_mem_bytes, wall_s

    def as_dict(self) -> dict:
        return {"metric": self.metric, "direction": self.direction, "source": self.source}


@dataclass
class TuneSpec:
    """Everything the search needs besides the command line's budget and workers."""
    config_path: str            # the base config file (absolute)
    overrides: list[str]        # the command line's key=value overrides of the base config
    base: Config                # the base config, loaded and validated
    dimensions: list[Dimension]
    objectives: list[Objective]
    sampler: str = "tpe"
    seed: int = 0
    pruner: str = "median"
    pruner_warmup_steps: int = 0
    pruner_startup_trials: int = 2
    percentile: float = 25.0
    trials: int = 20
    baseline: bool = True
    study_name: str | None = None

    def fingerprint(self) -> str:
        """What makes two commands the same search: the space, the objectives, the sampler and the base config.
        A re-run with the same fingerprint continues the study; another one is refused."""
        text = json.dumps({"space": [vars(d) for d in self.dimensions], "objectives": [o.as_dict() for o in
                           self.objectives], "sampler": self.sampler, "seed": self.seed,
                           "base": self.base.to_dict()}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def pruner_settings(self) -> dict:
        """make_pruner's arguments (also saved beside each trial, whose rank 0 asks the pruner)."""
        return {"pruner": self.pruner, "warmup_steps": self.pruner_warmup_steps,
                "startup_trials": self.pruner_startup_trials, "percentile": self.percentile}

    def trial_config(self, settings: dict[str, Any], output_dir: str) -> Config:
        """The base config with a trial's values, in its own run folder; validated like any run's config."""
        return load_config(self.config_path, self.overrides, {**settings, "output_dir": output_dir})

    def suggest(self, trial) -> dict[str, Any]:
        """Ask Optuna's trial for a value of every active dimension; the config keys and values they set."""
        settings: dict[str, Any] = {}
        for dim in self.dimensions:
            if not self._active(dim, settings):
                continue
            if dim.kind == "float":
                value = trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log, step=dim.step)
            elif dim.kind == "int":
                value = trial.suggest_int(dim.name, dim.low, dim.high, log=dim.log, step=dim.step or 1)
            else:
                value = trial.suggest_categorical(dim.name, dim.labels())
            settings.update(dim.settings(value))
        return settings

    def baseline_params(self) -> dict[str, Any]:
        """Optuna parameters that reproduce the base config (trial 0)."""
        params, settings = {}, {}
        for dim in self.dimensions:
            if not self._active(dim, settings):
                continue
            values = [_get(self.base, k) for k in dim.keys]
            if dim.kind in ("float", "int"):
                params[dim.name] = values[0]
            else:
                wanted = values if dim.kind == "paired" else values[0]
                params[dim.name] = dim.labels()[dim.choices.index(wanted)]
            settings.update(dict(zip(dim.keys, values)))
        return params

    def _active(self, dim: Dimension, settings: dict[str, Any]) -> bool:
        return all((settings[k] if k in settings else _get(self.base, k)) in allowed for k, allowed in dim.when.items())


def _get(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def auto_direction(metric: str) -> str:
    return "minimize" if any(word in metric for word in LOWER_IS_BETTER) else "maximize"


def read_spec(config_path: str, overrides: list[str], space_file: str | None = None) -> TuneSpec:
    """The search a config file (its `tune:` section, or `space_file`'s) describes, checked in full."""
    base = load_config(config_path, overrides)
    if space_file is not None:
        section = read_tree(space_file)
        section = section.get(TUNE_SECTION, section)
        where = f"'{space_file}'"
    else:
        section = read_tree(config_path).get(TUNE_SECTION)
        where = f"config file '{config_path}'"
        if section is None:
            raise ConfigError(f"{where} has no '{TUNE_SECTION}:' section: add one with the objective and the "
                              "search space (docs/tuning.md), or pass --space FILE")
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: '{TUNE_SECTION}' must be a mapping (objective, space, ...)")
    known = {"objective", "direction", "second_objective", "space", "sampler", "seed", "pruner",
             "pruner_warmup_steps", "pruner_startup_trials", "percentile", "trials", "baseline", "study_name"}
    for key in section:
        if key not in known:
            raise ConfigError(f"unknown key 'tune.{key}' in {where}; the keys are {sorted(known)}")
    spec = TuneSpec(config_path=str(Path(config_path).resolve()), overrides=list(overrides), base=base,
                    dimensions=[], objectives=[])
    spec.sampler = _choice(section, "sampler", SAMPLERS, "tpe")
    spec.pruner = _choice(section, "pruner", PRUNERS, "median")
    for key, default in (("seed", 0), ("pruner_warmup_steps", 0), ("pruner_startup_trials", 2), ("trials", 20)):
        value = section.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "trials" else 0):
            raise ConfigError(f"tune.{key} must be an integer >= {1 if key == 'trials' else 0}, got {value!r}")
        setattr(spec, key, value)
    spec.percentile = float(section.get("percentile", 25.0))
    if not 0 < spec.percentile < 100:
        raise ConfigError(f"tune.percentile must be between 0 and 100, got {spec.percentile}")
    spec.baseline = bool(section.get("baseline", True)) and spec.sampler != "grid"  # a grid visits every point
    spec.study_name = section.get("study_name")
    spec.objectives = _objectives(section)
    if len(spec.objectives) > 1 and spec.pruner != "none":
        raise ConfigError("tune.pruner must be none with a second objective: Optuna prunes on one intermediate "
                          "value, and a trial stopped early has no value of the second objective to put on the "
                          "Pareto front")
    if len(spec.objectives) > 1 and spec.sampler in ("cmaes", "gp"):
        raise ConfigError(f"tune.sampler {spec.sampler} optimises one objective; with tune.second_objective use tpe, "
                          "random or grid")
    space = section.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError("tune.space must map config keys to ranges, e.g. optim.lr: {type: float, low: 1.0e-5, "
                          "high: 1.0e-3, log: true}")
    for name, body in space.items():
        spec.dimensions.append(_dimension(str(name), body, spec))
    _check_values(spec)
    if spec.sampler == "grid":
        for dim in spec.dimensions:
            dim.grid()
    return spec


def _choice(section: dict, key: str, allowed: tuple, default: str) -> str:
    value = section.get(key, default)
    if value not in allowed:
        raise ConfigError(f"tune.{key} must be one of {list(allowed)}, got {value!r}")
    return value


def _objectives(section: dict) -> list[Objective]:
    metric = section.get("objective")
    if not isinstance(metric, str) or not metric:
        raise ConfigError("tune.objective must name an eval metric (e.g. accuracy, f1_macro, loss, perplexity, "
                          "reward_accuracy)")
    direction = _choice(section, "direction", DIRECTIONS, "auto")
    out = [Objective(metric, auto_direction(metric) if direction == "auto" else direction)]
    second = section.get("second_objective")
    if second is not None:
        if isinstance(second, str):
            second = {"metric": second}
        if not isinstance(second, dict) or not isinstance(second.get("metric"), str):
            raise ConfigError("tune.second_objective must be a metric name or {metric, direction}")
        name = second["metric"]
        source = "run" if name in SECOND_OBJECTIVES else "eval"
        direction = second.get("direction", "auto")
        if direction not in DIRECTIONS:
            raise ConfigError(f"tune.second_objective.direction must be one of {list(DIRECTIONS)}, got {direction!r}")
        if direction == "auto":
            direction = SECOND_OBJECTIVES.get(name) or auto_direction(name)
        out.append(Objective(name, direction, source))
    return out


def _dimension(name: str, body, spec: TuneSpec) -> Dimension:
    where = f"tune.space '{name}'"
    keys = {k for k, *_ in all_keys()}
    if not isinstance(body, dict) or body.get("type") not in TYPES:
        raise ConfigError(f"{where} must be a mapping with type one of {list(TYPES)}, got {body!r}")
    allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
               "categorical": {"choices"}, "paired": {"keys", "choices"}}[body["type"]] | {"type", "when"}
    for k in body:
        if k not in allowed:
            raise ConfigError(f"{where}: unknown field '{k}' for type {body['type']} (fields: {sorted(allowed)})")
    kind = body["type"]
    dim_keys = body.get("keys") if kind == "paired" else [name]
    if kind == "paired":
        if not isinstance(dim_keys, list) or len(dim_keys) < 2:
            raise ConfigError(f"{where}: a paired set needs keys: [two or more config keys]")
        if name in keys:
            raise ConfigError(f"{where}: name a paired set by a word that is not a config key (e.g. lora_shape)")
    for key in dim_keys:
        if key in PER_TRIAL_KEYS:
            raise ConfigError(f"{where}: '{key}' cannot be searched: the search sets it for each trial")
        if key not in keys:
            load_config(spec.config_path, spec.overrides, {key: None})  # raises the loader's "unknown key ... did you mean"
            raise ConfigError(f"{where}: '{key}' is a section of the config; name one of its keys")
    dim = Dimension(name=name, kind=kind, keys=list(dim_keys))
    if kind in ("float", "int"):
        for bound in ("low", "high"):
            value = body.get(bound)
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{where}: '{bound}' must be a number, got {body.get(bound)!r}")
            if kind == "int" and value != int(value):
                raise ConfigError(f"{where}: '{bound}' must be an integer for type int, got {value!r}")
            setattr(dim, bound, int(value) if kind == "int" else float(value))
        dim.log, dim.step = bool(body.get("log", False)), body.get("step")
        if not dim.low < dim.high:
            raise ConfigError(f"{where}: low ({dim.low}) must be below high ({dim.high})")
        if dim.log and dim.low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, got {dim.low}")
        if dim.step is not None:
            if not isinstance(dim.step, (int, float)) or dim.step <= 0 or (kind == "int" and dim.step != int(dim.step)):
                raise ConfigError(f"{where}: 'step' must be a positive {'integer' if kind == 'int' else 'number'}")
            if dim.log:
                raise ConfigError(f"{where}: 'step' and 'log: true' cannot be combined (Optuna samples one or the other)")
            dim.step = int(dim.step) if kind == "int" else float(dim.step)
    else:
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: 'choices' must be a non-empty list")
        if kind == "paired" and not all(isinstance(c, list) and len(c) == len(dim.keys) for c in choices):
            raise ConfigError(f"{where}: each choice must list {len(dim.keys)} values, one per key of {dim.keys}")
        dim.choices = choices
        if len(set(dim.labels())) != len(choices):
            raise ConfigError(f"{where}: 'choices' repeats a value")
    when = body.get("when", {})
    if not isinstance(when, dict):
        raise ConfigError(f"{where}: 'when' must map config keys to allowed values, e.g. {{finetune.method: [lora]}}")
    earlier = {k for d in spec.dimensions for k in d.keys}
    for key, values in when.items():
        if key not in keys:
            raise ConfigError(f"{where}: 'when' names unknown config key '{key}'")
        if key in dim.keys or (key not in earlier and key in {k for d in spec.dimensions for k in d.keys}):
            raise ConfigError(f"{where}: 'when' must depend on an earlier dimension or a fixed key, not '{key}'")
        dim.when[key] = values if isinstance(values, list) else [values]
    return dim


def _probes(dim: Dimension) -> list[dict[str, Any]]:
    """Values that stand for the whole dimension: both bounds, or every choice."""
    if dim.kind in ("float", "int"):
        return [{dim.keys[0]: dim.low}, {dim.keys[0]: dim.high}]
    return [dim.settings(label) for label in dim.labels()]


def _check_values(spec: TuneSpec) -> None:
    """Load every bound and choice into the base config (with its `when` condition met) and validate it."""
    for dim in spec.dimensions:
        condition = {k: v[0] for k, v in dim.when.items()}
        for probe in _probes(dim):
            try:
                load_config(spec.config_path, spec.overrides, {**condition, **probe})
            except ConfigError as e:
                values = ", ".join(f"{k}={show_value(v)}" for k, v in probe.items())
                raise ConfigError(f"tune.space '{dim.name}': {values} is refused: {e}") from None
    if spec.baseline:
        try:
            spec.baseline_params()
        except ValueError:
            dim = next(d for d in spec.dimensions if d.kind in ("categorical", "paired") and
                       _base_missing(spec, d))
            values = [_get(spec.base, k) for k in dim.keys]
            raise ConfigError(f"tune.space '{dim.name}': the base config's value {show_value(values if dim.kind == 'paired' else values[0])} "
                              "is not among the choices, so trial 0 cannot be the base config: add it to the "
                              "choices, or set tune.baseline: false") from None


def _base_missing(spec: TuneSpec, dim: Dimension) -> bool:
    values = [_get(spec.base, k) for k in dim.keys]
    return (values if dim.kind == "paired" else values[0]) not in dim.choices
