"""Model FLOPs of one training step, and the peak FLOP/s of the device, for MFU.

What counts (the convention of PaLM's MFU, made exact for partial training):

- Matmuls only. Every matmul with a weight (``F.linear``, GPT-2's ``Conv1D``) costs ``2 * in * out`` FLOPs per token
  forward; in backward, ``2 * in * out`` more for the gradient of its input when that input requires grad (some
  trainable parameter lies upstream of it), and ``2 * in * out`` more for the gradient of its weight only when the
  weight trains. Under LoRA the frozen base matmuls therefore cost forward plus (mostly) the input gradient, and
  weight gradients are paid only for the adapter matrices.
- Attention scores and values: ``2 * d`` FLOPs per (query, key) pair for ``Q K^T`` plus ``2 * d_v`` for ``P V``
  (d = head dim, times the query heads), and twice that in backward when q, k or v require grad. For causal
  attention only the pairs a query may see are counted — ``L (L + 1) / 2`` per sequence of L tokens, not ``L^2``:
  the masked half is not useful work, even where a kernel computes it.
- Mixture-of-experts layers: the top-k experts each token is routed to, as if every token ran its k experts'
  matmuls (``k * 2 * in * out`` per expert weight), plus the router's matmul; see flops_moe.py for how and why.
- Not counted: embeddings lookups, norms, activations, softmax, rotary, residual adds, the loss (all elementwise),
  recomputation by activation checkpointing, and padding (MFU counts the real tokens of each step).

Which inputs require grad is not guessed from layer order: the model's own forward is traced once on fake tensors
(no memory, no compute) under a `TorchFunctionMode` that records every matmul's shapes and requires-grad flags.
"""
from __future__ import annotations

import math
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from fsdp_ft.observability.flops_moe import experts_traced_densely, peft_params_folded
from fsdp_ft.runtime.tf32 import enabled as tf32_enabled
from fsdp_ft.runtime import user_cache


@dataclass
class FlopCounts:
    """Training FLOPs of one sequence of L real tokens = per_token * L + per_sequence + per_pair * pairs(L)
    (+ per_call once per forward: a micro-batch of one sequence pays it once)."""
    forward_per_token: float = 0.0
    input_grad_per_token: float = 0.0
    weight_grad_per_token: float = 0.0
    per_sequence: float = 0.0          # matmuls applied once per sequence (a pooler or classifier on one token)
    per_call: float = 0.0              # matmuls run once per forward whatever its size (peft's LoRA fold of experts)
    attention_forward_per_pair: float = 0.0
    attention_backward_per_pair: float = 0.0
    causal: bool = True
    attention_layers: int = 0

    @property
    def per_token(self) -> float:
        return self.forward_per_token + self.input_grad_per_token + self.weight_grad_per_token

    @property
    def per_pair(self) -> float:
        return self.attention_forward_per_pair + self.attention_backward_per_pair

    def pairs(self, length: int, count_masked: bool = False) -> float:
        """(query, key) pairs of one sequence: L (L+1)/2 under a causal mask, L^2 otherwise (or if count_masked)."""
        return length * length if (count_masked or not self.causal) else length * (length + 1) / 2

    def for_sequence(self, length: int, count_masked: bool = False) -> float:
        """Training FLOPs (forward + backward) of one sequence of `length` real tokens, forwarded on its own."""
        return (self.per_token * length + self.per_sequence + self.per_call
                + self.per_pair * self.pairs(length, count_masked))

    def per_token_at(self, seq_len: int) -> float:
        return self.for_sequence(seq_len) / seq_len

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- tracing the model's matmuls

