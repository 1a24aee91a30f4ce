"""A run folder someone else wrote is loaded safely: DCP metadata and non-tensor entries never run code, a run's
config.yaml alone cannot switch on trust_remote_code, and exported files are readable by other users.

Payloads here only create a marker file in the test's tmp_path; each test that expects a refusal checks the marker
never appears, and a positive control shows the same payload does run through the unguarded path."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from cls_helpers import classifier_run
from conftest import ASSETS, train_1proc
from fsdp_ft.checkpoint.dcp_checkpoint import list_checkpoints
from fsdp_ft.cli import main
from fsdp_ft.errors import CheckpointError
from fsdp_ft.storage import safe_dcp

SHORT = ["train.max_steps=2"]


@pytest.fixture(scope="module")
def full_run(session_tmp):
    """A full fine-tune saved by 2 FSDP2 ranks (DTensor shards): the seq_cls run test_inference and test_seq_cls
    share, so CI trains it once."""
    return classifier_run(session_tmp)


@pytest.fixture(scope="module")
def lora_run(session_tmp):
    out = session_tmp / "safe-lora"
    return out if list_checkpoints(out) else train_1proc(out, *SHORT, "finetune.method=lora")


def fsdp_ft(capsys, *args) -> tuple[int, str]:
    """`fsdp-ft ARGS` in this process: (exit code, stderr)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("fsdp-ft: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


class RunsCommand:
    """Unpickling this runs a shell command (os.system), as a planted pickle would."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsPython:
    """Unpickling this runs Python source (builtins.exec)."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return exec, (self.source,)


def copy_run(run: Path, dest: Path) -> Path:
    """The run's config.yaml and checkpoints (not final/): a folder export and eval must read from checkpoints."""
    dest.mkdir()
    shutil.copy(run / "config.yaml", dest / "config.yaml")
    shutil.copytree(run / "checkpoints", dest / "checkpoints")
    return dest


def plant_metadata(ckpt: Path, payload) -> None:
    """Replace .metadata by a payload pickle; rewrite state.json's size manifest too, as an attacker would."""
    meta = ckpt / ".metadata"
    meta.write_bytes(pickle.dumps(payload))
    state_file = ckpt / "state.json"
    state = json.loads(state_file.read_text())
    if ".metadata" in (state.get("files") or {}):
        state["files"][".metadata"] = meta.stat().st_size
        state_file.write_text(json.dumps(state))


def empty_state(md) -> dict:
    """A flat state dict to load every entry of a checkpoint into (tensors allocated, others None)."""
    return {k: torch.empty(v.size, dtype=v.properties.dtype) if isinstance(v, TensorStorageMetadata) else None
            for k, v in md.state_dict_metadata.items()}


def plain_dcp_load(state: dict, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)


# ---------------------------------------------------------------- DCP metadata

def test_export_refuses_a_planted_metadata_and_never_runs_it(full_run, tmp_path, capsys):
    run = copy_run(full_run, tmp_path / "run")
    marker = tmp_path / "ran"
    found = list_checkpoints(run)
    for _, path in found:  # every one: no valid checkpoint is left to fall back on
        plant_metadata(path, RunsCommand(f"touch {marker}"))
    step, ckpt = found[-1]
    refused = f"{os.system.__module__}.system"  # posix.system
    for extra in ([], ["--step", step]):
        code, err = fsdp_ft(capsys, "export", run, *extra, "--out", tmp_path / "out")
        line = one_error_line(err)
        assert code == 2, err
        assert str(ckpt / ".metadata") in line and refused in line, line
        assert not marker.exists() and not (tmp_path / "out").exists()
    # the payload is real: torch's own reader runs it (and then fails on os.system's int return value)
    with pytest.raises(AttributeError):
        dcp.FileSystemReader(str(ckpt)).read_metadata()
    assert marker.exists()


def test_metadata_payloads_are_refused_by_name(tmp_path):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    for payload, name in ((RunsPython(f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
                          (RunsCommand(f"touch {marker}"), f"{os.system.__module__}.system")):
        (ckpt / ".metadata").write_bytes(pickle.dumps(payload))
        with pytest.raises(CheckpointError, match=name) as info:
            safe_dcp.read_metadata(ckpt)
        assert str(ckpt / ".metadata") in str(info.value)
        problems = safe_dcp.verify_files(ckpt)
        assert len(problems) == 1 and name in problems[0]
    assert not marker.exists()


def test_non_tensor_entry_payload_is_refused_by_the_planner(tmp_path):
    """DCP pickles a non-tensor entry with torch.save and reads it back with weights_only=False."""
    marker = tmp_path / "ran"
    ckpt = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.arange(6.0)}, "extra": RunsPython(f"open({str(marker)!r}, 'w').close()"),
                  "step": 3}, checkpoint_id=str(ckpt), no_dist=True)
    assert not marker.exists()
    state = {"model": {"w": torch.zeros(6)}, "extra": None, "step": 0}
    with pytest.raises(CheckpointError) as info:
        safe_dcp.load(state, ckpt, no_dist=True)
    assert "'extra'" in str(info.value) and str(ckpt) in str(info.value) and "names exec" in str(info.value)
    assert not marker.exists()
    # a plain dcp.load of the same folder runs it: the test's payload is real
    plain_dcp_load({"model": {"w": torch.zeros(6)}, "extra": None, "step": 0}, ckpt)
    assert marker.exists()


