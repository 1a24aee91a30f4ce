"""What only a CUDA device can check: the same training numbers on the GPU as on the CPU, bf16 autocast through
FSDP2's mixed precision, TF32, the pinned prefetching of batches, compiled blocks (Triton), SDPA's flash kernel on
the model's attention, and the 4-bit base on the GPU against bitsandbytes' CUDA kernels.

All skip where there is no CUDA device (CI and the development machines); a lent GPU runs them with
`benchmarks/gpu_check.sh`. A GPU machine has one rank per GPU, so multi-rank NCCL runs need several GPUs and
are not here; `test_debug.py::test_run_one_rank_with_nccl` starts NCCL through torchrun.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, FAST, REPO, TINY, assert_losses_close, cli, drop_leftover_process_group, losses
from fsdp_ft.observability.metrics import read_metrics

pytestmark = pytest.mark.gpu

# fp32 sums in another order (GPU kernels vs CPU kernels), compounded over 8 steps of lr 3e-3
DEVICE_RTOL = 1e-4
FP32 = "fsdp.mixed_precision=fp32"  # explicit: fsdp.mixed_precision=auto means bf16 on a bf16 GPU
QLORA = ["finetune.method=qlora", "finetune.lora.r=4"]


def setup_row(out: Path) -> dict:
    return next(r for r in read_metrics(out) if r.get("split") == "setup")


def train_on_cpu(out: Path, *overrides: str) -> Path:
    """The same run with the GPU hidden: the reference."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-m", "fsdp_ft.cli", "train", str(TINY), f"output_dir={out}", *FAST, *overrides],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    return out


def train_on_gpu(out: Path, *overrides: str) -> Path:
    cli("train", str(TINY), f"output_dir={out}", *FAST, *overrides)
    return out


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_fp32_on_the_gpu_equals_the_cpu(tmp_path, method):
    """IEEE fp32 (train.tf32=false): the GPU run is the CPU run, step for step, for full fine-tuning and for the
    NF4 base (torchao's NF4 tensor and fsdp_ft's 4-bit layer on CUDA)."""
    extra = QLORA if method == "qlora" else []
    gpu = train_on_gpu(tmp_path / "gpu", *extra, FP32, "train.tf32=false")
    cpu = train_on_cpu(tmp_path / "cpu", *extra, FP32)
    assert_losses_close(losses(gpu), losses(cpu), DEVICE_RTOL)
    setup = setup_row(gpu)
    assert setup["device"] == "cuda:0" and setup["tf32"] is False and setup_row(cpu)["device"] == "cpu"
    assert "data sheet" in setup["peak_flops_source"] and "fp32" in setup["peak_flops_source"]
    steps = [r for r in read_metrics(gpu) if "split" not in r]
    assert all(r["peak_mem_bytes"] > 0 and 0 < r["mfu"] < 1 for r in steps)


def test_tf32_is_on_by_default_and_counts_against_the_tf32_peak(tmp_path):
    out = train_on_gpu(tmp_path / "tf32", FP32)
    setup = setup_row(out)
    assert setup["tf32"] is True and "tf32" in setup["peak_flops_source"]
    ieee = train_on_gpu(tmp_path / "ieee", FP32, "train.tf32=false")
    assert_losses_close(losses(out), losses(ieee), 1e-2)  # TF32's 10-bit mantissa moves the loss a little
    # ... but it does move it: TF32 not applied would give the IEEE run's numbers (the step-1 forward alone rounds
    # every matmul input to 10 bits, ~1e-3 relative per product)
    apart = max(abs(losses(out)[s] - losses(ieee)[s]) / abs(losses(ieee)[s]) for s in losses(ieee))
    assert apart > 1e-6, (losses(out), losses(ieee))


def test_bf16_mixed_precision_tracks_fp32(tmp_path):
    bf16 = train_on_gpu(tmp_path / "bf16", "fsdp.mixed_precision=bf16")
    fp32 = train_on_gpu(tmp_path / "fp32", FP32, "train.tf32=false")
    assert_losses_close(losses(bf16), losses(fp32), 2e-2)
    assert losses(bf16) != losses(fp32)  # it really computed in bf16
    assert "bf16" in setup_row(bf16)["peak_flops_source"]


