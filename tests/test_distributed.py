"""N ranks over gloo train exactly like one process with the same global batch.

Each 2-rank run (launched by `fsdp-ft run`, i.e. torchrun) is compared step by step with a single-process run
whose global batch is the same (micro 2 x accum 2 x 1 rank == micro 2 x accum 1 x 2 ranks).
"""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import ASSETS, assert_losses_close, eval_rows, losses, train_1proc, train_nproc
from fsdp_ft.observability.metrics import read_metrics

pytestmark = pytest.mark.distributed

ONE_PROC = ["train.micro_batch_size=2", "train.grad_accum=2"]
TWO_RANKS = ["train.micro_batch_size=2", "train.grad_accum=1"]
PARTIAL = ["finetune.method=partial", "finetune.freeze_embeddings=true", "finetune.freeze_first_n_blocks=1",
           "finetune.frozen_regex=[mlp\\.up_proj]"]
# fp32, N ranks vs one process: only the order of the gradient sums differs. Measured over every pair in this file
# (8 steps; losses and eval losses; eager, compiled, offloaded, 2x2 hybrid, replicated): at most 8.1e-8 relative.
# 1e-6 keeps a 12x margin and fails a small systematic error that 1e-5 let through, such as one rank's half of
# the gradients exchanged in bf16 in an fp32 run
FP32_RTOL = 1e-6


def setup_row(out) -> dict:
    return next(r for r in read_metrics(out) if r.get("split") == "setup")


def trace_events(out, rank: int = 0) -> list[dict]:
    """The complete events ("X") of rank `rank`'s train.profile_steps trace."""
    (trace,) = (out / "profile").glob(f"rank{rank}.*.json")
    return [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]


def reduces_per_module(events: list[dict]) -> Counter:
    """FSDP2's gradient reductions by module: `FSDP::post_backward_reduce (<module>)`, the root's without a name.
    A backward that does not sync (set_requires_gradient_sync(False)) only accumulates and records no reduce."""
    return Counter(e["name"] for e in events if e["name"].startswith("FSDP::post_backward_reduce"))


def fsdp_modules(blocks: int) -> list[str]:
    return ["", *(f" (model.layers.{i})" for i in range(blocks))]


def partial_trainable_by_hand() -> int:
    """PARTIAL's trainable parameter count from tiny-llama's config.json: blocks 1..N-1 without their up
    projection, the final RMSNorm and the untied LM head; no embeddings, nothing of block 0."""
    c = json.loads((ASSETS / "tiny-llama" / "config.json").read_text())
    assert not (c["tie_word_embeddings"] or c["attention_bias"] or c["mlp_bias"])
    h, ffn, vocab, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    block = h * q + 2 * h * kv + q * h + 3 * h * ffn + 2 * h  # q, k, v, o; gate, up, down; two RMSNorm weights
    return (n - 1) * (block - h * ffn) + h + vocab * h  # 152,000 of 279,104


@pytest.fixture(scope="module")
def reference(session_tmp):
    """Single-process runs, computed once per fine-tuning method and precision."""
    cache = {}

    def get(name: str, *overrides: str):
        if name not in cache:
            cache[name] = train_1proc(session_tmp / f"ref-{name}", *ONE_PROC, *overrides)
        return cache[name]
    return get


@pytest.mark.parametrize("method,ac,reshard", [
    ("full", "none", "true"),
    ("full", "full", "false"),
    ("partial", "selective:2", "true"),
    ("partial", "none", "false"),
])
def test_two_ranks_equal_one_process_fp32(reference, session_tmp, method, ac, reshard):
    extra = PARTIAL if method == "partial" else []
    ref = reference(method, *extra)
    out = train_nproc(2, session_tmp / f"2r-{method}-{ac.replace(':', '')}-{reshard}", *TWO_RANKS, *extra,
                      f"activation_checkpointing={ac}", f"fsdp.reshard_after_forward={reshard}")
    assert_losses_close(losses(out), losses(ref), FP32_RTOL)
    assert len(losses(ref)) == 8
    assert setup_row(out)["world_size"] == 2 and setup_row(out)["backend"] == "gloo"  # CPU ranks talk over gloo
    # evaluation sums over ranks: the same eval loss as one process
    assert eval_rows(out)[-1]["loss"] == pytest.approx(eval_rows(ref)[-1]["loss"], rel=FP32_RTOL)
    if method == "partial":  # and both froze what PARTIAL names (which names: tests/test_partial.py)
        for run in (out, ref):
            assert setup_row(run)["trainable_params"] == partial_trainable_by_hand(), setup_row(run)