class _MatmulRecorder(TorchFunctionMode):
    """Records (tokens, in, out, input needs grad, weight trains) of every weight matmul, and every attention call."""

    def __init__(self):
        super().__init__()
        self.linears: list[tuple[int, int, int, bool, bool, int]] = []
        self.attention: list[tuple[int, int, int, int, int, bool, bool]] = []
        self.per_call: list[tuple[float, int]] = []  # (forward FLOPs, operands needing a gradient)
        self._materialising = False

    @contextmanager
    def materialising(self):
        """Matmuls run inside are once-per-call work that builds a weight (peft's fold of LoRA into 3-D experts)."""
        before, self._materialising = self._materialising, True
        try:
            yield
        finally:
            self._materialising = before

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._materialising:
            self._weight_matmul(func, args, kwargs)
        elif func is F.linear:
            x = args[0] if args else kwargs["input"]  # peft's trainable tokens call F.linear(input=, weight=)
            w = args[1] if len(args) > 1 else kwargs["weight"]
            self._linear(x, w.shape[1], w.shape[0], w.requires_grad)
        elif func is torch.addmm and len(args) >= 3 and isinstance(args[2], nn.Parameter):  # GPT-2 Conv1D
            self._linear(args[1], args[2].shape[0], args[2].shape[1], args[2].requires_grad)
        elif getattr(func, "_qualified_op_name", None) == FROZEN_MATMUL_OP:  # a quantized expert's rows
            rows, cols, transposed = args[2][0], args[2][1], args[5]
            self._linear(args[0], *((rows, cols) if transposed else (cols, rows)), False)
        elif func is F.scaled_dot_product_attention:
            self._sdpa(*args, **kwargs)
        elif func in _MATMULS and len(args) == 2 and all(_is_activation(a) for a in args):
            self._eager_attention(*args)
        return func(*args, **kwargs)

    def _weight_matmul(self, func, args, kwargs) -> None:
        """A product of two tensors computed while building a weight: 2 x (size of every index) forward, and the
        same again for each operand that needs a gradient."""
        if func is torch.einsum and isinstance(args[0], str):
            operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            if len(operands) != 2:
                return
            sizes = {}
            for letters, t in zip(args[0].split("->")[0].replace(" ", "").split(","), operands):
                sizes.update(zip(letters, t.shape))
            flops = 2.0 * math.prod(sizes.values())
        elif func in _WEIGHT_PRODUCTS:
            a, b = (args[1], args[2]) if func in (torch.baddbmm, torch.Tensor.baddbmm, torch.addbmm) else args[:2]
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 2 and b.dim() >= 2):
                return
            operands = (a, b)
            flops = 2.0 * a.numel() * b.shape[-1]
        else:
            return
        self.per_call.append((flops, sum(bool(t.requires_grad) for t in operands)))

    def _linear(self, x, n_in: int, n_out: int, weight_trains: bool) -> None:
        positions = x.shape[-2] if x.dim() >= 3 else 0  # (batch, positions, features) for per-token matmuls
        self.linears.append((x.numel() // n_in, n_in, n_out, x.requires_grad, weight_trains, positions))

    def _eager_attention(self, a, b):
        """`Q K^T` or `P V` written as a batched matmul between two activations (eager attention)."""
        heads = a.numel() // (a.shape[-2] * a.shape[-1])
        needs_grad = a.requires_grad or b.requires_grad
        # as one SDPA call split in halves: Q K^T has d = a.shape[-1]; P V has d_v = b.shape[-1]
        if b.shape[-1] == a.shape[-2]:  # (L, d) @ (d, L): scores
            self.attention.append((heads, a.shape[-2], b.shape[-1], a.shape[-1], 0, None, needs_grad))
        else:  # (L, L) @ (L, d_v): values
            self.attention.append((heads, a.shape[-2], a.shape[-1], 0, b.shape[-1], None, needs_grad))

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *args, **kwargs):
        heads = q.numel() // (q.shape[-2] * q.shape[-1])  # batch x query heads
        needs_grad = q.requires_grad or k.requires_grad or v.requires_grad
        self.attention.append((heads, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], bool(is_causal),
                               needs_grad))


# fsdp_ft.quant.frozen_matmul's op (x, parts, [rows, cols, ...], format, dtype, transposed), which QLoRA's expert
# stacks call directly (a higher layer: known by name); every other quantized weight reaches it through F.linear
FROZEN_MATMUL_OP = "fsdp_ft::frozen_linear"
_MATMULS = (torch.matmul, torch.bmm, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.bmm)
_WEIGHT_PRODUCTS = _MATMULS + (torch.baddbmm, torch.Tensor.baddbmm, torch.addbmm)