def test_pinned_prefetching_changes_no_number(tmp_path):
    """On a GPU the next step's batches are built and pinned by a worker thread (the default there)."""
    on = train_on_gpu(tmp_path / "on", FP32, "train.tf32=false")
    off = train_on_gpu(tmp_path / "off", FP32, "train.tf32=false", "train.prefetch_batches=false")
    assert_losses_close(losses(on), losses(off), 1e-6)


@pytest.mark.parametrize("setting", [None, False])
def test_prefetching_builds_pinned_batches_in_the_worker(tmp_path, monkeypatch, setting):
    """What the equality above cannot show: prefetching happens. An in-process run records, for every step batch
    built, the thread that built it and whether its tensors are pinned: with train.prefetch_batches left at null
    (on for a GPU) every step after the first is built by the worker thread, all in pinned memory (for the
    asynchronous copy); with false every batch is built on the main thread."""
    import threading

    from fsdp_ft.api import train
    from fsdp_ft.config import load_config
    from fsdp_ft.runtime import tf32
    from fsdp_ft.training import step_batches

    built = []
    real = step_batches.StepBatches._host

    def spy(self, position):
        batches = real(self, position)
        built.append((position, threading.current_thread().name,
                      all(v.is_pinned() for b in batches for v in b.values())))
        return batches

    monkeypatch.setattr(step_batches.StepBatches, "_host", spy)
    was = tf32.enabled()
    override = [] if setting is None else [f"train.prefetch_batches={str(setting).lower()}"]
    try:
        train(load_config(TINY, [f"output_dir={tmp_path / 'run'}", *FAST, FP32, "train.tf32=false",
                                 "train.max_steps=4", *override]))
    finally:
        tf32.set_tf32(was)
    assert len(built) == 4, built  # one build per step, none wasted
    workers = [b for b in built if b[1].startswith("fsdp_ft-batches")]
    if setting is None:
        assert [b[0] for b in workers] == [b[0] for b in built[1:]], built  # steps 2-4 prefetched
        assert all(pinned for _, _, pinned in built), built
    else:
        assert workers == [] and all(b[1] == threading.main_thread().name for b in built), built


def test_compiled_blocks_equal_eager(tmp_path):
    compiled = train_on_gpu(tmp_path / "compiled", FP32, "train.tf32=false", "train.compile=true")
    eager = train_on_gpu(tmp_path / "eager", FP32, "train.tf32=false")
    assert_losses_close(losses(compiled), losses(eager), DEVICE_RTOL)
    graphs = [r["compiled_graphs"] for r in read_metrics(compiled) if "split" not in r]
    assert 1 <= graphs[-1] <= 3, graphs


def test_flash_attention_kernel_runs_the_model_attention():
    """SDPA's flash kernel (forced: it raises if it cannot take the call) on the tiny Llama in bf16 gives the
    logits of eager attention to bf16 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda().bfloat16().eval()
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager").cuda().bfloat16().eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(4, config.vocab_size, (2, 128), device="cuda")
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            got = sdpa(input_ids=ids).logits.float()
        want = eager(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_nf4_on_cuda_equals_the_cpu_and_bitsandbytes_cuda_kernels():
    """The NF4 base quantized on the GPU has the CPU's codes and scales bit for bit; fsdp_ft's one-lookup
    dequantization on CUDA is bit-equal to torchao's; and bitsandbytes' CUDA `quantize_4bit` picks the same codes
    but where a value sits on a boundary between two (torchao and bitsandbytes round those apart: 0.01% of
    codes, one step off, on the CPU as well)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the reference for this check")
    from fsdp_ft.quant import nf4_linear, quantize

    torch.manual_seed(0)
    weight = torch.randn(512, 256) * 0.02
    ours = quantize.quantize_weight(weight.cuda(), "nf4", 64, 256)
    on_cpu = quantize.quantize_weight(weight, "nf4", 64, 256)
    assert torch.equal(ours.quantized_data.cpu(), on_cpu.quantized_data)
    assert torch.equal(ours.quantized_scalers.cpu(), on_cpu.quantized_scalers)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(nf4_linear.dequantize(ours, dtype), ours.get_original_weight().to(dtype))
        assert torch.equal(nf4_linear.dequantize(ours, dtype).cpu(), nf4_linear.dequantize(on_cpu, dtype))
    packed, _ = bnb.functional.quantize_4bit(weight.cuda(), blocksize=64, quant_type="nf4", compress_statistics=True)
    unpack = lambda p: torch.stack([p.reshape(-1) >> 4, p.reshape(-1) & 15], 1).reshape(-1).long()  # noqa: E731
    apart = unpack(ours.quantized_data) - unpack(packed)
    assert apart.abs().max() <= 1 and (apart != 0).float().mean() < 1e-3


