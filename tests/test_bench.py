"""The benchmark harness (benchmarks/run.py): the systems it compares see the same samples, and its numbers add up.

Fast tests check the pieces against independent references (accelerate's own batch sharding, hand-computed
numbers); the slow one runs `fsdp-ft bench` end to end on a tiny model with fsdp_ft and HF Trainer + FSDP2 and
checks that both trained the same tokens per step from the same step-1 loss as a plain forward of the model.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli

sys.path.insert(0, str(REPO / "benchmarks"))
from summary import aggregate, comparability, ratios, run_numbers  # noqa: E402
from systems import failure_reason  # noqa: E402
from workload import Workload, plan_order, prepare  # noqa: E402


@pytest.fixture(scope="module")
def tiny_workload(tmp_path_factory):
    w = Workload(model="tiny", mode="full", nproc=2, seq_len=64, micro_batch_size=2, grad_accum=2,
                 warmup_steps=1, timed_steps=2, precision="fp32")
    return w, prepare(w, tmp_path_factory.mktemp("bench-work"))


def test_samples_have_seq_len_tokens_and_match_the_engine_encoding(tiny_workload):
    """Every sample is exactly seq_len tokens (no padding), and the peers' ids are fsdp_ft's tokenization of the
    texts fsdp_ft reads, in the batch plan's order."""
    from transformers import AutoTokenizer

    w, prep = tiny_workload
    texts = [json.loads(line)["text"] for line in prep.train_jsonl.read_text().splitlines()]
    ids = json.loads(prep.samples_json.read_text())
    assert len(texts) == len(ids) == w.steps * w.global_batch == 24
    assert {len(row) for row in ids} == {w.seq_len}
    tok = AutoTokenizer.from_pretrained(prep.model_dir)
    order = plan_order(w, len(texts))
    for k in (0, 7, 23):  # a plain tokenizer call, not the harness's encoder: text longer than seq_len, cut
        assert ids[k] == tok(texts[order[k]])["input_ids"][: w.seq_len]