def prefetch_outlasting(events: list[dict]) -> list[bool]:
    """For each `FSDP::<pass>_prefetch for <block>` event: whether the first gloo all-gather that starts after it
    starts was still running when the prefetch returned. A blocking all-gather (torch's default on CPU) ends
    inside the prefetch (measured: 45 to 120 us before it returns, 24 of 24); an asynchronous one runs on while
    the rank computes (measured: 0.1 to 15 ms after it returns, 47 of 48; one ended 61 us before)."""
    gathers = sorted((e for e in events if e["name"] == "gloo:all_gather"), key=lambda e: e["ts"])
    outlasting = []
    for e in events:
        if "_prefetch for " in e["name"]:
            gather = next(g for g in gathers if g["ts"] >= e["ts"])
            outlasting.append(gather["ts"] + gather["dur"] > e["ts"] + e["dur"])
    return outlasting


def test_prefetching_overlaps_gathers_changes_no_number_and_syncs_once_per_step(session_tmp):
    """fsdp.prefetch=1 (the default) trains exactly as fsdp.prefetch=0: same losses and gradient norms, bit for bit.
    The profiled step (micro 1 x accumulation 2) shows what differs: with prefetch=1 each block starts the next
    block's all-gather in forward (`FSDP::forward_prefetch for <block>`), and in backward the previous block's,
    both asynchronously, so the gather is still running when the block goes on computing. With prefetch=0 there is
    no forward prefetch, and the backward one is FSDP2's own implicit prefetch, which on CPU blocks.

    Gradient accumulation syncs once per step: each FSDP module (every block and the root) reduces its gradients
    once in the step, after the last micro-batch's backward, while both backwards accumulate."""
    runs = {p: train_nproc(2, session_tmp / f"2r-prefetch{p}", "train.micro_batch_size=1", "train.grad_accum=2",
                           f"fsdp.prefetch={p}", "train.profile_steps=[3,3]") for p in (1, 0)}
    assert losses(runs[1]) == losses(runs[0]) and len(losses(runs[0])) == 8
    grad_norms = lambda run: [r["grad_norm"] for r in read_metrics(run) if "split" not in r]  # noqa: E731
    assert grad_norms(runs[1]) == grad_norms(runs[0])
    blocks = setup_row(runs[1])["blocks"]
    assert blocks == 4
    for p, out in runs.items():
        for rank in (0, 1):
            events = trace_events(out, rank)
            names = Counter(e["name"] for e in events)
            prefetched = {d: {n.split(" for ")[1]: c for n, c in names.items() if n.startswith(f"FSDP::{d}_prefetch")}
                          for d in ("forward", "backward")}
            # two micro-batches: each prefetch twice; block i prefetches i+1 (forward), i-1 (backward)
            assert prefetched["forward"] == ({f"model.layers.{i}": 2 for i in range(1, blocks)} if p else {}), \
                (p, rank, prefetched)
            assert prefetched["backward"] == {f"model.layers.{i}": 2 for i in range(blocks - 1)}, (p, rank, prefetched)
            outlasting = prefetch_outlasting(events)
            if p:  # most, not all: a descheduled rank may find its gather done when it returns
                assert sum(outlasting) > len(outlasting) / 2, (rank, outlasting)
            else:
                assert sum(outlasting) < len(outlasting) / 2, (rank, outlasting)
            # no sync on the first micro-batch: one reduce per module in the step, two accumulations
            assert reduces_per_module(events) == {f"FSDP::post_backward_reduce{m}": 1 for m in fsdp_modules(blocks)}
            assert names["FSDP::post_backward_accumulate (model.layers.0)"] == 2, names