# ---------------------------------------------------------------- every tensor where it belongs (GPU-REVIEW B1-B5)

QLORA_2RANKS = ["finetune.method=qlora", "finetune.lora.r=4"]
CLS = ["task=seq_cls", f"model.path={ASSETS / 'tiny-bert'}", f"data.train={ASSETS / 'data' / 'tiny_cls_train.jsonl'}",
       f"data.eval={ASSETS / 'data' / 'tiny_cls_eval.jsonl'}"]


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_on_cuda_is_bit_identical_to_the_cpu(quant, dtype):
    """B5: the base is quantized on the rank's GPU (seconds, not minutes per 8B on a CPU thread), and every stored
    tensor (codes, int8 scales, their factors and mean, the code book) equals the CPU's bit for bit, so a run's
    weights do not depend on the device that quantized them."""
    from fsdp_ft.quant import quantize

    torch.manual_seed(0)
    weight = (torch.randn(1024, 512) * 0.02).to(dtype)
    weight[3] = 0
    on_gpu = quantize.quantize_weight(weight.cuda(), quant, 64, 256)
    on_cpu = quantize.quantize_weight(weight, quant, 64, 256)
    names = on_cpu.__tensor_flatten__()[0]
    assert on_gpu.device.type == "cuda" and all(getattr(on_gpu, n).device.type == "cuda" for n in names)
    for name in names:
        assert torch.equal(getattr(on_gpu, name).cpu(), getattr(on_cpu, name)), name


@pytest.mark.parametrize("quant", ["fp4", "int8"])
def test_quantized_base_on_one_gpu_equals_the_cpu(tmp_path, quant):
    """B1: with one rank FSDP ignores the quantized base, so set-up must quantize it onto the GPU itself (it was
    left on the CPU: a device mismatch at the first forward). fp32 on both sides; NF4 is
    test_fp32_on_the_gpu_equals_the_cpu[qlora]."""
    extra = [*QLORA, f"finetune.quant.type={quant}", "fsdp.mixed_precision=fp32", "train.max_steps=3"]
    gpu = train_on_gpu(tmp_path / "gpu", *extra, "train.tf32=false")
    cpu = train_on_cpu(tmp_path / "cpu", *extra)
    assert_losses_close(losses(gpu), losses(cpu), DEVICE_RTOL)
    assert setup_row(gpu)["placement_checked"] == setup_row(cpu)["placement_checked"] > 0