def test_peer_sharding_gives_each_rank_the_micro_batches_of_fsdp_ft(tiny_workload):
    """accelerate's batch sharding of the sequential peer list (what HF Trainer does under torchrun) hands rank r
    at micro-step a of step s exactly the samples fsdp_ft's BatchPlan gives it."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    from fsdp_ft.data.splits import BatchPlan

    w, _ = tiny_workload
    n = w.steps * w.global_batch
    order = plan_order(w, n)  # peer list position -> sample index
    for rank in range(w.nproc):
        shard = BatchSamplerShard(BatchSampler(SequentialSampler(range(n)), w.micro_batch_size, drop_last=False),
                                  num_processes=w.nproc, process_index=rank)
        peer = [[order[i] for i in batch] for batch in shard]
        plan = BatchPlan(n, w.micro_batch_size, w.grad_accum, w.nproc, rank, w.seed)
        ours = [mb for s in range(w.steps) for mb in plan.micro_batches(plan.permutation(0), s)]
        assert peer == ours


def test_run_numbers_leave_out_warmup_and_aggregate_medians():
    run = {"system": "x", "step_s": [10.0, 1.0, 3.0, 2.0], "tokens": [100, 100, 100, 100],
           "peak_mem_bytes_per_rank": [5e8, 7e8], "losses": {1: 2.0}}
    n = run_numbers(run, warmup_steps=1, flops_per_token=6.0, peak_flops_total=1200.0)
    assert n["tokens_per_s"] == pytest.approx(300 / 6.0)
    assert n["median_step_s"] == 2.0
    assert n["mfu"] == pytest.approx(6.0 * 50.0 / 1200.0)
    assert n["peak_mem_bytes"] == 7e8
    runs = [{**run, "tokens": [100] * 4, "numbers": {**n, "tokens_per_s": v}} for v in (40.0, 60.0, 50.0)]
    agg = aggregate(runs + [{"system": "x", "error": "boom"}])
    assert agg["tokens_per_s"] == 50.0 and agg["repeats"] == 3 and agg["failed_repeats"] == 1
    peer = {**agg, "tokens_per_s": 25.0, "peak_mem_bytes": 1.4e9}
    assert ratios({"fsdp_ft": agg, "p": peer}) == {"p": {"tokens_per_s": 2.0, "peak_mem": 0.5}}
    c = comparability({"fsdp_ft": agg, "p": {**peer, "losses": {1: 2.2}}}, tokens_per_step=100)
    assert c["same_tokens_per_step"] and c["step1_loss_rel_diff_vs_fsdp_ft"]["p"] == pytest.approx(0.1)
    assert not comparability({"fsdp_ft": agg, "p": {**peer, "tokens_per_step": [100, 90]}}, 100)["same_tokens_per_step"]


def test_failure_reason_names_the_exception_not_the_launcher():
    log = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"x.py\", line 3\n"
           "[rank1]: ValueError: Using fsdp only works in distributed training.\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n=====\nx.py FAILED\n")
    assert failure_reason(log) == "ValueError: Using fsdp only works in distributed training."


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_end_to_end_fsdp_ft_and_hf_fsdp2_train_the_same_tokens_from_the_same_loss(tmp_path):
    out = tmp_path / "bench"
    proc = cli("bench", "--model", "tiny", "--modes", "full", "--systems", "fsdp_ft,hf_fsdp2", "--seq-len", "64",
               "--micro-batch-size", "2", "--grad-accum", "2", "--warmup-steps", "1", "--timed-steps", "1",
               "--repeats", "1", "--precision", "fp32", "--out", str(out), timeout=900)
    report = json.loads((out / "bench.json").read_text())
    case = report["cases"]["full"]
    systems = case["systems"]
    for name in ("fsdp_ft", "hf_fsdp2"):
        s = systems[name]
        assert s["ok"], s
        assert s["tokens_per_s"] > 0 and s["median_step_s"] > 0 and s["peak_mem_bytes"] > 1e7
        assert f"| full | {name} |" in proc.stdout
    # the peer really shards with FSDP2 (on CPU accelerate would silently fall back to DDP without the harness's fix)
    assert "FSDPModule" in systems["hf_fsdp2"]["wrapping"] and "FSDP" in systems["hf_fsdp2"]["wrapping"]
    tokens_per_step = 64 * 2 * 2 * 2
    assert case["comparability"]["same_tokens_per_step"]
    assert systems["fsdp_ft"]["tokens_per_step"] == systems["hf_fsdp2"]["tokens_per_step"] == [tokens_per_step] * 2
    # step 1 (before any update) against an independent reference: the saved model's own mean token loss
    # on the first global batch, computed here in one process
    from transformers import AutoModelForCausalLM

    first_batch = json.loads(Path(case["samples_json"]).read_text())[:tokens_per_step // 64]
    ids = torch.tensor(first_batch)
    model = AutoModelForCausalLM.from_pretrained(case["model_dir"], dtype=torch.float32)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss.item()
    for name in ("fsdp_ft", "hf_fsdp2"):
        assert math.isclose(systems[name]["losses"]["1"], reference, rel_tol=1e-5), (name, reference)
    # step 2 follows one identical AdamW update in fp32: still equal to a few ulps
    assert math.isclose(systems["fsdp_ft"]["losses"]["2"], systems["hf_fsdp2"]["losses"]["2"], rel_tol=1e-5)
    assert (out / "bench.md").is_file() and (out / "bench-full.html").is_file()


def test_fsdp_ft_set_overrides_reach_fsdp_ft_config(tmp_path):
    """--fsdp-ft-set KEY=VALUE: appended to fsdp_ft's command line, where the CLI's override parser reads them."""
    from run import parse_args, workload
    from systems import fsdp_ft_command

    from fsdp_ft.config import load_config

    args = parse_args(["--fsdp-ft-set", "fsdp.shard_frozen=false", "--fsdp-ft-set", "train.chunked_head_loss=false"])
    w = workload(args, "lora")
    assert w.fsdp_ft_set == ("fsdp.shard_frozen=false", "train.chunked_head_loss=false")
    cmd = fsdp_ft_command(w, REPO / "configs" / "tiny.yaml", tmp_path / "run")
    overrides = cmd[cmd.index(f"output_dir={tmp_path / 'run'}"):]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    assert (cfg.fsdp.shard_frozen, cfg.train.chunked_head_loss) == (False, False)