def test_compiled_blocks_two_ranks_equal_one_process(reference, session_tmp):
    """train.compile: each block compiled by inductor (around its checkpointed forward), then sharded. 2 ranks
    equal the eager single process to fp32 rounding (inductor fuses and reorders some sums); the training rows
    count the graphs dynamo compiled: a fixed-shape graph, one for varying row lengths, one for evaluation."""
    ref = reference("full")
    out = train_nproc(2, session_tmp / "2r-compile", *TWO_RANKS, "train.compile=true",
                      "activation_checkpointing=selective:2")
    assert_losses_close(losses(out), losses(ref), FP32_RTOL)
    assert eval_rows(out)[-1]["loss"] == pytest.approx(eval_rows(ref)[-1]["loss"], rel=FP32_RTOL)
    rows = read_metrics(out)
    setup = next(r for r in rows if r.get("split") == "setup")
    assert (setup["compiled"], setup["checkpointed"]) == (4, 2)
    graphs = [r["compiled_graphs"] for r in rows if "split" not in r]
    assert 1 <= graphs[0] and graphs[-1] <= 4, graphs  # the four blocks share their graphs (3 on torch 2.13, 4 on 2.11)


def test_bf16_mixed_precision_two_ranks_close_to_one_process(reference, session_tmp):
    """bf16 compute with fp32 reduction. Both runs see identical micro-batches, so the only difference is the
    order of the fp32 gradient sum over ranks and micro-steps; bf16's 8-bit mantissa (rel. eps 3.9e-3) bounds
    how far one rounding flip can move a loss. We allow 2e-3 relative over 8 steps."""
    ref = reference("bf16", "fsdp.mixed_precision=bf16")
    out = train_nproc(2, session_tmp / "2r-bf16", *TWO_RANKS, "fsdp.mixed_precision=bf16")
    fp32 = losses(reference("full"))
    assert_losses_close(losses(out), losses(ref), 2e-3)
    # and bf16 really computed in bf16: it is not bit-equal to fp32
    assert any(abs(losses(ref)[s] - fp32[s]) > 1e-6 for s in fp32)


def test_fp16_with_sharded_grad_scaler(reference, session_tmp):
    """fp16 compute needs loss scaling; the scaler's inf check must agree across shards (see the worker test
    below). Losses track the fp32 run, and differ from it: fp16 really computed."""
    out = train_nproc(2, session_tmp / "2r-fp16", *TWO_RANKS, "fsdp.mixed_precision=fp16")
    rows = [r for r in read_metrics(out) if "split" not in r]
    assert [r["loss_scale"] for r in rows] == [65536.0] * len(rows)  # live (a disabled scaler logs 1.0), no overflow
    fp32 = losses(reference("full"))
    # fp16's machine epsilon is 2**-10 = 9.8e-4: a loss within one epsilon (relative) of fp32's after 8 steps; skipped
    # or repeated steps move it by far more (the 8 steps take the loss down 6%). Measured: at most 1.0e-5 (the tiny
    # model's logits are small, so its loss stays near log(vocab) and is insensitive to their rounding)
    assert_losses_close(losses(out), fp32, 2**-10)
    # and not fp32 in disguise: above fp32's own 2-rank vs 1-process noise (FP32_RTOL); measured 4e-6..1e-5 from step 4
    assert any(abs(losses(out)[s] - fp32[s]) / fp32[s] > FP32_RTOL for s in fp32), (losses(out), fp32)


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """fsdp_ft's loss scaler, optimizer and optimizer step under FSDP2 with fp16 compute on 2 gloo ranks
    (tests/scripts/fp16_overflow_worker.py): an inf in rank 1's gradient shard only makes both ranks skip the step
    (parameters unchanged on both) and both halve the scale; the clean step before it changed every shard.
    (Two mechanisms agree today: ShardedGradScaler all-reduces found_inf, and DTensor's own handler for the
    unscale op already reduces it over the mesh, so even a plain GradScaler agrees on torch 2.13. Without that
    handler a plain GradScaler lets rank 0 step and keep its scale, which fails here; the behaviour is asserted,
    not the class.)"""
    import os
    import subprocess
    import sys

    from conftest import REPO, free_port

    script = REPO / "tests" / "scripts" / "fp16_overflow_worker.py"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          f"--master-port={free_port()}", str(script), str(tmp_path)], timeout=180,
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        clean, overflow = r["steps"]
        assert clean["compute_dtype"] == "float16", r
        assert clean["local_grads_finite"] and all(clean["changed"]), r
        assert (clean["scale_before"], clean["scale_after"]) == (65536.0, 65536.0), r
        # only rank 1 saw the inf; both skipped and both halved
        assert overflow["local_grads_finite"] is (rank == 0), r
        assert not any(overflow["changed"]), r
        assert (overflow["scale_before"], overflow["scale_after"]) == (65536.0, 32768.0), r