@pytest.mark.parametrize("extra", [
    ["finetune.method=full"],
    ["finetune.method=lora", "fsdp.shard_frozen=false"],  # B2: a whole frozen base, ignored by FSDP, on the GPU
    ["finetune.method=lora"],
    QLORA,                                                # the 1-rank quantized base on the GPU, adapters on the host
    [*CLS, "finetune.method=full"],                       # B4: BERT's position_ids / token_type_ids on the GPU
], ids=["full", "lora-whole-base", "lora-auto", "qlora", "bert-seq-cls"])
def test_cpu_offload_trains_on_one_gpu(tmp_path, extra):
    """fsdp.cpu_offload: FSDP's shards in host memory, buffers and ignored weights on the GPU, 3 steps."""
    out = train_on_gpu(tmp_path / "run", *extra, "fsdp.cpu_offload=true", "train.max_steps=3")
    setup = setup_row(out)
    assert setup["device"] == "cuda:0" and setup["placement_checked"] > 0
    steps = losses(out)
    assert sorted(steps) == [1, 2, 3] and all(v == v and 0 < v < 100 for v in steps.values()), steps


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_two_rank_quantized_shards_stay_where_fsdp_wants_them(quant):
    """B3, on one GPU: rank 0 of a 2-rank set-up (torch's fake process group: nothing is communicated) quantizes on
    the GPU and keeps its shard of the base on the CPU under fsdp.cpu_offload (DTensor.from_local moved it to the
    GPU, which FSDP2's lazy init refuses: "FSDP parameters should be materialized on CPU"), on the GPU without."""
    from torch.distributed.tensor import DTensor

    from fsdp_ft.config import load_config
    from fsdp_ft.model import placement
    from fsdp_ft.model.build import load_tokenizer, resolve_model_dir
    from fsdp_ft.model.materialize import materialize
    from fsdp_ft.parallel import fsdp
    from fsdp_ft.planner import memsim
    from fsdp_ft.quant import quantize
    from fsdp_ft.runtime import distributed
    from fsdp_ft.training.run_setup import build_meta

    device = torch.device("cuda", torch.cuda.current_device())
    for offload in (True, False):
        drop_leftover_process_group()
        with memsim.fake_world(2):
            cfg = load_config(TINY, ["output_dir=/tmp/unused", "fsdp.mixed_precision=fp32", *QLORA_2RANKS,
                                     f"finetune.quant.type={quant}", f"fsdp.cpu_offload={str(offload).lower()}"])
            model_dir = resolve_model_dir(cfg)
            env = distributed.DistEnv(rank=0, world_size=2, local_rank=0, device=device, backend="fake")
            model, _ = build_meta(cfg, env, model_dir, load_tokenizer(cfg, model_dir), None)
            fsdp.parallelize(model, cfg, distributed.build_mesh(env, 1))
            materialize(model, None, 0, device, offload=offload)
            bases = [p for p in model.parameters() if quantize.is_quantized(p)]
            assert bases and all(isinstance(p, DTensor) for p in bases)
            assert {p.device.type for p in bases} == {"cpu" if offload else "cuda"}
            assert placement.check(model, device, offload) > 0
            state = model._get_fsdp_state()
            if hasattr(state, "_lazy_init"):  # FSDP2's own checks (private API: skipped where it moved)
                state._lazy_init()


# ------------------------------------------------ the step's speed and a GPU user's precision (B7, B8, B10, B12)

def _torch_at_least(major: int, minor: int) -> bool:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (major, minor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_loss_on_cuda_equals_the_plain_logits(dtype):
    """B7: on CUDA the head's weight gradient is summed over the chunks in fp32 inside cuBLAS (addmm with
    out_dtype, torch >= 2.10), and the chunk scales with the card. Loss and gradients are the plain path's
    (logits, then cross-entropy): in IEEE fp32 to rounding; in bf16 no further from an fp64 reference than the
    plain bf16 path is."""
    import torch.nn.functional as F

    from fsdp_ft.runtime import tf32
    from fsdp_ft.tasks import head_loss

    tf32_was = tf32.enabled()
    tf32.set_tf32(False)  # in-process training runs of other tests switched TF32 on
    try:
        torch.manual_seed(0)
        n, hidden, vocab = 700, 256, 3000
        h = torch.randn(n, hidden, device="cuda")
        w, b = torch.randn(vocab, hidden, device="cuda") * 0.05, torch.randn(vocab, device="cuda") * 0.1
        y = torch.randint(0, vocab, (n,), device="cuda")

        def grads(loss_fn, to):
            leaves = [t.to(to, copy=True).requires_grad_() for t in (h, w, b)]
            loss = loss_fn(*leaves)
            loss.backward()
            return loss.double(), [t.grad.double() for t in leaves]

        plain = lambda hh, ww, bb: F.cross_entropy(F.linear(hh, ww, bb).float(), y, reduction="sum")  # noqa: E731
        ref_loss, ref = grads(plain, torch.float64)
        plain_loss, want = grads(plain, dtype)
        chunked_loss, got = grads(lambda hh, ww, bb: head_loss.linear_cross_entropy(hh, ww, bb, y, chunk=128), dtype)
        err = lambda a, r: ((a - r).norm() / r.norm()).item()  # noqa: E731
        if dtype == torch.float32:
            assert chunked_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
            assert all(err(g, p) < 1e-5 for g, p in zip(got, want)), [err(g, p) for g, p in zip(got, want)]
        else:
            assert chunked_loss.item() == pytest.approx(ref_loss.item(), rel=4e-3)
            for g, p, r in zip(got, want, ref):
                assert err(g, r) <= 1.5 * err(p, r) + 1e-4, (err(g, r), err(p, r))
        for low in (torch.bfloat16, torch.float16):
            way = head_loss._accumulator(h.device, low)
            assert way == "addmm" if _torch_at_least(2, 10) else way in ("mm", "cast"), (low, way, torch.__version__)
        total = torch.cuda.get_device_properties(h.device).total_memory
        assert head_loss.chunk_elements(h.device) == head_loss.cuda_chunk_elements(total) >= 1 << 26
        if total >= 79 * 2 ** 30:  # an 80 GB card or larger: a chunk per 2k+ tokens at a 128k vocabulary
            assert head_loss.chunk_elements(h.device) // 128256 >= 2048
        default = head_loss.linear_cross_entropy(h.to(dtype), w.to(dtype), b.to(dtype), y)  # the card's chunk
        assert default.item() == pytest.approx(plain_loss.item(), rel=1e-5 if dtype == torch.float32 else 4e-3)
    finally:
        tf32.set_tf32(tf32_was)


def test_unpadded_causal_lm_batches_take_the_flash_kernel():
    """B8: a batch with no padding reaches SDPA without a mask, so training's own forward and backward run on the
    flash kernel (forced: it raises if it cannot take the call) with native GQA; a padded batch carries its mask
    and cannot. The batch's empty no-padding marker pins and moves as StepBatches moves every batch."""
    import types

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdp_ft.config import Config
    from fsdp_ft.tasks.causal_lm import UNPADDED, CausalLMTask

    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").cuda().bfloat16()
    task = CausalLMTask(Config(), types.SimpleNamespace(pad_token_id=0))
    ids = [torch.randint(4, config.vocab_size, (128,)).tolist() for _ in range(2)]
    rows = [{"input_ids": i, "labels": i, "attention_mask": [1] * len(i)} for i in ids]
    host = task.collate(rows)
    assert UNPADDED in host
    batch = {k: v.pin_memory().to("cuda", non_blocking=True) for k, v in host.items()}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sums = task.loss_sums(model, batch)
        sums["loss"].backward()
    assert torch.isfinite(sums["loss"]) and model.lm_head.weight.grad is not None
    padded = task.collate([rows[0], {k: v[:100] for k, v in rows[1].items()}])
    assert UNPADDED not in padded
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError):
        task.loss_sums(model, {k: v.cuda() for k, v in padded.items()})


