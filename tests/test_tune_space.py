"""The search space and storage checks of `fsdp-ft tune`, before any trial starts: what a space samples
(conditional keys, paired sets, the baseline), and one clear line for every bad space or storage URL, with
nothing created."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import ASSETS, REPO

optuna = pytest.importorskip("optuna")

BASE = {"output_dir": "search", "task": "causal_lm",
        "model": {"path": str(ASSETS / "tiny-llama"), "random_init": True},
        "data": {"train": str(ASSETS / "data" / "tiny_text_train.jsonl"),
                 "eval": str(ASSETS / "data" / "tiny_text_eval.jsonl")},
        "finetune": {"method": "lora", "lora": {"r": 8, "alpha": 16.0}},
        "optim": {"lr": 2.0e-4}}
SPACE = {"optim.lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-3, "log": True},
         "finetune.method": {"type": "categorical", "choices": ["lora", "full"]},
         "finetune.lora.dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.05,
                                   "when": {"finetune.method": ["lora", "qlora"]}},
         "lora_shape": {"type": "paired", "keys": ["finetune.lora.r", "finetune.lora.alpha"],
                        "choices": [[8, 16], [16, 32], [32, 64]], "when": {"finetune.method": ["lora"]}}}


def config_file(tmp_path, tune: dict | None = None, name: str = "c.yaml", **base) -> str:
    tree = {**BASE, **base, "output_dir": str(tmp_path / "search")}
    if tune is not None:
        tree["tune"] = tune
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def spec_of(tmp_path, space=None, **tune):
    from fsdp_ft.tuning.space import read_spec

    return read_spec(config_file(tmp_path, {"objective": "loss", "space": space or SPACE, **tune}), [])


def test_conditional_keys_and_paired_sets_set_the_config(tmp_path):
    spec = spec_of(tmp_path)
    lora = spec.suggest(optuna.trial.FixedTrial({"optim.lr": 1e-4, "finetune.method": "lora",
                                                 "finetune.lora.dropout": 0.1, "lora_shape": "[16, 32]"}))
    assert lora == {"optim.lr": 1e-4, "finetune.method": "lora", "finetune.lora.dropout": 0.1,
                    "finetune.lora.r": 16, "finetune.lora.alpha": 32}
    cfg = spec.trial_config(lora, str(tmp_path / "t"))
    assert (cfg.finetune.lora.r, cfg.finetune.lora.alpha, cfg.optim.lr) == (16, 32.0, 1e-4)
    # full fine-tuning: neither the dropout nor the LoRA shape is asked (FixedTrial raises on a missing one)
    full = spec.suggest(optuna.trial.FixedTrial({"optim.lr": 1e-4, "finetune.method": "full"}))
    assert full == {"optim.lr": 1e-4, "finetune.method": "full"}


def test_the_baseline_is_the_base_config(tmp_path):
    spec = spec_of(tmp_path)
    assert spec.baseline_params() == {"optim.lr": 2.0e-4, "finetune.method": "lora", "finetune.lora.dropout": 0.0,
                                      "lora_shape": "[8, 16]"}
    assert spec.dimensions[3].settings(spec.baseline_params()["lora_shape"]) == {"finetune.lora.r": 8,
                                                                                  "finetune.lora.alpha": 16}


def test_samples_stay_in_the_space_and_conditions_hold(tmp_path):
    spec = spec_of(tmp_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        settings = spec.suggest(trial)
        study.tell(trial, 0.0)
        assert 1e-5 <= settings["optim.lr"] <= 1e-3
        method = settings["finetune.method"]
        seen.add(method)
        assert ("finetune.lora.r" in settings) == ("finetune.lora.dropout" in settings) == (method == "lora")
        if method == "lora":
            assert [settings["finetune.lora.r"], settings["finetune.lora.alpha"]] in [[8, 16], [16, 32], [32, 64]]
            assert round(settings["finetune.lora.dropout"] / 0.05, 6).is_integer()
    assert seen == {"lora", "full"}


def test_directions_default_by_metric_name(tmp_path):
    assert [o.direction for o in spec_of(tmp_path).objectives] == ["minimize"]
    spec = spec_of(tmp_path, objective="accuracy", pruner="none", second_objective="tokens_per_s")
    assert [(o.metric, o.direction, o.source) for o in spec.objectives] == [
        ("accuracy", "maximize", "eval"), ("tokens_per_s", "maximize", "run")]


def test_the_fingerprint_changes_with_the_space_and_not_with_the_budget(tmp_path):
    a = spec_of(tmp_path).fingerprint()
    assert spec_of(tmp_path, trials=50).fingerprint() == a
    narrower = {**SPACE, "optim.lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-4, "log": True}}
    assert spec_of(tmp_path, space=narrower).fingerprint() != a


BAD_SPACES = [
    ({"optim.lrr": {"type": "float", "low": 1e-5, "high": 1e-3}}, "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    ({"optim": {"type": "float", "low": 1e-5, "high": 1e-3}}, "'optim' is a section of the config"),
    ({"train.micro_batch_size": {"type": "int", "low": 0, "high": 8}},
     "tune.space 'train.micro_batch_size': train.micro_batch_size=0 is refused: config key 'train.micro_batch_size' must be >= 1"),
    ({"optim.schedule": {"type": "categorical", "choices": ["cosine", "cyclic"]}},
     "optim.schedule=cyclic is refused: config key 'optim.schedule' must be one of"),
    ({"optim.lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "a log range needs low > 0"),
    ({"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-5}}, "low (0.001) must be below high (1e-05)"),
    ({"train.seq_len": {"type": "int", "low": 32.5, "high": 64}}, "'low' must be an integer for type int"),
    ({"optim.lr": {"type": "uniform", "low": 1e-5, "high": 1e-3}}, "must be a mapping with type one of"),
    ({"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "lo": 1}}, "unknown field 'lo' for type float"),
    ({"output_dir": {"type": "categorical", "choices": ["a", "b"]}}, "'output_dir' cannot be searched"),
    ({"s": {"type": "paired", "keys": ["finetune.lora.r", "finetune.lora.alpha"], "choices": [[8, 16], [16]]}},
     "each choice must list 2 values"),
    ({"finetune.lora.r": {"type": "categorical", "choices": [16, 32]}},
     "the base config's value 8 is not among the choices"),
    ({"finetune.lora.r": {"type": "int", "low": 4, "high": 16, "when": {"finetune.metod": ["lora"]}}},
     "'when' names unknown config key 'finetune.metod'"),
]


@pytest.mark.parametrize("space,message", BAD_SPACES, ids=[m[:40] for _, m in BAD_SPACES])
def test_a_bad_space_is_one_clear_error(tmp_path, space, message):
    from fsdp_ft.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        spec_of(tmp_path, space=space)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tune,message", [
    ({"space": SPACE}, "tune.objective must name an eval metric"),
    ({"objective": "loss", "space": SPACE, "sampler": "bayes"}, "tune.sampler must be one of"),
    ({"objective": "loss", "space": SPACE, "pruner": "median", "second_objective": "tokens_per_s"},
     "tune.pruner must be none with a second objective"),
    ({"objective": "loss", "space": SPACE, "trials": 0}, "tune.trials must be an integer >= 1"),
    ({"objective": "loss", "space": SPACE, "budget": 3}, "unknown key 'tune.budget'"),
    ({"objective": "loss", "space": {}}, "tune.space must map config keys to ranges"),
    ({"objective": "loss", "space": {"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3}}, "sampler": "grid"},
     "the grid sampler needs a step"),
])
def test_bad_search_settings_are_one_clear_error(tmp_path, tune, message):
    from fsdp_ft.errors import ConfigError
    from fsdp_ft.tuning.space import read_spec

    with pytest.raises(ConfigError) as e:
        read_spec(config_file(tmp_path, tune), [])
    assert message in str(e.value)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsdp_ft.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args,message", [
    (["--storage", "redis://localhost"], "is not a storage URL fsdp_ft knows"),
    (["--storage", "sqlite:///x.db", "--parallel", "2"], "SQLite takes one writer at a time"),
    (["--storage", "mysql+pymysql://tuner:secret@127.0.0.1:1/db"], "cannot open the database"),
    (["--parallel", "0"], "--parallel must be at least 1"),
    (["--resume"], "holds no search to continue"),
    ([], "has no 'tune:' section"),
])
def test_bad_command_lines_are_one_line_and_start_nothing(tmp_path, args, message):
    tune = None if not args else {"objective": "loss", "space": {"optim.lr": SPACE["optim.lr"]}}
    res = cli("tune", config_file(tmp_path, tune), *args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsdp-ft: error:") and message in lines[0], res.stderr
    assert "secret" not in res.stderr
    assert not (tmp_path / "search" / "trials").exists() and not (tmp_path / "search" / "tune.json").exists()


def test_a_second_search_in_the_same_folder_is_refused(tmp_path):
    from fsdp_ft.errors import UserError
    from fsdp_ft.tuning.search import TuneOptions, prepare

    path = config_file(tmp_path, {"objective": "loss", "space": {"optim.lr": SPACE["optim.lr"]}})
    first = prepare(path, [], TuneOptions(trials=2))[2]
    assert prepare(path, [], TuneOptions(trials=5))[2].study_name == first.study_name  # a re-run continues
    other = config_file(tmp_path, {"objective": "loss", "space": {"optim.lr": {**SPACE["optim.lr"], "high": 1e-2}}},
                        name="other.yaml")
    with pytest.raises(UserError, match="holds a search with another space"):
        prepare(other, [], TuneOptions(trials=2))
    with pytest.raises(UserError, match="keeps its study in"):
        prepare(path, [], TuneOptions(trials=2, storage=str(tmp_path / "elsewhere.journal")))


@pytest.mark.parametrize("sampler", ["tpe", "gp", "cmaes", "random", "grid"])
def test_every_sampler_draws_from_the_space(tmp_path, sampler):
    """Each sampler, as the workers build it, proposes values inside the space over a few trials (after its
    start-up trials for the model-based ones)."""
    from fsdp_ft.tuning.study import make_sampler

    space = {"optim.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-3, "step": 1.0e-4},
             "optim.warmup_steps": {"type": "int", "low": 0, "high": 10, "step": 5}}
    spec = spec_of(tmp_path, space=space, sampler=sampler)
    study = optuna.create_study(sampler=make_sampler(spec))
    for i in range(12):
        trial = study.ask()
        settings = spec.suggest(trial)
        assert 1e-4 - 1e-12 <= settings["optim.lr"] <= 1e-3 + 1e-12 and settings["optim.warmup_steps"] in (0, 5, 10)
        study.tell(trial, (settings["optim.lr"] - 5e-4) ** 2 + settings["optim.warmup_steps"] * 1e-9)
    if sampler == "grid":  # every point of the 10 x 3 grid is distinct
        assert len({tuple(t.params.values()) for t in study.trials}) == 12


def test_the_median_pruner_follows_its_warmup():
    """A clearly worse trial is pruned only from the warm-up step on."""
    from fsdp_ft.tuning.study import make_pruner

    study = optuna.create_study(direction="minimize", pruner=make_pruner("median", warmup_steps=3, startup_trials=1))
    good = study.ask()
    for step in range(1, 6):
        good.report(1.0, step)
    study.tell(good, 1.0)
    bad = study.ask()
    verdicts = []
    for step in range(1, 6):
        bad.report(5.0, step)
        verdicts.append(bad.should_prune())
    assert verdicts == [False, False, True, True, True]