def _is_activation(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.dim() >= 3


def _module_says_causal(model: nn.Module) -> bool:
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def _forward(model: nn.Module, ids: torch.Tensor):
    try:
        return model(input_ids=ids, use_cache=False)
    except TypeError:  # models whose forward takes no use_cache
        return model(input_ids=ids)


TRACE_LEN = 37  # odd, so that no head dim equals it: tells scores (L x d @ d x L) from values (L x L @ L x d)


def count_flops(model: nn.Module, trace_len: int = TRACE_LEN) -> FlopCounts:
    """FLOPs of training `model` as it stands (which parameters require grad decides the backward terms).

    Pass the model before sharding: on the meta device or real, plain or wrapped by peft. It runs one forward on
    fake tensors of one sequence of `trace_len` tokens; nothing is allocated or computed. The counts per token and
    per (query, key) pair do not depend on the length traced.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    # on the weights' device: torch 2.11's fake mode refuses an op mixing meta weights and a CPU input
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.arange(trace_len, device=device).remainder(vocab).unsqueeze(0)
    rec = _MatmulRecorder()
    was_training = model.training
    model.train()
    try:
        with (experts_traced_densely(model, rec), peft_params_folded(model, rec),
              FakeTensorMode(allow_non_fake_inputs=True), torch.enable_grad(), rec):
            _forward(model, ids)
    finally:
        model.train(was_training)
    return _summarise(rec, trace_len, _module_says_causal(model))


def _summarise(rec: _MatmulRecorder, seq_len: int, module_causal: bool) -> FlopCounts:
    c = FlopCounts()
    c.per_call = sum((flops * (1 + grads) for flops, grads in rec.per_call), 0.0)
    for tokens, n_in, n_out, input_grad, weight_grad, positions in rec.linears:
        flops = 2.0 * n_in * n_out
        # per token: rows are whole sequences (GPT-2's Conv1D flattens them), or the positions axis is at least
        # the sequence (prompt tuning adds virtual positions: more work per real token)
        if tokens % seq_len == 0 or positions >= seq_len:
            scale = tokens / seq_len
            c.forward_per_token += flops * scale
            c.input_grad_per_token += flops * scale * input_grad
            c.weight_grad_per_token += flops * scale * weight_grad
        else:  # once per sequence or call: a pooler or a head on one position, DoRA's weight norms
            c.per_sequence += flops * tokens * (1 + input_grad + weight_grad)
    # HF passes SDPA an explicit mask instead of is_causal in many set-ups; its attention modules say is_causal
    c.causal = module_causal or any(causal for *_, causal, _ in rec.attention)
    layers = 0
    for heads, n_q, n_k, d, d_v, causal, needs_grad in rec.attention:
        if n_q < seq_len:
            continue
        share = (n_q * n_k) / c.pairs(seq_len, count_masked=True)  # virtual tokens widen the key side
        forward = 2.0 * (d + d_v) * heads * share
        c.attention_forward_per_pair += forward
        c.attention_backward_per_pair += 2 * forward * needs_grad
        layers += 1 if d else 0
    c.attention_layers = layers
    return c


def train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward, no recomputation) per token for sequences of `seq_len` tokens."""
    return count_flops(model).per_token_at(seq_len)


# ---------------------------------------------------------------- peak FLOP/s of the device

# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, FLOP/s per GPU.
# (name fragments, bf16/fp16 peak, tf32 peak, fp32 peak); the first matching row wins.
GPU_PEAKS = [
    (("h100", "nvl"), 835e12, 418e12, 60e12),
    (("h100", "pcie"), 756e12, 378e12, 51e12),
    (("h100",), 989e12, 495e12, 67e12),         # SXM5 (the name says "80GB HBM3")
    (("h200", "nvl"), 835e12, 418e12, 60e12),
    (("h200",), 989e12, 495e12, 67e12),
    (("gh200",), 989e12, 495e12, 67e12),
    (("b200",), 2250e12, 1125e12, 80e12),
    (("a100",), 312e12, 156e12, 19.5e12),
    (("a800",), 312e12, 156e12, 19.5e12),
    (("l40s",), 362e12, 183e12, 91.6e12),
    (("l40",), 181e12, 90.5e12, 90.5e12),
    (("l4",), 121e12, 60e12, 30e12),
    (("a10g",), 70e12, 35e12, 31.2e12),
    (("a10",), 125e12, 62.5e12, 31.2e12),
    (("rtx 4090",), 165e12, 82.6e12, 82.6e12),
    (("rtx 3090",), 71e12, 35.6e12, 35.6e12),
    (("v100",), 125e12, 15.7e12, 15.7e12),      # fp16 tensor cores; no bf16
    (("t4",), 65e12, 8.1e12, 8.1e12),
]


def gpu_table_peak(name: str, dtype: torch.dtype, tf32: bool) -> float | None:
    lname = name.lower()
    for fragments, half, tf32_peak, fp32 in GPU_PEAKS:
        if all(f in lname for f in fragments):
            if dtype in (torch.bfloat16, torch.float16):
                return half
            return tf32_peak if tf32 else fp32
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> tuple[float, int]:
    """Best FLOP/s of a square matmul in `dtype` on `device`, the size grown until one product takes >= 50 ms.

    The best of many repeats, not the mean: other processes on the machine only ever make a product slower.
    """
    def best_rate(n: int) -> tuple[float, float]:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.matmul(a, b)  # warm-up
        best, spent, reps = 0.0, 0.0, 0
        while spent < seconds or reps < 3:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            torch.matmul(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            spent, reps = spent + dt, reps + 1
            best = max(best, 2.0 * n ** 3 / dt)
        return best, 2.0 * n ** 3 / best

    n = 256
    while True:
        best, fastest = best_rate(n)
        if fastest >= 0.05 or n >= 4096:
            return best, n
        n *= 2


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> tuple[float, str]:
    """Peak dense FLOP/s of one rank's device in the compute dtype, and where the number comes from.

    CUDA: the data-sheet peak of the GPU model (TF32 for fp32 when TF32 matmuls are on), else measured. CPU (and
    unknown GPUs): measured once with a large matmul in `dtype` using this process's threads, cached on disk.
    """
    device = torch.device(device)
    name = dtype_name(dtype)
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        tf32 = tf32_enabled()
        table = gpu_table_peak(gpu, dtype, tf32)
        if table is not None:
            kind = "tf32" if dtype == torch.float32 and tf32 else name
            return table, f"data sheet: {gpu}, dense {kind}"
        key = f"cuda|{gpu}|{name}"
    else:
        key = f"cpu|{_cpu_name()}|{name}|{torch.get_num_threads()} threads|torch {torch.__version__}"
    path = user_cache.cache_dir() / "peak_flops.json"
    cached = _MEASURED
    if key not in cached:
        cached.update(user_cache.read(path))
    if key not in cached:
        flops, n = measure_matmul_flops(device, dtype)
        cached.update(user_cache.merge(path, key, {"flops": flops, "matmul": n,
                                               "measured_at": time.strftime("%Y-%m-%d")}))
    hit = cached[key]
    return hit["flops"], f"measured: {hit['matmul']}x{hit['matmul']} {name} matmul ({key}), cached in {path}"


_MEASURED: dict[str, dict] = {}  # this process's view of the cache (read-only home: measured once per process)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def mfu(flops_per_s: float, peak_per_rank: float, world_size: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all ranks together."""
    return flops_per_s / (peak_per_rank * world_size) if peak_per_rank > 0 else 0.0


def batch_flops(counts: FlopCounts, batch: dict) -> torch.Tensor:
    """Model FLOPs of training on one micro-batch, from its real tokens only (a tensor: no host sync).

    Causal attention pairs are counted per token as its position + 1 (the keys it may see), which is right for
    padded rows and for packed rows alike (`position_ids` restart at each packed sample). `per_call` is paid once:
    the micro-batch is one forward.
    """
    mask = batch["attention_mask"]
    tokens = mask.sum()
    if counts.causal:
        pos = batch.get("position_ids")
        if pos is None:
            pos = mask.cumsum(-1) - 1
        pairs = ((pos + 1) * mask).sum()
        sequences = ((pos == 0) & (mask > 0)).sum()
    else:
        lengths = mask.sum(-1)
        pairs = (lengths * lengths).sum()
        sequences = (lengths > 0).sum()
    return (tokens.double() * counts.per_token + sequences.double() * counts.per_sequence
            + pairs.double() * counts.per_pair + counts.per_call)
