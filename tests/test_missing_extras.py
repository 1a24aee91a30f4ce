"""A missing optional package (a pyproject extra) stops the command with one line naming the key (or subcommand)
and the extra to install, before any rank starts.

The CLI runs for real with the package made unimportable in its processes: a sitecustomize.py first on PYTHONPATH
sets `sys.modules[name] = None`, Python's own mark for a module that cannot be imported (`import` raises
ModuleNotFoundError and `importlib.util.find_spec` says None, as for a package that is not installed). The same file
records, at exit, each Python process that ran and whether it had imported torch: exactly one process (the CLI; no
rank was spawned) that never imported torch (a rank imports torch before any work) means the check came first.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fsdp_ft.config import load_config, require_extras
from fsdp_ft.config.extras import NEEDS
from fsdp_ft.errors import ConfigError
from test_errors import LAUNCH_VARS, REPO, TINY, assert_user_error

SITECUSTOMIZE = """\
import atexit, json, os, sys

for name in filter(None, os.environ.get("FSDP_FT_TEST_BLOCK", "").split(",")):
    sys.modules[name] = None


@atexit.register
def record():
    with open(os.path.join(os.environ["FSDP_FT_TEST_PROCS"], f"{os.getpid()}.json"), "w") as f:
        json.dump({"argv": sys.argv, "torch": "torch" in sys.modules}, f)
"""


def cli_without(tmp_path: Path, block: list[str], *args: str, broken: dict[str, str] | None = None):
    """`fsdp-ft ARGS` with the `block`ed packages missing and each `broken` package's import raising the given
    line of code; returns (process, one record per Python process that ran)."""
    site, procs = tmp_path / "site", tmp_path / "procs"
    site.mkdir()
    procs.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    for name, code in (broken or {}).items():
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(code + "\n")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHONPATH=str(site), FSDP_FT_TEST_BLOCK=",".join(block), FSDP_FT_TEST_PROCS=str(procs),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "fsdp_ft.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    return proc, [json.loads(p.read_text()) for p in procs.iterdir()]


def assert_stopped_before_ranks(records: list[dict], out: Path) -> None:
    assert len(records) == 1, f"more than the CLI's own process ran: {records}"
    assert not records[0]["torch"], "torch was imported before the check"
    assert not out.exists(), f"{out} was created"  # so no logs/rank-N.log, no metrics.jsonl, no config.yaml


# ---------------------------------------------------------------- through the real CLI

def test_train_without_gguf(tmp_path):
    out = tmp_path / "run"
    proc, records = cli_without(tmp_path, ["gguf"], "train", TINY, f"output_dir={out}", "model.gguf_file=m.gguf")
    line = assert_user_error(proc, "config key 'model.gguf_file' needs the gguf package",
                             "pip install 'fsdp_ft[gguf]'")
    assert "import failed" not in line  # simply not installed: no tail
    assert_stopped_before_ranks(records, out)


def test_train_with_a_broken_gguf_install(tmp_path):
    out = tmp_path / "run"
    proc, records = cli_without(tmp_path, [], "train", TINY, f"output_dir={out}", "model.gguf_file=m.gguf",
                                broken={"gguf": "raise RuntimeError('built against another numpy')"})
    assert_user_error(proc, "'model.gguf_file' needs the gguf package",
                      "(its import failed: RuntimeError: built against another numpy)", "fsdp_ft[gguf]")
    assert_stopped_before_ranks(records, out)


@pytest.mark.parametrize("block, override, named, extra", [
    ("tensorboard", "train.tensorboard=true", "config key 'train.tensorboard'", "tracking"),
    ("wandb", "wandb.project=p", "config key 'wandb.project'", "wandb"),
    ("deepspeed", "engine=deepspeed", "config key 'engine'=deepspeed", "deepspeed"),
])
def test_run_two_ranks_without_the_package(tmp_path, block, override, named, extra):
    out = tmp_path / "run"
    proc, records = cli_without(tmp_path, [block], "run", "--nproc-per-node", "2", TINY, f"output_dir={out}",
                                override)
    assert_user_error(proc, f"{named} needs the {block} package", f"pip install 'fsdp_ft[{extra}]'")
    assert_stopped_before_ranks(records, out)


def test_submit_dry_run_without_submitit(tmp_path):
    out = tmp_path / "run"
    proc, records = cli_without(tmp_path, ["submitit"], "submit", TINY, "--dry-run", f"output_dir={out}")
    assert_user_error(proc, "`fsdp-ft submit` needs the submitit package", "pip install 'fsdp_ft[slurm]'")
    assert proc.stdout == ""  # no batch script
    assert_stopped_before_ranks(records, out)


def test_submit_names_every_missing_package_in_one_line(tmp_path):
    out = tmp_path / "run"
    proc, records = cli_without(tmp_path, ["submitit", "gguf"], "submit", TINY, "--dry-run", "--nodes", "2",
                                f"output_dir={out}", "model.gguf_file=m.gguf")
    assert_user_error(proc, "'model.gguf_file' needs the gguf package", "`fsdp-ft submit` needs the submitit package",
                      "pip install 'fsdp_ft[gguf,slurm]'")
    assert_stopped_before_ranks(records, out)


@pytest.mark.parametrize("args, named", [
    (["tune", TINY], "`fsdp-ft tune`"),
    (["submit", "--tune", "--dry-run", TINY], "`fsdp-ft submit --tune`"),
])
def test_search_without_optuna(tmp_path, args, named):
    out = tmp_path / "search"
    proc, records = cli_without(tmp_path, ["optuna"], *args, f"output_dir={out}")
    assert_user_error(proc, f"{named} needs the optuna package", "pip install 'fsdp_ft[tune]'")
    assert_stopped_before_ranks(records, out)


def test_plan_without_gguf(tmp_path):
    out = tmp_path / "run"
    proc, records = cli_without(tmp_path, ["gguf"], "plan", TINY, f"output_dir={out}", "model.gguf_file=m.gguf")
    assert_user_error(proc, "'model.gguf_file' needs the gguf package", "fsdp_ft[gguf]")
    assert_stopped_before_ranks(records, out)


# ---------------------------------------------------------------- the table itself

def test_every_need_names_a_declared_extra_that_installs_it():
    """The table and pyproject.toml agree: each extra exists and its requirements hold the package."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for need in NEEDS:
        assert need.extra in extras, need
        assert any(req.split(">")[0].split("=")[0].strip() == need.module for req in extras[need.extra]), need