def test_hybrid_sharding_four_ranks(session_tmp):
    """2 replicas x 2 shards (a 2-D mesh) equals one process with the same global batch of 8."""
    ref = train_1proc(session_tmp / "ref-gb8", "train.micro_batch_size=2", "train.grad_accum=4")
    out = train_nproc(4, session_tmp / "4r-hsdp", "train.micro_batch_size=2", "train.grad_accum=1",
                      "fsdp.hybrid_replicas=2")
    assert_losses_close(losses(out), losses(ref), FP32_RTOL)
    # and really 2 x 2 (plain 4-way sharding gives the same losses): each rank holds half of what one process
    # holds (parameters, gradients and AdamW state), not a quarter
    assert setup_row(out)["replicas"] == 2, setup_row(out)
    first = lambda run: next(r for r in read_metrics(run) if "state_bytes_per_rank" in r)  # noqa: E731
    one, per_rank = first(ref)["state_bytes_per_rank"][0], first(out)["state_bytes_per_rank"]
    assert len(per_rank) == 4 and all(abs(b - one / 2) <= 0.1 * one / 2 for b in per_rank), (per_rank, one)


def test_cpu_offload_two_ranks(reference, session_tmp):
    """The same losses with the sharded state kept in host memory (on CPU ranks no number may change; that the
    option reaches FSDP is checked in-process below)."""
    out = train_nproc(2, session_tmp / "2r-offload", *TWO_RANKS, "fsdp.cpu_offload=true")
    assert_losses_close(losses(out), losses(reference("full")), FP32_RTOL)


def test_fsdp_keys_reach_every_fsdp_parameter(tmp_path):
    """fsdp.cpu_offload, fsdp.param_dtype and fsdp.reduce_dtype, built in this process (world size 1, the code
    path of every rank): every parameter of every FSDP module (each block and the root) is offloaded, and computes
    and reduces in the dtypes set apart from fsdp.mixed_precision and from each other. A forward then computes in
    the param dtype."""
    from conftest import TINY
    from fsdp_ft.config import load_config
    from fsdp_ft.runtime import distributed
    from fsdp_ft.training import fsdp_engine

    cfg = load_config(TINY, [f"output_dir={tmp_path}", "fsdp.cpu_offload=true", "fsdp.mixed_precision=fp32",
                             "fsdp.param_dtype=bf16", "fsdp.reduce_dtype=fp16"])
    built = fsdp_engine.build(cfg, distributed.init_distributed())
    model, tokenizer, info = built.model, built.data.tokenizer, built.info
    groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if hasattr(m, "_get_fsdp_state")]
    assert len(groups) == info["blocks"] + 1 == 5
    params = [fp for g in groups for fp in g.fsdp_params]
    assert len(params) == len(list(model.parameters())), "a parameter outside FSDP"
    assert all(fp.offload_to_cpu for fp in params), [fp.offload_to_cpu for fp in params]
    for g in groups:
        assert (g.mp_policy.param_dtype, g.mp_policy.reduce_dtype) == (torch.bfloat16, torch.float16), g.mp_policy
    with torch.no_grad():
        logits = model(**tokenizer(["def f(x): return x"], return_tensors="pt"), use_cache=False).logits
    assert logits.dtype == torch.bfloat16
    # FSDP2 settles each parameter's dtypes at its first forward: stored fp32, gathered bf16, reduced fp16
    assert {(fp.orig_dtype, fp.param_dtype, fp.reduce_dtype) for fp in params} == \
        {(torch.float32, torch.bfloat16, torch.float16)}


def test_sharded_state_bytes_halve(reference, session_tmp):
    """Parameters + gradients + optimizer state per rank at 2 ranks are half of 1 rank (within 10%)."""

    def state_bytes(out):
        return [r for r in read_metrics(out) if "state_bytes_per_rank" in r][0]["state_bytes_per_rank"]

    one = state_bytes(reference("full"))[0]
    two = state_bytes(train_nproc(2, session_tmp / "2r-mem", *TWO_RANKS, "train.max_steps=1"))
    assert len(two) == 2
    for b in two:
        assert abs(b - one / 2) <= 0.1 * one / 2, (b, one)