def test_tf32_switches_cublas_and_leaves_legacy_reads_working():
    """B10: train.tf32 on a CUDA rank really moves cuBLAS's fp32 matmuls to TF32 (and back), while the legacy
    reads inductor's max-autotune and flex attention make keep working (they raised after the per-backend
    switch; tests/test_tf32.py checks the reads without a GPU)."""
    from fsdp_ft.runtime import tf32

    was = tf32.enabled()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    exact = (a.double() @ b.double()).float()
    try:
        assert tf32.apply(True, device) is True
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.get_float32_matmul_precision() == "high"
        tf32_err = ((a @ b) - exact).abs().max().item()
        assert tf32.apply(False, device) is False
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.get_float32_matmul_precision() == "highest"
        ieee_err = ((a @ b) - exact).abs().max().item()
        assert tf32_err > 10 * ieee_err, (tf32_err, ieee_err)  # 10-bit vs 23-bit mantissas
    finally:
        tf32.set_tf32(was)


def test_auto_precision_is_recorded_as_what_the_gpu_ran(tmp_path):
    """fsdp.mixed_precision=auto on a GPU trains in bf16 where the card computes bf16 natively, and config.yaml,
    the run's fingerprint and the MFU peak say so (needs engine.train to resolve it before open_run)."""
    import json

    import yaml

    from fsdp_ft.runtime import precision

    out = train_on_gpu(tmp_path / "auto", "fsdp.mixed_precision=auto", "train.max_steps=2")
    want = "bf16" if precision.bf16_native("cuda") else "fp32"
    assert yaml.safe_load((out / "config.yaml").read_text())["fsdp"]["mixed_precision"] == want
    assert json.loads((out / "run.json").read_text())["fingerprint"]["fsdp.mixed_precision"] == want
    assert want in setup_row(out)["peak_flops_source"]


