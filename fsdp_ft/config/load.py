"""YAML file + dotted overrides -> a validated `Config`; `--help` text; the resolved config.yaml written and read
back."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fsdp_ft.config import strict_yaml
from fsdp_ft.config.schema import (DATA_SUFFIXES, DTYPE_NAMES, Config, all_keys, canonical_dtype, fields_of,
                                   hints_of, is_dtype_key)
from fsdp_ft.config.validate import validate
from fsdp_ft.errors import ConfigError

def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        nullable = " or null" if len(args) < len(typing.get_args(t)) else ""
        return " or ".join(_type_name(a) for a in args) + nullable
    if origin is list:
        return f"list of {_type_name(typing.get_args(t)[0])}"
    return getattr(t, "__name__", str(t))


def show_value(value) -> str:
    """A value as one line of YAML (PyYAML ends a bare scalar with a '...' document-end line)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


DTYPE_ALIAS_NOTE = f"also {', '.join(DTYPE_NAMES)}, torch.<name>"


def help_text() -> str:
    """Every config key with its type, default and meaning (for `fsdp-ft train --help`)."""
    lines = ["config keys (set in the YAML file or as key.sub=value overrides):"]
    for key, t, f, default in all_keys():
        choices = f.metadata.get("choices")
        note = f"; {DTYPE_ALIAS_NOTE}" if is_dtype_key(f) else ""
        extra = f" [{', '.join(str(c) for c in choices if c is not None)}{note}]" if choices else ""
        lines.append(f"  {key} ({_type_name(t)}, default {show_value(default)})"
                     f"{extra}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


# ---------------------------------------------------------------- loading

def _coerce(key: str, value: Any, t: Any, f: dataclasses.Field | None) -> Any:
    """Check `value` against the annotated type; YAML already typed it, so only widen int->float."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(t)):
            return None
        if len(args) > 1:  # a number or a word (`auto`): the value's own type picks the branch; words are the choices
            choices = f.metadata.get("choices") if f is not None else None
            if type(value) not in args or (isinstance(value, str) and choices and value not in choices):
                words = f"one of {list(choices)}" if choices else "str"
                kinds = " or ".join([_type_name(a) for a in args if a is not str] + [words] * (str in args))
                raise ConfigError(f"config key '{key}' must be {kinds}, got {value!r}")
            t = type(value)
            if t is not str:
                f = None
        else:
            t = args[0]
    if typing.get_origin(t) is list:  # check each item, so a bad item fails here rather than deep in the run
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be {_type_name(t)}, got {value!r}")
        item = typing.get_args(t)[0]
        return [_coerce(f"{key}[{i}]", v, item, None) for i, v in enumerate(value)]
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if t is float and isinstance(value, str):  # YAML 1.1 reads 2e-4 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, float), str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list)}[t](value)
    if not ok:
        raise ConfigError(f"config key '{key}' must be {_type_name(t)}, got {value!r}")
    choices = f.metadata.get("choices") if f is not None else None
    if choices and is_dtype_key(f):
        value = canonical_dtype(value)
    if choices and value not in choices:
        note = f" ({DTYPE_ALIAS_NOTE})" if is_dtype_key(f) else ""
        raise ConfigError(f"config key '{key}' must be one of {[c for c in choices if c is not None]}{note}, "
                          f"got {value!r}")
    return value


def _unknown(key: str, valid: list[str]) -> ConfigError:
    """Suggest the valid key with the same leaf name (`lr` -> `optim.lr`), else the closest spelling."""
    leaf = key.rpartition(".")[2]
    close = [k for k in valid if k.rpartition(".")[2] == leaf] or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see `fsdp-ft train --help` for the keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls, data: dict, prefix: str, valid: list[str]):
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    fields, hints, kwargs = fields_of(cls), hints_of(cls), {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in fields:
            raise _unknown(key, valid)
        t = hints[name]
        if dataclasses.is_dataclass(t):
            kwargs[name] = _build(t, value or {}, key + ".", valid)
        else:
            kwargs[name] = _coerce(key, value, t, fields[name])
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=2e-4` -> ('optim.lr', 0.0002); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = strict_yaml.load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    except strict_yaml.Refused as e:
        raise ConfigError(f"override '{key.strip()}': {e}") from None
    return key.strip(), value


def _resolve_paths(cfg: Config, base: Path, keys_from_file: set[str]) -> None:
    """Relative paths in a config file are relative to that file; overrides are relative to the cwd."""
    for key, _t, f, _d in all_keys():
        if not f.metadata.get("path"):
            continue
        section, _, leaf = key.rpartition(".")
        obj = getattr(cfg, section) if section else cfg
        value = getattr(obj, leaf)
        if not value or os.path.isabs(value) or (key == "resume" and value in ("auto", "none")):
            continue
        root = base if key in keys_from_file else Path.cwd()
        candidate = (root / value).resolve()
        # keep hub ids (org/name that is not a local path) untouched; a data file name (x/y.jsonl) is no hub id
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", value) and Path(value).suffix.lower() not in DATA_SUFFIXES
        if candidate.exists() or key in ("output_dir", "resume") or not hub_id:
            setattr(obj, leaf, str(candidate))


def _flat_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        keys.add(prefix + str(k))
        if isinstance(v, dict):
            keys |= _flat_keys(v, f"{prefix}{k}.")
    return keys


TUNE_SECTION = "tune"  # a config file's search space; read by `fsdp-ft tune` (fsdp_ft.tuning.space), no run key


def read_tree(path: str | os.PathLike) -> dict:
    """The mapping a YAML config file holds, with one clear line for a missing file or bad YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' " + ("is not a file" if p.exists() else "does not exist"))
    try:
        tree = strict_yaml.load(p.read_text(encoding="utf-8")) or {}
    except strict_yaml.Refused as e:
        where = f" line {e.line}" if e.line else ""
        raise ConfigError(f"config file '{path}'{where}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}'{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys")
    return tree


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), settings: dict | None = None) -> Config:
    """Read a YAML config, apply dotted overrides (text), then `settings` (dotted key -> value, as a search
    trial sets them), validate, and resolve relative paths. A top-level `tune:` section is left to `fsdp-ft tune`."""
    tree: dict = {}
    base = Path.cwd()
    if path is not None:
        tree = read_tree(path)
        tree.pop(TUNE_SECTION, None)
        base = Path(path).resolve().parent
    from_file = _flat_keys(tree)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        from_file.discard(key)
    for key, value in (settings or {}).items():
        _set_dotted(tree, key, value)
        from_file.discard(key)
    valid = [k for k, *_ in all_keys()]
    cfg = _build(Config, tree, "", valid)
    _resolve_paths(cfg, base, from_file)
    validate(cfg)
    return cfg


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config; loading it back gives the same run."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from a resolved dict (the run dir's config.yaml), without path resolution."""
    valid = [k for k, *_ in all_keys()]
    return _build(Config, tree, "", valid)