def test_sequence_classification_two_ranks(session_tmp):
    """BERT classifier: per-step losses and eval loss/accuracy equal one process."""
    from conftest import ASSETS

    data = ASSETS / "data"
    task = ["task=seq_cls", f"model.path={ASSETS / 'tiny-bert'}", f"data.train={data / 'tiny_cls_train.jsonl'}",
            f"data.eval={data / 'tiny_cls_eval.jsonl'}", "data.max_eval_samples=33", "optim.lr=1e-3"]
    ref = train_1proc(session_tmp / "ref-cls", *ONE_PROC, *task)
    out = train_nproc(2, session_tmp / "2r-cls", *TWO_RANKS, *task)
    assert_losses_close(losses(out), losses(ref), FP32_RTOL)
    got, want = eval_rows(out)[-1], eval_rows(ref)[-1]
    assert got["accuracy"] == want["accuracy"]
    assert got["loss"] == pytest.approx(want["loss"], rel=FP32_RTOL)


def test_gather_once_per_step_equals_one_process_with_one_all_gather_per_block(reference, session_tmp):
    """fsdp.gather_once_per_step keeps blocks gathered across the micro-batches of a step: the same losses as one
    process, and the profiled step all-gathers each FSDP module (every block and the root) exactly once, where
    the default gathers every block twice per micro-batch."""
    out = train_nproc(2, session_tmp / "2r-gather-once", "train.micro_batch_size=1", "train.grad_accum=2",
                      "fsdp.gather_once_per_step=true", "train.profile_steps=[3,3]")
    assert_losses_close(losses(out), losses(reference("full")), FP32_RTOL)
    (trace,) = (out / "profile").glob("rank0.*.json")
    names = [e["name"] for e in json.loads(trace.read_text())["traceEvents"]
             if e.get("ph") == "X" and (e["name"] == "FSDP::all_gather" or e["name"].startswith("FSDP::all_gather ("))]
    blocks = next(r for r in read_metrics(out) if r.get("split") == "setup")["blocks"]
    # the root's event carries no module name ("FSDP::all_gather"), each block's its own
    assert blocks >= 2 and len(names) == blocks + 1 == len(set(names)), names
    # and the first micro-batch's backward does not reduce: one reduce per FSDP module in the step
    assert reduces_per_module(trace_events(out)) == {f"FSDP::post_backward_reduce{m}": 1 for m in fsdp_modules(blocks)}


@pytest.mark.parametrize("precision", ["fp32", "fp32-tied", pytest.param("bf16", marks=pytest.mark.slow)])
def test_replicated_frozen_weights_equal_one_process(reference, session_tmp, precision):
    """fsdp.shard_frozen=false keeps LoRA's frozen base whole on each rank (no all-gathers for it) while the
    adapters stay sharded (hybrid_replicas=1): the same losses as one process, and each rank holds about what one
    process holds. Tied embeddings stay tied (a replicated tied weight once came out of loading as two tensors,
    one of them random)."""
    from conftest import ASSETS

    extra = ["finetune.method=lora"] + (["fsdp.mixed_precision=bf16"] if precision == "bf16" else [])
    if precision == "fp32-tied":
        extra.append(f"model.path={ASSETS / 'tiny-llama-tied'}")
    ref = reference(f"lora-{precision}", *extra)
    out = train_nproc(2, session_tmp / f"2r-replicated-{precision}", *TWO_RANKS, *extra, "fsdp.shard_frozen=false",
                      "fsdp.hybrid_replicas=1")
    assert_losses_close(losses(out), losses(ref), FP32_RTOL if precision.startswith("fp32") else 2e-3)
    if precision != "fp32":  # bf16: the replicated base is stored in bf16, its bytes halve whatever the sharding
        return
    first = lambda run: next(r for r in read_metrics(run) if "state_bytes_per_rank" in r)  # noqa: E731
    per_rank, whole = first(out)["state_bytes_per_rank"], first(ref)["state_bytes_per_rank"][0]
    # the frozen base whole, the adapters and their state halved: 0.87 of one process here; sharded: about 0.5
    assert all(b > 0.75 * whole for b in per_rank), (per_rank, whole)


