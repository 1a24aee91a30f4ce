"""Config unit tests: YAML + dotted overrides, typing, validation, path resolution, help text, round trip."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fsdp_ft import cli
from fsdp_ft.config import (DTYPES, Config, all_keys, config_from_dict, dump_config, load_config,
                            parse_override)
from fsdp_ft.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ["output_dir=/tmp/fsdp-ft-test-run", "model.path=/models/m", "data.train=/data/train.jsonl"]


def load(*overrides: str) -> Config:
    return load_config(None, [*REQUIRED, *overrides])


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- overrides are YAML-typed

@pytest.mark.parametrize("text, key, value", [
    ("optim.lr=2e-4", "optim.lr", "2e-4"),  # YAML 1.1 reads this as a string; the float key converts it
    ("train.max_steps=5", "train.max_steps", 5),
    ("model.block_classes=[A,B]", "model.block_classes", ["A", "B"]),
    ("data.eval=null", "data.eval", None),
    ("fsdp.cpu_offload=true", "fsdp.cpu_offload", True),
    ("output_dir=/x=y", "output_dir", "/x=y"),
])
def test_parse_override_reads_yaml(text, key, value):
    assert parse_override(text) == (key, value)


def test_override_values_are_typed():
    cfg = load("optim.lr=2e-4", "train.max_steps=5", "model.block_classes=[A,B]", "data.eval=null",
               "finetune.method=partial", "finetune.trainable_regex=[lm_head]")
    assert cfg.optim.lr == pytest.approx(2e-4) and type(cfg.optim.lr) is float
    assert cfg.train.max_steps == 5 and type(cfg.train.max_steps) is int
    assert cfg.model.block_classes == ["A", "B"]
    assert cfg.data.eval is None
    assert cfg.finetune.trainable_regex == ["lm_head"]


def test_int_is_widened_to_float():
    cfg = load("optim.lr=1", "optim.betas=[0, 1]")
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 1.0
    assert all(type(b) is float for b in cfg.optim.betas)


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=true", "train.max_steps"),   # a bool is not an int, although Python says so
    ("train.max_steps=2.5", "train.max_steps"),
    ("train.max_steps=abc", "train.max_steps"),
    ("optim.lr=fast", "optim.lr"),
    ("fsdp.cpu_offload=1", "fsdp.cpu_offload"),
    ("data.text_column=null", "data.text_column"),
    ("optim.betas=[0.9, x]", "optim.betas[1]"),
    ("finetune.trainable_regex=[1]", "finetune.trainable_regex[0]"),
    ("finetune.trainable_regex=lm_head", "finetune.trainable_regex"),
    ("train=3", "train"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load(override)


@pytest.mark.parametrize("override, key", [
    ("finetune.method=lora2", "finetune.method"),
    ("task=regression", "task"),
    ("fsdp.mixed_precision=fp8", "fsdp.mixed_precision"),
    ("optim.schedule=step", "optim.schedule"),
])
def test_choices_are_enforced(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' must be one of")):
        load(override)


# ---------------------------------------------------------------- dtype names: torch's spellings are aliases

DTYPE_KEYS = [key for key, _t, f, _d in all_keys() if set(DTYPES) <= set(f.metadata.get("choices") or ())]
ALIASES = {"fp32": "fp32", "float32": "fp32", "torch.float32": "fp32", "torch.float": "fp32", "FP32": "fp32",
           "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16", "BFloat16": "bf16",
           "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16", "torch.half": "fp16"}


def test_dtype_keys_are_found_in_the_schema():
    """The alias rule reaches every key whose choices are the dtypes, including those added later."""
    assert {"model.dtype", "fsdp.mixed_precision", "fsdp.param_dtype", "fsdp.reduce_dtype"} <= set(DTYPE_KEYS)


@pytest.mark.parametrize("key", DTYPE_KEYS)
@pytest.mark.parametrize("alias, canonical", ALIASES.items())
def test_dtype_alias_loads_as_its_short_name(key, alias, canonical):
    section, _, leaf = key.rpartition(".")
    assert getattr(getattr(load(f"{key}={alias}"), section), leaf) == canonical


def test_dtype_aliases_in_a_yaml_file_and_the_resolved_config(tmp_path):
    path = write(tmp_path / "c.yaml", "output_dir: run\nmodel:\n  path: m\n  dtype: bfloat16\ndata:\n"
                 "  train: d.jsonl\nfsdp:\n  mixed_precision: torch.float16\n  param_dtype: half\n"
                 "  reduce_dtype: float32\n")
    cfg = load_config(path)
    assert (cfg.model.dtype, cfg.fsdp.mixed_precision, cfg.fsdp.param_dtype, cfg.fsdp.reduce_dtype) == \
        ("bf16", "fp16", "fp16", "fp32")
    dump_config(cfg, tmp_path / "config.yaml")  # what the run directory records
    text = (tmp_path / "config.yaml").read_text()
    assert "dtype: bf16" in text and "mixed_precision: fp16" in text
    assert not re.search(r"float|half|torch", text), text
    # the same run whatever the spelling: equal configs, equal run fingerprints (resume compares these)
    from fsdp_ft.checkpoint.run_identity import fingerprint

    short = load_config(path, ["model.dtype=bf16", "fsdp.mixed_precision=fp16", "fsdp.param_dtype=fp16",
                               "fsdp.reduce_dtype=fp32"])
    assert short == cfg and fingerprint(short, 1) == fingerprint(cfg, 1)


@pytest.mark.parametrize("key", DTYPE_KEYS)
def test_unknown_dtype_name_lists_the_accepted_names(key):
    with pytest.raises(ConfigError) as e:
        load(f"{key}=float8")
    message = str(e.value)
    assert "\n" not in message and f"config key '{key}' must be one of" in message and "'float8'" in message
    for name in ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16", "half"):
        assert name in message


def test_help_names_the_dtype_aliases(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  model.dtype "))
    assert "bfloat16" in line and "float16" in line and "half" in line


@pytest.mark.parametrize("override, unknown, suggestion", [
    ("optim.lrr=1", "optim.lrr", "optim.lr"),
    ("train.max_step=3", "train.max_steps", "train.max_steps"),
    ("lr=1", "lr", "optim.lr"),
    ("optim.seed=1", "optim.seed", "train.seed"),
])
def test_unknown_key_names_the_closest_valid_key(override, unknown, suggestion):
    with pytest.raises(ConfigError) as e:
        load(override)
    assert f"unknown config key '{override.split('=')[0]}'" in str(e.value)
    assert f"did you mean '{suggestion}'" in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("activation_checkpointing=selective:0", "activation_checkpointing"),
    ("activation_checkpointing=some", "activation_checkpointing"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("data.eval_share=1.0", "data.eval_share"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("fsdp.prefetch=-1", "fsdp.prefetch"),
    ("preference.simpo_beta=0", "preference.simpo_beta"),
    ("preference.simpo_gamma=-0.5", "preference.simpo_gamma"),
])
def test_cross_field_validation_names_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load(override)


def test_label_smoothing_is_refused_for_the_losses_it_does_not_apply_to():
    load("task=dpo", "preference.label_smoothing=0.1")  # sigmoid, the default
    with pytest.raises(ConfigError, match=r"'preference.label_smoothing' applies to preference.loss_type=sigmoid "
                                          r"only, not ipo; set it to 0"):
        load("task=dpo", "preference.loss_type=ipo", "preference.label_smoothing=0.1")


def test_invalid_regex_names_key_and_pattern():
    with pytest.raises(ConfigError, match=r"'finetune.trainable_regex' has an invalid regex '\('"):
        load("finetune.method=partial", "finetune.trainable_regex=['(']")


def test_activation_checkpointing_forms_accepted():
    for value in ("none", "full", "selective:1", "selective:3"):
        assert load(f"activation_checkpointing={value}").activation_checkpointing == value


def test_required_keys():
    with pytest.raises(ConfigError, match="'output_dir' is required"):
        load_config(None, ["model.path=/m", "data.train=/d.jsonl"])


# ---------------------------------------------------------------- config files

def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.yaml", "output_dir: run\nmodel:\n  path: [unclosed\n  dtype: fp32\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(bad) in str(e.value) and re.search(r"line \d+", str(e.value))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not a file"):
        load_config(tmp_path)


def test_non_mapping_and_non_utf8_config(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path / "list.yaml", "- a\n- b\n"))
    raw = tmp_path / "latin1.yaml"
    raw.write_bytes(b"output_dir: r\xe9sultat\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(raw)


def test_relative_paths_file_vs_cwd(tmp_path, monkeypatch):
    cfg_dir, work = tmp_path / "cfgs", tmp_path / "work"
    (cfg_dir / "model").mkdir(parents=True)
    work.mkdir()
    path = write(cfg_dir / "run.yaml", "output_dir: runs/a\nmodel:\n  path: model\n"
                 "data:\n  train: data/train.jsonl\n  eval: data/eval.jsonl\nresume: ckpts/step-3\n")
    monkeypatch.chdir(work)
    cfg = load_config(path, ["data.eval=mine/eval.jsonl"])
    assert cfg.output_dir == str(cfg_dir / "runs/a")
    assert cfg.model.path == str(cfg_dir / "model")
    # a file name that does not exist yet is still a file, not a hub id: resolved against the config's folder
    assert cfg.data.train == str(cfg_dir / "data/train.jsonl")
    assert cfg.data.eval == str(work / "mine/eval.jsonl")  # override: relative to the cwd
    assert cfg.resume == str(cfg_dir / "ckpts/step-3")


def test_resume_keywords_are_not_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load().resume == "auto"
    assert load("resume=none").resume == "none"


def test_hub_ids_are_kept(tmp_path, monkeypatch):
    path = write(tmp_path / "c.yaml", "output_dir: out\nmodel:\n  path: HuggingFaceTB/SmolLM2-135M\n"
                 "data:\n  train: stanfordnlp/imdb\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert cfg.model.path == "HuggingFaceTB/SmolLM2-135M"
    assert cfg.data.train == "stanfordnlp/imdb"
    assert load_config(path, ["model.path=Qwen/Qwen2.5-0.5B"]).model.path == "Qwen/Qwen2.5-0.5B"
    (tmp_path / "org" / "name").mkdir(parents=True)  # an existing local folder wins over the hub id
    assert load_config(path, ["model.path=org/name"]).model.path == str(tmp_path / "org" / "name")


# ---------------------------------------------------------------- help and round trip

def _default_in_help(line: str):
    m = re.search(r", default (.*?)\)(?: \[|:)", line)
    assert m, line
    return yaml.safe_load(m.group(1))


HELP_SNAPSHOT = REPO / "tests" / "assets" / "train_help.txt"


def test_help_lists_every_key_with_type_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    # the key listing, word for word, against the committed snapshot (argparse's usage part above it wraps with
    # the terminal, so it is left out). A deliberate change of a key, default or help text updates the snapshot:
    #   python -m fsdp_ft.cli train --help | sed -n '/^overrides: dotted keys/,$p' > tests/assets/train_help.txt
    listing = out[out.index("overrides: dotted keys"):]
    assert listing == HELP_SNAPSHOT.read_text(), (
        "`fsdp-ft train --help` changed; if meant, regenerate tests/assets/train_help.txt (command above)")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "(" in line}
    keys = all_keys()
    assert len(keys) > 50
    for key, _t, f, default in keys:
        assert key in lines, f"{key} missing from `fsdp-ft train --help`"
        line = lines[key]
        assert _default_in_help(line) == default, line
        assert f.metadata["help"] in line
        assert re.search(r"\((bool|int|float|str|list of \w+)( or (int|str))?( or null)?, default", line), line


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["optim.lr=2e-4", "model.block_classes=[LlamaDecoderLayer]", "data.eval=null",
                       "finetune.method=partial", "finetune.frozen_regex=['^model\\.embed']", "fsdp.param_dtype=bf16",
                       "model.path=org/name", f"output_dir={tmp_path / 'run'}"])
    dump_config(cfg, tmp_path / "config.yaml")
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config_from_dict(tree) == cfg
    assert load_config(tmp_path / "config.yaml") == cfg  # the run dir's config.yaml reruns the same run


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.output_dir and cfg.model.path and cfg.data.train
    if "tune" in yaml.safe_load(path.read_text()):  # a search config: its space passes the same checks as tune's
        pytest.importorskip("optuna")
        from fsdp_ft.tuning.space import read_spec

        assert read_spec(str(path), []).dimensions


def test_config_error_is_user_error():
    assert issubclass(ConfigError, UserError)