def test_eval_on_the_gpu_loads_the_runs_dtype_onto_the_device(tmp_path, capsys):
    """B12: `fsdp-ft eval` of a bf16 run on the GPU loads the weights straight onto the GPU in bf16 and gives the
    loss of the run's own eval row (bf16 on both sides; GPU kernels may sum in another order)."""
    import json

    from fsdp_ft.cli import main
    from fsdp_ft.inference.loading import load_model
    from fsdp_ft.runtime import tf32

    out = train_on_gpu(tmp_path / "bf16", "fsdp.mixed_precision=bf16", "train.max_steps=4")
    was = tf32.enabled()
    try:
        param = next(load_model(str(out)).model.parameters())
        assert param.device.type == "cuda" and param.dtype == torch.bfloat16 and tf32.enabled()
        want = [r for r in read_metrics(out) if r.get("split") == "eval"][-1]["loss"]
        code = main(["eval", str(out), "--data", str(ASSETS / "data" / "tiny_text_eval.jsonl"), "--max-samples", "16"])
        assert code == 0
        assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(want, rel=1e-4)
    finally:
        tf32.set_tf32(was)


def test_big_model_inference_spreads_over_the_gpu_and_the_cpu(tmp_path):
    """`--max-memory 0=...` below the model's size: the first blocks on cuda:0, the rest on the CPU (run on
    cuda:0 by accelerate's hooks); greedy text equals the plain HF model on the GPU in the dtype the command picks
    (auto: bf16 on a bf16 GPU), and an fp32 eval equals HF's loss on the CPU."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fsdp_ft.runtime import tf32
    from test_big_model_inference import PROMPTS, _greedy, _placement, hf_loss

    torch.manual_seed(3)
    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    config.update({"initializer_range": 0.2})
    folder = tmp_path / "lm"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSETS / "tiny-llama").save_pretrained(folder)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())

    def cap(dtype) -> str:  # 80% of the weights in the compute dtype: the embedding + 2 blocks on cuda:0
        return f"0={int(params * torch.finfo(dtype).bits // 8 * 0.8)}"

    proc = cli("generate", str(folder), "--prompt", PROMPTS[0], "--greedy", "--max-new-tokens", "10",
               "--max-memory", cap(dtype))
    line = _placement(proc.stderr)
    assert "on cuda:0" in line and "on cpu" in line and "disk" not in line, line
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda").eval()
    was = tf32.enabled()
    try:  # as the command runs (train.tf32 defaults on): the rotary angles are an fp32 matmul
        tf32.apply(True, torch.device("cuda"))
        assert proc.stdout == _greedy(ref, AutoTokenizer.from_pretrained(folder), PROMPTS[0], 10) + "\n"
    finally:
        tf32.set_tf32(was)

    rows = [json.loads(x) for x in (ASSETS / "data" / "tiny_text_eval.jsonl").read_text().splitlines()][:6]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli("eval", str(folder), "--data", str(data), "--max-memory", cap(torch.float32), FP32, "train.tf32=false")
    assert "on cpu" in _placement(proc.stderr)
    assert json.loads(proc.stdout)["loss"] == pytest.approx(hf_loss(folder, rows), rel=1e-5)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_moe_qlora_on_one_gpu_equals_the_cpu(tmp_path, model_type):
    """QLoRA's 4-bit expert stacks (fsdp_ft/quant/experts.py) on a GPU: each routed expert's view of the codes and
    scales, the frozen matmul (`x @ W_e` for gpt-oss's [experts, in, out] stacks) and the lent LoRA factors give
    the CPU's losses in fp32. (bf16 is left to the qlora-7b target: the gpu-tests part of gpu_check.sh is near
    its time cap.)"""
    from test_moe import save_tiny_moe

    path = save_tiny_moe(tmp_path / model_type, model_type)
    stacks = [] if model_type == "mixtral" else [
        "finetune.lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"]
    extra = [*QLORA, f"model.path={path}", "model.random_init=false", "train.max_steps=3", *stacks]
    gpu = train_on_gpu(tmp_path / "gpu", *extra, "fsdp.mixed_precision=fp32", "train.tf32=false")
    cpu = train_on_cpu(tmp_path / "cpu", *extra, "fsdp.mixed_precision=fp32")
    assert_losses_close(losses(gpu), losses(cpu), DEVICE_RTOL)
    assert setup_row(gpu)["placement_checked"] == setup_row(cpu)["placement_checked"] > 0
