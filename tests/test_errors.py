"""Bad input through the real CLI: a one-line `fsdp-ft: error:` naming the key/file/label, exit code 2, no traceback,
and a checkpoint already on disk survives a failing run untouched.

Each CLI start costs seconds of imports, so the error cases run concurrently in one module fixture and each test
checks its own result.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny.yaml"
QUICK = ["train.max_steps=2", "train.log_every=1", "train.eval_every=0", "data.max_eval_samples=8",
         "train.progress_bar=false"]
CLS_TRAIN = "tests/assets/data/tiny_cls_train.jsonl"
LAUNCH_VARS = ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
               "SLURM_NTASKS")


def fsdp_ft(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fsdp_ft.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def train(*overrides: str, config: str = TINY, output_dir: Path | None = None) -> subprocess.CompletedProcess:
    out = [f"output_dir={output_dir}"] if output_dir is not None else []
    return fsdp_ft("train", config, *QUICK, *out, *overrides)


def assert_user_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit code 2, no traceback, and the last stderr line is the one error line naming every given thing."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1]
    assert last.startswith("fsdp-ft: error:"), proc.stderr[-3000:]
    assert sum(line.startswith("fsdp-ft: error:") for line in lines) == 1
    for name in names:
        assert str(name) in last, f"{name!r} not named in: {last}"
    return last


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- the error cases, run together

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-input")
    f = {"dir": d}
    f["bad_yaml"] = d / "bad.yaml"
    f["bad_yaml"].write_text("output_dir: run\nmodel:\n  path: [unclosed\n  dtype: fp32\n")
    f["empty"] = d / "empty.jsonl"
    f["empty"].write_text("")
    f["csv"] = d / "reviews.csv"
    f["csv"].write_text("body,label\nA fine paragraph of text.,1\nAnother paragraph of text.,0\n")
    f["malformed"] = d / "malformed.jsonl"
    f["malformed"].write_text('{"text": "a good line of text"}\n{"text": "unterminated\n{"text": "fine"}\n')
    f["few"] = write_jsonl(d / "few.jsonl", [{"text": f"row number {i} of a very small file"} for i in range(3)])
    known = (REPO / "tests/assets/data/tiny_cls_eval.jsonl").read_text().splitlines()[:4]
    unseen = {"text": "Frobnicate the widget before the sprocket.", "label": "gizmo"}
    f["cls_eval"] = write_jsonl(d / "cls_eval.jsonl", [*map(json.loads, known), unseen])
    f["afile"] = d / "afile"
    f["afile"].write_text("a regular file, not a folder")
    f["not_ckpt"] = d / "not-a-checkpoint"
    f["not_ckpt"].mkdir()
    (f["not_ckpt"] / "model.bin").write_text("nothing")
    return f


def _cases(f: dict[str, Path]) -> dict[str, tuple]:
    run, cfg_run = f["dir"] / "run", f["dir"] / "cfg-run"
    return {
        "unknown_key": (TINY, [f"output_dir={cfg_run}", "optim.lrr=1e-4"]),
        "wrong_type": (TINY, [f"output_dir={cfg_run}", "train.max_steps=many"]),
        "malformed_yaml": (str(f["bad_yaml"]), []),
        "missing_config": (str(f["dir"] / "nope.yaml"), []),
        "bad_regex": (TINY, [f"output_dir={cfg_run}", "finetune.method=partial", "finetune.trainable_regex=['(']"]),
        "selective_0": (TINY, [f"output_dir={cfg_run}", "activation_checkpointing=selective:0"]),
        "unknown_dtype": (TINY, [f"output_dir={cfg_run}", "fsdp.param_dtype=float8"]),
        "missing_data_file": (TINY, [f"output_dir={run}", f"data.train={f['dir'] / 'missing.jsonl'}"]),
        "missing_column": (TINY, [f"output_dir={run}", "data.text_column=body"]),
        "empty_dataset": (TINY, [f"output_dir={run}", f"data.train={f['empty']}"]),
        "missing_model": (TINY, [f"output_dir={run}", f"model.path={f['dir'] / 'no-such-model'}"]),
        "unwritable_output": (TINY, [f"output_dir={f['afile'] / 'run'}"]),
        "resume_not_checkpoint": (TINY, [f"output_dir={run}", f"resume={f['not_ckpt']}"]),
        "csv_missing_text": (TINY, [f"output_dir={run}", f"data.train={f['csv']}", "data.eval=null"]),
        "jsonl_malformed": (TINY, [f"output_dir={run}", f"data.train={f['malformed']}"]),
        "batch_too_large": (TINY, [f"output_dir={run}", f"data.train={f['few']}", "train.micro_batch_size=4",
                                   "train.grad_accum=1"]),
        "unseen_eval_label": (TINY, [f"output_dir={run}", "task=seq_cls", f"data.train={CLS_TRAIN}",
                                     f"data.eval={f['cls_eval']}"]),
    }


@pytest.fixture(scope="module")
def results(files) -> dict[str, subprocess.CompletedProcess]:
    """Every case's CLI run; the one real training run (for the checkpoint test) starts first, it takes longest."""
    # torch's name for the default dtype: the later tests read config.yaml and resume without it (the same run)
    cases = {"finished_run": (TINY, [f"output_dir={files['dir'] / 'finished'}", "model.dtype=float32"]),
             **_cases(files)}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(train, *overrides, config=config) for name, (config, overrides) in cases.items()}
        return {name: fut.result() for name, fut in futures.items()}