def _assert_reads_like_dcp(ckpt: Path) -> None:
    """SafeReader's metadata and safe_dcp.load's entries equal torch's own reader on a real checkpoint."""
    md, ref = safe_dcp.read_metadata(ckpt), dcp.FileSystemReader(str(ckpt)).read_metadata()
    assert md.state_dict_metadata == ref.state_dict_metadata
    assert md.storage_data == ref.storage_data and md.planner_data == ref.planner_data
    assert md.storage_meta.load_id is not None
    got, want = empty_state(md), empty_state(md)
    safe_dcp.load(got, ckpt, no_dist=True)
    plain_dcp_load(want, ckpt)
    assert any(not isinstance(v, torch.Tensor) for v in want.values())  # optimizer param_groups are read too
    for key in want:
        a, b = got[key], want[key]
        assert (torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b), key
    assert safe_dcp.verify_files(ckpt) == []


def test_real_full_and_lora_checkpoints_read_as_torch_reads_them(full_run, lora_run):
    for run in (full_run, lora_run):
        _assert_reads_like_dcp(list_checkpoints(run)[-1][1])


def test_export_gives_the_checkpoints_tensors(full_run, tmp_path):
    from safetensors.torch import load_file

    from fsdp_ft.checkpoint.export import export_run

    ckpt = list_checkpoints(full_run)[-1][1]
    want = empty_state(dcp.FileSystemReader(str(ckpt)).read_metadata())
    plain_dcp_load(want, ckpt)
    got = load_file(export_run(str(full_run), None, str(tmp_path / "out")) / "model.safetensors")
    assert {f"model.{k}" for k in got} == {k for k in want if k.startswith("model.")}
    assert all(torch.equal(t, want[f"model.{k}"]) for k, t in got.items())


def test_verify_files_names_a_missing_or_truncated_shard(full_run, tmp_path):
    ckpt = tmp_path / "ck"
    shutil.copytree(list_checkpoints(full_run)[-1][1], ckpt)
    assert safe_dcp.verify_files(ckpt) == []
    shard = ckpt / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    (problem,) = safe_dcp.verify_files(ckpt)
    assert str(shard) in problem and "truncated" in problem
    shard.unlink()
    (problem,) = safe_dcp.verify_files(ckpt)
    assert str(shard) in problem and "missing" in problem


def test_storage_outside_the_folder_is_refused(full_run, tmp_path):
    ckpt = tmp_path / "ck"
    shutil.copytree(list_checkpoints(full_run)[-1][1], ckpt)
    md = safe_dcp.read_metadata(ckpt)
    for info in md.storage_data.values():
        info.relative_path = "../elsewhere/__0_0.distcp"
    with open(ckpt / ".metadata", "wb") as fh:
        pickle.dump(md, fh)
    with pytest.raises(CheckpointError, match="outside its folder"):
        safe_dcp.read_metadata(ckpt)


