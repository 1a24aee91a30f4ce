"""Quiet by default, loud on request: the console of a tiny run is our own lines only (set-up, train and eval rows)
and fits one screen; `-v` shows what the quiet run leaves out. A third-party warning wall that comes back (a library
imported though the run does not use it, a deprecation on every rank) fails here.

Every run is the real CLI in a subprocess, as a user starts it. Its stderr is not a terminal, so there is no
progress bar to leave out."""
from __future__ import annotations

import re

import pytest

from conftest import TINY, cli, free_port, save_tiny_llama

OURS = re.compile(r"^(\[fsdp_ft\]|\[train\]|\[eval\]|fsdp-ft:) ")  # what fsdp_ft itself prints
ONE_SCREEN = 25
SHORT = ["train.max_steps=4", "train.log_every=2", "train.eval_every=0", "train.save_every=0",
         "data.max_eval_samples=16"]


def console(proc) -> list[str]:
    """The lines a user sees (stdout and stderr), less the import-time report that PYTHONPROFILEIMPORTTIME adds."""
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.strip() and not line.startswith("import time:")]


def foreign(lines: list[str]) -> list[str]:
    return [line for line in lines if not OURS.match(line)]


def imported(proc) -> set[str]:
    """Top-level packages the processes imported, from Python's own import-time report."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_tiny_demo_fits_one_screen_with_only_our_lines(tmp_path):
    """`fsdp-ft train configs/tiny.yaml` as the config's comment shows it (40 steps, evals at 20 and 40)."""
    proc = cli("train", str(TINY), f"output_dir={tmp_path / 'run'}")
    lines = console(proc)
    assert not foreign(lines), "\n".join(lines)
    assert len(lines) <= ONE_SCREEN, "\n".join(lines)
    assert sum(line.startswith("[eval]") for line in lines) == 2, "\n".join(lines)
    final = tmp_path / "run" / "final"  # the last line says where the model is, and it is there
    assert proc.stdout.splitlines()[-1] == f"[fsdp_ft] done at step 40: the model is in {final}"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()


def test_two_ranks_are_quiet_and_import_no_unused_optional_library(tmp_path, monkeypatch):
    """`fsdp-ft run` with 2 ranks: the launcher and both ranks. A full fine-tune quantizes nothing, so neither
    torchao (which transformers imports whenever it is installed) nor bitsandbytes (peft's) is imported."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # every process reports its imports, torchrun's ranks too
    monkeypatch.delenv("FSDP_FT_VERBOSE", raising=False)
    proc = cli("run", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TINY),
               f"output_dir={tmp_path / 'run'}", *SHORT)
    lines = console(proc)
    assert not foreign(lines), "\n".join(lines)
    assert len(lines) <= ONE_SCREEN, "\n".join(lines)
    done = [line for line in lines if " done at step " in line]  # rank 0's, once, last on stdout
    assert done == [proc.stdout.splitlines()[-1]], "\n".join(lines)
    modules = imported(proc)
    assert {"torch", "transformers", "fsdp_ft"} <= modules  # the report is there
    assert not modules & {"torchao", "bitsandbytes"}, sorted(modules & {"torchao", "bitsandbytes"})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("pretrained") / "tiny-llama", seed=3)


def test_lora_counts_its_adapters_and_verbose_lists_them(tmp_path, pretrained):
    """A LoRA run on pretrained weights: the adapters are the only tensors not in the checkpoint, so the quiet run
    gives their count in one line; `-v` lists every one of them by name."""
    args = [str(TINY), f"model.path={pretrained}", "model.random_init=false", "finetune.method=lora", *SHORT]
    quiet = console(cli("train", *args, f"output_dir={tmp_path / 'quiet'}"))
    assert not foreign(quiet), "\n".join(quiet)
    assert not any("lora_A" in line for line in quiet), "\n".join(quiet)
    counted = [re.search(r"LoRA adapters: (\d+) tensors initialised", line) for line in quiet]
    counted = [int(m.group(1)) for m in counted if m]
    assert len(counted) == 1, "\n".join(quiet)

    loud = console(cli("train", "-v", *args, f"output_dir={tmp_path / 'loud'}"))
    names = {n for line in loud if "initialised (not in checkpoint)" in line
             for n in line.split(": ", 1)[1].split(", ")}
    lora = {n for n in names if re.search(r"\.lora_[AB]\.", n)}
    assert len(lora) == counted[0] == 4 * 7 * 2, names  # 4 blocks x 7 linears (all-linear) x (A, B)
    # -v shows at least what the quiet run does; more only where the stack has known noise to leave out (torch 2.13
    # and transformers 5.25 with bitsandbytes: torchao's and peft's import lines, a deprecation), none on torch 2.11
    # and transformers 5.17 without bitsandbytes, where the listing above is what -v adds
    assert len(loud) >= len(quiet)


def test_qlora_is_quiet_too(tmp_path, pretrained):
    """QLoRA does import torchao (its NF4 tensors): the harmless warnings of that import stay off the console."""
    lines = console(cli("train", str(TINY), f"model.path={pretrained}", "model.random_init=false",
                        "finetune.method=qlora", "finetune.quant.scaler_block_size=16", "train.seq_len=64",
                        f"output_dir={tmp_path / 'run'}", *SHORT))
    assert not foreign(lines), "\n".join(lines)
    assert len(lines) <= ONE_SCREEN, "\n".join(lines)


def test_filters_drop_only_the_known_messages(monkeypatch):
    """The filters match a logger or module and a message: another message of the same library, and the same
    message from our own code, still show."""
    import logging
    import warnings

    from fsdp_ft.runtime import quiet

    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("torchao")
    handler, filters, level = Keep(), list(logger.filters), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # whatever an earlier test in this process set
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet.install()
            logger.warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
            logger.warning("a real torchao problem")
            for module in ("transformers.modeling_utils", "fsdp_ft.training.trainer"):
                warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, f"{module}.py",
                                       1, module=module)
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = filters
        logger.setLevel(level)
    assert seen == ["a real torchao problem"]
    assert [w.filename for w in caught] == ["fsdp_ft.training.trainer.py"]