def config(*overrides: str):
    return load_config(None, ["output_dir=/tmp/x", "model.path=/m", "data.train=/d.jsonl", *overrides])


def test_only_what_the_config_and_command_ask_for_is_checked(monkeypatch):
    for name in ("gguf", "deepspeed", "tensorboard", "submitit", "optuna"):
        monkeypatch.setitem(sys.modules, name, None)
    require_extras(config(), "train")  # asks for none of them
    require_extras(config("model.gguf_file=m.gguf", "train.tensorboard=true"), "eval")  # eval builds no base model
    require_extras(config("train.tensorboard=true", "engine=deepspeed"), "plan")  # plan neither logs nor trains
    with pytest.raises(ConfigError, match=r"'model\.gguf_file'.*fsdp_ft\[gguf\]"):
        require_extras(config("model.gguf_file=m.gguf"), "export")  # export reads the base's config from it
    with pytest.raises(ConfigError, match=r"^`fsdp-ft tune` needs the optuna package: pip install 'fsdp_ft\[tune\]'$"):
        require_extras(None, "tune")


def test_installed_packages_pass():
    for need in NEEDS:
        if importlib.util.find_spec(need.module) is None:
            pytest.skip(f"{need.module} is not installed here")
    require_extras(config("model.gguf_file=m.gguf", "train.tensorboard=true", "engine=deepspeed"), "submit --tune")