def test_auto_keeps_a_small_lora_model_whole_on_every_rank(reference, session_tmp):
    """fsdp.shard_frozen=null and fsdp.hybrid_replicas=null (the defaults): a LoRA base this small stays whole on
    each rank and so do its adapters (2 replicas x 1 shard), with the reasons in the setup row; training still
    equals one process, and each rank holds what one process holds. The gradients of every block are
    all-reduced asynchronously (gloo_reduce.DeferredAllReduce), not by FSDP's blocking HSDP all-reduce."""
    ref = reference("lora-fp32", "finetune.method=lora")
    out = train_nproc(2, session_tmp / "2r-auto-frozen", *TWO_RANKS, "finetune.method=lora")
    assert_losses_close(losses(out), losses(ref), FP32_RTOL)
    setup = next(r for r in read_metrics(out) if r.get("split") == "setup")
    assert setup["shard_frozen"] is False and setup["shard_frozen_why"].startswith("auto: the frozen base"), setup
    assert setup["replicas"] == 2 and setup["replicas_why"].startswith("auto: the trainable state"), setup
    # FSDP runs on the size-1 shard dimension and gloo_reduce all-reduces the whole gradients, overlapped
    assert setup["gradient_reduce"] == "gloo all-reduce of whole gradients, overlapped", setup
    first = lambda run: next(r for r in read_metrics(run) if "state_bytes_per_rank" in r)  # noqa: E731
    assert all(b > 0.98 * first(ref)["state_bytes_per_rank"][0] for b in first(out)["state_bytes_per_rank"])


@pytest.mark.parametrize("method,memory,want_sharded", [
    ("lora", 2**40, False),   # fits a quarter of the memory: whole
    ("lora", 2**10, True),    # a 1 KiB device: sharded
    ("full", 2**40, True),    # full fine-tuning shards everything
])
def test_shard_frozen_auto_decision(tmp_path, method, memory, want_sharded):
    from conftest import TINY
    from fsdp_ft.config import load_config
    from fsdp_ft.model.build import load_tokenizer, resolve_model_dir
    from fsdp_ft.parallel import fsdp
    from fsdp_ft.runtime import distributed
    from fsdp_ft.training.run_setup import build_meta

    cfg = load_config(TINY, [f"output_dir={tmp_path}", f"finetune.method={method}"])
    assert cfg.fsdp.shard_frozen is None
    model_dir = resolve_model_dir(cfg)
    env = distributed.DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="fake")
    model, _ = build_meta(cfg, env, model_dir, load_tokenizer(cfg, model_dir), None)  # meta: no process group
    sharded, why = fsdp.decide_shard_frozen(model, cfg, 2, "cpu", memory)
    assert sharded is want_sharded, why
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    if method == "lora":  # the reason states the whole frozen size, in GiB
        assert f"({frozen / 2**30:.2f} GiB whole)" in why
    # hybrid_replicas=null follows: every weight whole only where the base is
    replicas, why = fsdp.decide_replicas(model, cfg, 2, "cpu", memory)
    assert replicas == (1 if want_sharded else 2), why


@pytest.mark.parametrize("overrides,memory,want", [
    ([], 2**40, 2),                                      # small base, small adapters: all whole
    (["fsdp.shard_frozen=false"], None, None),           # adapters' state over 5% of the device: sharded (set below)
    (["fsdp.hybrid_replicas=1"], 2**40, 1),              # the config decides
    (["fsdp.cpu_offload=true"], 2**40, 1),               # offloaded state stays sharded
])
def test_replicas_auto_decision(tmp_path, overrides, memory, want):
    """The 5% bound on trainable state: 16 bytes per trainable parameter against the device memory."""
    from conftest import TINY
    from fsdp_ft.config import load_config
    from fsdp_ft.model.build import load_tokenizer, resolve_model_dir
    from fsdp_ft.parallel import fsdp
    from fsdp_ft.runtime import distributed
    from fsdp_ft.training.run_setup import build_meta

    cfg = load_config(TINY, [f"output_dir={tmp_path}", "finetune.method=lora", *overrides])
    model_dir = resolve_model_dir(cfg)
    env = distributed.DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="fake")
    model, _ = build_meta(cfg, env, model_dir, load_tokenizer(cfg, model_dir), None)
    state = 16 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    if memory is None:  # just below and just above 20x the trainable state
        assert fsdp.decide_replicas(model, cfg, 2, "cpu", 20 * state)[0] == 2
        assert fsdp.decide_replicas(model, cfg, 2, "cpu", 20 * state - 1)[0] == 1
        return
    replicas, why = fsdp.decide_replicas(model, cfg, 2, "cpu", memory)
    assert replicas == want, why


