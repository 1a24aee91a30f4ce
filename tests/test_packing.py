"""Packing (data.packing=true): packs are deterministic and fit train.seq_len, a packed row's logits equal each
sample run alone (no attention across samples), and packed training resumes exactly and equals one process."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import ASSETS, FAST, TINY, assert_losses_close, cli, free_port, losses, train_1proc, train_nproc
from fsdp_ft.config import load_config
from fsdp_ft.data.packing import PackedRows, TokenRows, plan_packs
from fsdp_ft.data.splits import load_splits
from fsdp_ft.tasks.causal_lm import IGNORE, CausalLMTask
from launch_helpers import assert_stays_dead, kill9_job
from test_resume import RUN, _launch, _wait_for_step
from test_sft_data import chat_rows, write_jsonl


def test_packs_are_seeded_and_fit():
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 60, (500,), generator=g).tolist()
    packs = plan_packs(lengths, 64, seed=1)
    assert sorted(i for p in packs for i in p) == list(range(500))  # every row exactly once
    assert all(sum(lengths[i] for i in p) <= 64 for p in packs)
    assert plan_packs(lengths, 64, seed=1) == packs and plan_packs(lengths, 64, seed=2) != packs
    assert sum(lengths) / (64 * len(packs)) > 0.9  # best fit wastes little


def test_packed_rows_restart_positions_and_hide_first_labels():
    rows = TokenRows()
    rows.append([1, 10, 11], [1, 10, 11])
    rows.append([1, 20], [IGNORE, 20])
    packed = PackedRows(rows, [[1, 0]])[0]
    assert packed == {"input_ids": [1, 20, 1, 10, 11], "labels": [IGNORE, 20, IGNORE, 10, 11],
                      "position_ids": [0, 1, 0, 1, 2], "attention_mask": [1] * 5}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_samples_alone(tmp_path, attn):
    """Logits of every sample inside a packed row equal its logits run alone; loss sums and counts add up."""
    train = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", *FAST, f"data.train={train}", "data.eval=null",
                             "data.packing=true", "train.seq_len=256", f"model.attn_implementation={attn}"])
    task = CausalLMTask(cfg, AutoTokenizer.from_pretrained(ASSETS / "tiny-llama"))
    packed = load_splits(cfg, task).train
    assert isinstance(packed, PackedRows) and len(packed) < 40
    k = max(range(len(packed)), key=lambda i: len(packed.packs[i]))
    members = packed.packs[k]
    assert len(members) >= 3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ASSETS / "tiny-llama"),
                                             attn_implementation=attn).eval()
    batch = task.collate([task.encode(packed[k])])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        sums = task.loss_sums(model, batch)
        start, loss, count = 0, 0.0, 0
        for i in members:
            alone = task.collate([packed.rows[i]])
            want = model(input_ids=alone["input_ids"], use_cache=False).logits[0]
            torch.testing.assert_close(logits[start:start + len(want)], want, rtol=1e-5, atol=1e-5)
            s = task.loss_sums(model, alone)
            loss, count, start = loss + s["loss"], count + s["count"], start + len(want)
    assert int(sums["count"]) == int(count) == int(task.count(batch))
    torch.testing.assert_close(sums["loss"], loss, rtol=1e-5, atol=1e-4)
    # a plain causal mask over the same row (what packing without restarted positions would do) differs
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(leaky[start - len(want):start], want, atol=1e-3)


def _packed_logits_leak(path, rows: list[list[int]]) -> bool:
    """transformers' own model of `path` (eager attention): does a packed row (positions restarting per sample,
    no mask) give any sample other logits than it has alone?"""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.tensor([[t for r in rows for t in r]])
    positions = torch.tensor([[i for r in rows for i in range(len(r))]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([r]), use_cache=False).logits[0] for r in rows])
    return not torch.allclose(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_packing_is_refused_exactly_where_samples_would_see_each_other(tmp_path, model_type):
    """gpt-oss's transformers code builds its masks without the position ids, so in a packed row each sample
    attends to the ones before it (checked here on transformers' own model). Before, fsdp_ft trained on that
    with exit 0; now it refuses in one line before any weight loads. Mixtral (like Llama) keeps samples apart
    and packs."""
    from test_moe import save_tiny_moe

    path = save_tiny_moe(tmp_path / model_type, model_type)
    leaks = _packed_logits_leak(path, [[1, 5, 9, 13, 17, 21], [1, 7, 11, 2, 3], [1, 4, 8, 15]])
    assert leaks == (model_type == "gpt_oss")
    stacks = [] if model_type == "mixtral" else ["finetune.lora.target_parameters=[mlp.experts.down_proj]"]
    train = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    proc = cli("train", str(TINY), f"output_dir={tmp_path / 'run'}", *FAST, f"model.path={path}",
               "model.random_init=false", f"data.train={train}", "data.eval=null", *PACK, "train.max_steps=2",
               "finetune.method=lora", *stacks, check=False)
    if leaks:
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert "data.packing" in last and "GptOss" in last and "Traceback" not in proc.stderr, last
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]


PACK = ["data.packing=true", "train.seq_len=128"]


@pytest.mark.distributed
def test_packing_resumes_exactly_and_two_ranks_equal_one_process(session_tmp):
    """kill -9 mid-run and resume: the packed run's loss curve continues bit for bit; 2 ranks equal 1 process."""
    full = train_nproc(2, session_tmp / "packed-full", *RUN, *PACK)
    one = train_1proc(session_tmp / "packed-1proc", *RUN, *PACK, "train.grad_accum=2")
    assert_losses_close(losses(one), losses(full), rtol=1e-5)
    setup = [r for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "setup"][0]
    assert setup["train_rows"] < setup["packing"]["samples"] == 1500 and setup["packing"]["fill"] > 0.9

    out = session_tmp / "packed-killed"
    proc = _launch(out, *PACK)
    _wait_for_step(out, 7, proc)
    killed_at = assert_stays_dead(out, kill9_job(proc), ranks=2)
    assert killed_at < 9, "the run got too far before the kill"
    cli("run", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(TINY),
        f"output_dir={out}", *FAST, *RUN, *PACK)
    resumed, want = losses(out), losses(full)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(7, 11):
        assert resumed[step] == want[step], (step, resumed[step], want[step])