def test_unknown_key(results):
    assert_user_error(results["unknown_key"], "'optim.lrr'", "did you mean 'optim.lr'")


def test_wrong_type(results):
    assert_user_error(results["wrong_type"], "'train.max_steps'", "int", "'many'")


def test_malformed_yaml_names_file_and_line(results, files):
    assert_user_error(results["malformed_yaml"], str(files["bad_yaml"]), "line ")


def test_missing_config_file(results, files):
    assert_user_error(results["missing_config"], str(files["dir"] / "nope.yaml"), "does not exist")


def test_unknown_dtype_lists_the_accepted_names(results):
    assert_user_error(results["unknown_dtype"], "'fsdp.param_dtype'", "'float8'", "bf16", "bfloat16", "half")


def test_invalid_regex(results):
    assert_user_error(results["bad_regex"], "'finetune.trainable_regex'", "'('")


def test_selective_zero(results):
    assert_user_error(results["selective_0"], "'activation_checkpointing'", "selective:0")


def test_missing_data_file(results, files):
    assert_user_error(results["missing_data_file"], "data.train", str(files["dir"] / "missing.jsonl"))


def test_missing_column(results):
    assert_user_error(results["missing_column"], "data.train", "'body'", "data.text_column",
                      str(REPO / "tests/assets/data/tiny_text_train.jsonl"))


def test_empty_dataset(results, files):
    assert_user_error(results["empty_dataset"], "data.train", str(files["empty"]), "empty")


def test_missing_model_path(results, files):
    assert_user_error(results["missing_model"], "model.path", str(files["dir"] / "no-such-model"))


def test_unwritable_output_dir(results, files):
    assert_user_error(results["unwritable_output"], "output_dir", str(files["afile"] / "run"))


def test_resume_path_not_a_checkpoint(results, files):
    assert_user_error(results["resume_not_checkpoint"], "resume", str(files["not_ckpt"]))


def test_csv_without_text_column(results, files):
    assert_user_error(results["csv_missing_text"], str(files["csv"]), "'text'", "data.text_column")


def test_jsonl_with_malformed_line(results, files):
    assert_user_error(results["jsonl_malformed"], "data.train", str(files["malformed"]), "line 2")


def test_fewer_rows_than_one_global_batch(results):
    assert_user_error(results["batch_too_large"], "data.train", "3 usable rows", "train.micro_batch_size=4")


def test_eval_label_not_seen_in_training(results, files):
    assert_user_error(results["unseen_eval_label"], "'gizmo'", str(files["cls_eval"]), "data.eval")


def test_config_errors_leave_no_run_dir(results, files):
    """Config errors fail before anything touches output_dir."""
    assert not (files["dir"] / "cfg-run").exists()


# ---------------------------------------------------------------- a saved checkpoint survives a failing run

def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_resolved_config_in_run_dir_loads_back_equal(results, files):
    from fsdp_ft.config import load_config

    run = files["dir"] / "finished"
    assert results["finished_run"].returncode == 0, results["finished_run"].stderr[-3000:]
    from fsdp_ft.runtime.precision import resolve_precision

    # config.yaml records what fsdp.mixed_precision=auto resolved to on this CPU run (fp32), and model.dtype=float32
    # as the short name the default is spelled in
    want = resolve_precision(load_config(REPO / TINY, [*QUICK, f"output_dir={run}"]), "cpu")
    assert want.fsdp.mixed_precision == "fp32" and load_config(run / "config.yaml") == want
    assert "dtype: fp32" in (run / "config.yaml").read_text()


def test_failing_run_never_damages_checkpoint(results, files, tmp_path):
    assert results["finished_run"].returncode == 0, results["finished_run"].stderr[-3000:]
    run = tmp_path / "run"  # a copy: this test resumes it, other tests read the original
    shutil.copytree(files["dir"] / "finished", run)
    ckpts = run / "checkpoints"
    assert (ckpts / "step-2" / "state.json").is_file()
    before = _digest(run)  # checkpoints, final/, config.yaml, metrics.jsonl

    with ThreadPoolExecutor(max_workers=2) as pool:
        bad_override = pool.submit(train, "optim.lrr=1", "train.max_steps=3", output_dir=run)
        bad_data = pool.submit(train, f"data.train={files['malformed']}", "train.max_steps=3", output_dir=run)
        assert_user_error(bad_override.result(), "'optim.lrr'")
        assert_user_error(bad_data.result(), str(files["malformed"]))
    assert _digest(run) == before

    resumed = train("train.max_steps=3", output_dir=run)  # model.dtype left at fp32, the run's float32
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts / 'step-2'} at step 2" in resumed.stderr
    assert (ckpts / "step-3" / "state.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and r.get("split") not in ("eval", "setup")][-1] == 3