# ---------------------------------------------------------------- trust_remote_code

def custom_code_folder(out: Path, marker: Path) -> Path:
    """A tiny Llama whose config.json maps to modelling code in the folder; importing that code writes `marker`."""
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(AutoConfig.from_pretrained(ASSETS / "tiny-llama")).save_pretrained(out)
    for f in (ASSETS / "tiny-llama").iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(model_type="fsdpft_marker", architectures=["MarkerForCausalLM"],
               auto_map={"AutoConfig": "marker_model.MarkerConfig",
                         "AutoModelForCausalLM": "marker_model.MarkerForCausalLM"})
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "marker_model.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class MarkerConfig(LlamaConfig):\n    model_type = 'fsdpft_marker'\n\n\n"
        "class MarkerForCausalLM(LlamaForCausalLM):\n    config_class = MarkerConfig\n")
    return out


@pytest.fixture
def remote_code_run(full_run, tmp_path):
    """A run folder whose config.yaml turns trust_remote_code on for a model folder with custom code: final/ is that
    folder; the checkpoints are a real run's (export builds the model from config.yaml before reading them)."""
    import yaml

    marker = tmp_path / "imported"
    run = copy_run(full_run, tmp_path / "run")
    model = custom_code_folder(tmp_path / "model", marker)
    shutil.copytree(model, run / "final")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"].update(path=str(model), trust_remote_code=True, random_init=False)
    cfg["task"] = "causal_lm"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run, marker


def test_run_config_alone_does_not_switch_on_remote_code(remote_code_run, capsys, tmp_path):
    from fsdp_ft.inference.loading import load_model

    run, marker = remote_code_run
    with pytest.raises(CheckpointError, match="--trust-remote-code") as info:
        load_model(str(run))
    assert "custom code" in str(info.value) and str(run) in str(info.value)
    code, err = fsdp_ft(capsys, "eval", run, "--data", ASSETS / "data" / "tiny_text_eval.jsonl")
    assert code == 2 and "--trust-remote-code" in one_error_line(err)
    code, err = fsdp_ft(capsys, "export", run, "--out", tmp_path / "out")
    assert code == 2 and "--trust-remote-code" in one_error_line(err)
    assert not marker.exists()
    # asked for on the command line: the folder's code runs (the test's own marker module)
    loaded = load_model(str(run), ["model.trust_remote_code=true"])
    assert type(loaded.model).__name__ == "MarkerForCausalLM" and marker.exists()


def test_trust_remote_code_flag_loads_the_custom_model(remote_code_run, tmp_path, capsys):
    run, marker = remote_code_run
    src = tmp_path / "prompts.txt"
    src.write_text("Return the lowest index\n")
    code, err = fsdp_ft(capsys, "generate", run, "--prompts-file", src, "--greedy", "--max-new-tokens", 2,
                        "--output", tmp_path / "out.jsonl", "--trust-remote-code")
    assert code == 0, err
    assert marker.exists() and (tmp_path / "out.jsonl").read_text().count("\n") == 1


def test_model_folder_with_custom_code_needs_the_flag(tmp_path, capsys):
    """A bare HF folder: no stdin prompt (transformers asks when trust_remote_code is None), one line, no import."""
    marker = tmp_path / "imported"
    folder = custom_code_folder(tmp_path / "bare", marker)
    code, err = fsdp_ft(capsys, "generate", folder, "--prompt", "Return the", "--greedy", "--max-new-tokens", 1)
    line = one_error_line(err)
    assert code == 2 and "--trust-remote-code" in line and str(folder) in line, line
    assert not marker.exists()


# ---------------------------------------------------------------- exported files' modes

def test_exported_files_are_readable_by_others_under_umask_022(full_run, tmp_path):
    from fsdp_ft.checkpoint.export import export_run

    old = os.umask(0o022)
    try:
        out = export_run(str(full_run), None, str(tmp_path / "out"))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes.pop("out") == 0o755 and "model.safetensors" in modes
    assert set(modes.values()) == {0o644}, modes