@pytest.mark.parametrize("overrides,world,want", [
    (["finetune.method=qlora"], 2, 1),                             # a quantized base is sharded
    (["finetune.method=qlora", "fsdp.shard_frozen=false"], 2, 1),  # ... whatever happens to its other weights
    (["finetune.method=full"], 2, 1),                              # full fine-tuning shards every weight
    (["finetune.method=lora"], 1, 1),
    (["finetune.method=lora"], 2, None),                           # depends on the model's size
])
def test_replicas_decided_without_a_model(overrides, world, want):
    from conftest import TINY
    from fsdp_ft.config import load_config
    from fsdp_ft.parallel import fsdp

    decided = fsdp.replicas_without_model(load_config(TINY, ["output_dir=/tmp/x", *overrides]), world)
    assert (decided and decided[0]) == want, decided


def test_setup_and_step_timeouts_apart(tmp_path):
    """dist.setup_timeout_minutes governs set-up and dist.timeout_minutes the steps, in every process group of a
    rank: rank 0 preparing the data for 2 s passes a 1 s step timeout (main_process_first waits under the set-up
    one), the same wait inside step_timeout() makes rank 1 give up after 1 s, and afterwards the set-up timeout is
    back. A 2-D mesh's sub-groups, which torch makes with its own 30-minute default, follow too."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO, free_port

    script = REPO / "tests" / "scripts" / "pg_timeouts_worker.py"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          f"--master-port={free_port()}", str(script), str(tmp_path)], timeout=120,
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["groups"] >= 2, r  # the default group and the mesh's size-1 "shard" group
        assert (r["setup"], r["steps"], r["after_steps"]) == ([60.0], [1.0], [60.0]), r
        assert r["prepared_after_s"] > 1.5, r  # rank 0 prepared longer than the step timeout, and it passed
    assert ranks[1]["slow_step"] == "timed out" and 0.9 <= ranks[1]["slow_step_waited_s"] < 2.0, ranks[1]


def test_a_slow_rank_0_data_preparation_outlasts_a_short_step_timeout(tmp_path):
    """A 2-rank `fsdp-ft train` (torchrun) with dist.timeout_minutes=0.05 (3 s) whose rank 0 prepares the data for
    4.5 s while rank 1 waits in main_process_first: it trains, with the 3 s timeout in force while training and the
    set-up timeout (2 min) back while rank 0 exports final/ alone."""
    import json
    import os
    import subprocess
    import sys

    from conftest import FAST, REPO, TINY, free_port

    script = REPO / "tests" / "scripts" / "slow_prep_train.py"
    args = [*FAST, "train.max_steps=1", "data.eval=null", "dist.timeout_minutes=0.05", "dist.setup_timeout_minutes=2"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          f"--master-port={free_port()}", str(script), str(TINY), f"output_dir={tmp_path}", *args],
                         timeout=300, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "SLOW_PREP_S": "4.5", "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(losses(tmp_path)) == [1] and (tmp_path / "final" / "config.json").is_file()
    rank0, rank1 = (json.loads((tmp_path / f"timeouts-rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == {"prepared_s": 4.5, "training": [3.0], "exporting": [120.0]}, rank0
    assert rank1 == {"training": [3.0]}, rank1


def test_timeout_keys_are_validated_and_documented():
    from conftest import TINY
    from fsdp_ft.config import help_text, load_config
    from fsdp_ft.errors import ConfigError

    cfg = load_config(TINY, ["output_dir=/tmp/x"])
    assert (cfg.dist.setup_timeout_minutes, cfg.dist.timeout_minutes) == (120.0, 30.0)
    assert load_config(TINY, ["output_dir=/tmp/x", "dist.timeout_minutes=0.5"]).dist.timeout_minutes == 0.5
    for key in ("dist.timeout_minutes", "dist.setup_timeout_minutes"):
        with pytest.raises(ConfigError, match=f"'{key}' must be > 0"):
            load_config(TINY, ["output_dir=/tmp/x", f"{key}=0"])
        assert f"  {key} (float, default " in help_text()
