"""metrics.jsonl rows carry the contract's keys with values checked against independent counts: the learning rate
of each schedule from its formula, worked out by hand; `tokens` from the data file tokenized here; memory against
the kernel's own figures; evaluation at each epoch's end. TensorBoard gets the same scalars."""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import pytest

from conftest import ASSETS, FAST, TINY
from fsdp_ft import train
from fsdp_ft.config import load_config
from fsdp_ft.observability.metrics import read_metrics

ROWS = 24  # 3 steps per epoch: micro-batch 4 x accumulation 2 (configs/tiny.yaml) = 8 rows a step
SEQ = 64   # train.seq_len in FAST
LR = 3e-3
SCHEDULE_RUN = [*FAST, "train.max_steps=6", "optim.warmup_steps=2", f"optim.lr={LR}"]

# lr / optim.lr of steps 1..6 with warmup 2 over 6 steps, from the documented formula (optim.py, README):
# warmup: (i + 1) / warmup for the 0-based step i < warmup; then progress p = (i - warmup) / (total - warmup)
# = 0, 1/4, 1/2, 3/4 for steps 3..6; cosine 0.5 (1 + cos(pi p)) = 1, 0.853553, 0.5, 0.146447; linear 1 - p;
# constant 1. Steps 4 and 6 are where cosine and linear part (at p = 1/2 they coincide).
FACTORS = {"cosine": [0.5, 1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627],
           "linear": [0.5, 1.0, 1.0, 0.75, 0.5, 0.25],
           "constant": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]}


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (kB there)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.fixture(scope="module")
def epoch_data(tmp_path_factory) -> Path:
    """The first ROWS rows of the repo's text: every step of an epoch uses 8 of them, each row once an epoch."""
    lines = (ASSETS / "data" / "tiny_text_train.jsonl").read_text().splitlines()[:ROWS]
    path = tmp_path_factory.mktemp("data") / "epoch.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tokens_of_one_epoch(path: Path) -> int:
    """Non-pad tokens of every row once, counted here with the tokenizer: its special tokens (BOS), the text, EOS
    when the tokenizer did not end with it, the start kept up to train.seq_len (the text format's documented rule)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    total = 0
    for line in path.read_text().splitlines():
        ids = tok(json.loads(line)["text"])["input_ids"]
        total += min(len(ids) + (ids[-1] != tok.eos_token_id), SEQ)
    return total


def test_lr_factor_by_hand():
    from fsdp_ft.training.optim import lr_factor

    for schedule, want in FACTORS.items():
        cfg = load_config(TINY, ["output_dir=/tmp/x", "optim.warmup_steps=2", f"optim.schedule={schedule}"])
        assert [lr_factor(i, 6, cfg) for i in range(6)] == pytest.approx(want, rel=1e-12), schedule
    floor = load_config(TINY, ["output_dir=/tmp/x", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1"])
    assert lr_factor(5, 6, floor) == pytest.approx(0.1 + 0.9 * FACTORS["cosine"][5], rel=1e-12)


def test_metrics_rows_and_tensorboard(tmp_path, epoch_data):
    """Cosine, logged every 3 steps, evaluated at each epoch's end (train.eval_every=0) over 2 epochs: rows at 3
    and 6 with the lr of those steps, `tokens` = the data file's tokens once and twice, an eval row at 3 and 6;
    memory fields within the kernel's figures for this process."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rss_before = _status_bytes("VmRSS")
    train(load_config(TINY, [f"output_dir={out}", *SCHEDULE_RUN, "train.log_every=3", "train.eval_every=0",
                             "train.tensorboard=true", f"data.train={epoch_data}"]))
    hwm_after = max(_status_bytes("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    rows = read_metrics(out)
    setup = [r for r in rows if r.get("split") == "setup"]
    trains = [r for r in rows if "split" not in r]
    evals = [r for r in rows if r.get("split") == "eval"]
    assert len(setup) == 1 and setup[0]["trainable_params"] == setup[0]["total_params"]
    assert setup[0]["train_rows"] == ROWS
    assert [r["step"] for r in trains] == [3, 6] and [r["epoch"] for r in trains] == [1, 2]
    assert [(r["step"], r["epoch"]) for r in evals] == [(3, 1), (6, 2)]  # one at each epoch's end
    for r in trains:
        for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_bytes"):
            assert key in r, key
        assert r["tokens_per_s"] > 0
    # every row of the file once per epoch, whatever the order
    epoch_tokens = tokens_of_one_epoch(epoch_data)
    assert [r["tokens"] for r in trains] == [epoch_tokens, 2 * epoch_tokens]
    # the rate the last step of each window used: step 3 (after warmup) and step 6 (cosine at progress 3/4)
    assert [r["lr"] for r in trains] == [pytest.approx(LR * FACTORS["cosine"][i], rel=1e-9) for i in (2, 5)]
    for r in evals:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))

    # memory (CPU: the process's peak resident set): a peak is at least what was resident before the run, never
    # falls, and stays within the kernel's high-water mark after it
    after_setup = setup[0]["host_rss_after_setup_per_rank"]
    assert len(after_setup) == 1 and rss_before <= after_setup[0] <= hwm_after
    peaks = [r["peak_mem_bytes_per_rank"] for r in trains]
    assert all(len(p) == 1 for p in peaks) and [r["peak_mem_bytes"] for r in trains] == [p[0] for p in peaks]
    assert after_setup[0] <= peaks[0][0] <= peaks[1][0] <= hwm_after
    assert all(r["peak_host_rss_bytes"] == r["peak_mem_bytes"] for r in trains)

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in trains]
    assert [e.step for e in acc.Scalars("eval/loss")] == [3, 6]


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_each_schedule_reaches_the_logged_lr(tmp_path, schedule):
    """The config key reaches the optimizer: each step's logged lr is the formula's (by hand, FACTORS)."""
    out = tmp_path / schedule
    train(load_config(TINY, [f"output_dir={out}", *SCHEDULE_RUN, f"optim.schedule={schedule}", "data.eval=null",
                             "train.seq_len=16"]))
    lrs = [r["lr"] for r in read_metrics(out) if "split" not in r]
    assert lrs == [pytest.approx(LR * f, rel=1e-9) for f in FACTORS[schedule]]
