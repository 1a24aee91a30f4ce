"""The LM head and its cross-entropy, a chunk of tokens at a time, on only the tokens that carry loss.

A causal LM's logits (tokens x vocabulary, upcast to fp32 for the loss) are the largest activations of a
fine-tuning step: 100 MB per 512-token row at SmolLM2's 49k vocabulary, 1 GB per 2048-token row at Llama-3's
128k, held with their log-softmax until backward. Here the head's matmul and the loss run one chunk of tokens at
a time, and each chunk's gradients for the hidden states (and for the head's weight, when it trains) are made
in the same pass, since the loss is the graph's end. Nothing of vocabulary size outlives its chunk, and the FLOPs
are the plain path's (nothing is recomputed) less the head's work on positions without a label (SFT prompts).

It runs inside the model's own forward, in place of the head module's forward, so FSDP (or any hook on the
head) sees a normal call with the weights gathered. Only heads that are a plain `nn.Linear` whose output the
model returns untouched qualify (`supported`); anything else keeps the plain path.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
# model types whose causal-LM forward returns `lm_head(hidden)` as the logits, with no scaling or soft-capping
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "gpt2"}
# fp32 logits elements per chunk: big enough for efficient matmuls, small beside the model's own activations
# (CPU: a 512-token row at a 64k vocabulary is one chunk, so its head gradients need no fp32 sum). CUDA devices
# scale with their memory (`cuda_chunk_elements`); an entry "cuda" here overrides that.
CHUNK_ELEMENTS = {"cpu": 1 << 25}
# device bytes per chunk element on CUDA: a chunk's transients (logits and their gradient in the compute dtype,
# fp32 log-probabilities) take ~8 bytes an element, so chunks get 1/32 of the card: 2**28 elements on an 80 GB
# card, i.e. one chunk per 2k tokens at Llama-3's 128k vocabulary
CUDA_BYTES_PER_ELEMENT = 256
_cuda_chunks: dict[int, int] = {}
_accumulators: dict[tuple[torch.device, torch.dtype], str] = {}


def supported(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return type(head) is nn.Linear and model_type in PLAIN_HEAD_MODELS


def cuda_chunk_elements(total_memory: int) -> int:
    """Chunk elements for a CUDA device of `total_memory` bytes: the power of two at or below
    total / CUDA_BYTES_PER_ELEMENT, within [2**26, 2**29]. The card's total, not its free memory: free memory moves
    with the caching allocator and the optimizer state that appears after the first step, and the chunk should
    not change from run to run."""
    n = max(total_memory // CUDA_BYTES_PER_ELEMENT, 1)
    return min(max(1 << (n.bit_length() - 1), 1 << 26), 1 << 29)


def chunk_elements(device: torch.device) -> int:
    """Logits elements per chunk on `device`."""
    if device.type in CHUNK_ELEMENTS:
        return CHUNK_ELEMENTS[device.type]
    if device.type != "cuda":
        return 1 << 24
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cuda_chunks:
        _cuda_chunks[index] = cuda_chunk_elements(torch.cuda.get_device_properties(index).total_memory)
    return _cuda_chunks[index]


def _accumulator(device: torch.device, dtype: torch.dtype) -> str:
    """How to add a product of `dtype` (bf16, fp16) matrices into an fp32 sum on `device`, tried once per device
    and dtype (a few-element product, compared exactly: a kernel that ignored the sum would be caught):
    "addmm": cuBLAS accumulates into the fp32 sum itself (addmm with out_dtype: the sum is read and written once,
    no product tensor; needs torch >= 2.10, where an fp32 `self` is allowed);
    "mm": an fp32 product (mm with out_dtype, torch >= 2.8) added to the sum;
    "cast": the product in the compute dtype, widened and added (the CPU path: out_dtype is CUDA-only)."""
    if device.type != "cuda":
        return "cast"
    key = (device, dtype)
    if key not in _accumulators:
        _accumulators[key] = "cast"
        a = torch.arange(12, device=device).remainder(5).reshape(4, 3).to(dtype)  # small integers: exact in
        b = torch.arange(8, device=device).remainder(3).reshape(4, 2).to(dtype)   # every dtype here
        want = torch.ones(3, 2, device=device) + a.t().float() @ b.float()
        for way in ("addmm", "mm"):
            try:
                acc = torch.ones(3, 2, device=device)
                _accumulate(acc, a.t(), b, way)
                if torch.equal(acc, want):
                    _accumulators[key] = way
                    break
            except (RuntimeError, TypeError, ValueError):  # no such overload, or this dtype mix refused, here
                continue
    return _accumulators[key]


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, way: str) -> None:
    """acc (fp32) += a @ b (a, b in a lower precision)."""
    if way == "addmm":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif way == "mm":
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.add_((a @ b).float())


def _chunked(hidden, weight, bias, labels, chunk, need_h, need_w, need_b):
    """The summed loss, and the gradients asked for (of the summed loss), a chunk of rows at a time.

    With one chunk the head's gradients are single products in the compute dtype, as in the plain path; with
    several, the weight's and bias's are summed over the chunks in fp32."""
    single = hidden.shape[0] <= chunk
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w and not single else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        logits = F.linear(h, weight, bias)
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # the upcast fused into the kernel
        loss -= logp.gather(1, y.unsqueeze(1)).sum()
        if not (need_h or need_w or need_b):
            continue
        grad_logits = logp.exp_()  # softmax, in place of the log-probabilities no longer needed
        grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
        grad_logits = grad_logits.to(logits.dtype)
        if need_h:
            grad_h[start:start + chunk] = grad_logits @ weight
        if need_w and single:
            grad_w = grad_logits.t() @ h
        elif need_w and h.dtype == torch.float32:
            grad_w.addmm_(grad_logits.t(), h)
        elif need_w:  # low-precision products, summed over the chunks in fp32 (inside the GEMM on CUDA)
            _accumulate(grad_w, grad_logits.t(), h, _accumulator(h.device, h.dtype))
        if need_b:
            grad_b.add_(grad_logits.float().sum(0))
    return loss, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T + bias, labels), its gradients made during forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk):
        loss, *grads = _chunked(hidden, weight, bias, labels, chunk, *ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_loss.float()
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else (grad_w * scale).to(w_dtype),
                None if grad_b is None else (grad_b * scale).to(b_dtype), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T + bias` (one row per token) against labels (no IGNORE)."""
    if chunk is None:
        chunk = max(1, chunk_elements(hidden.device) // weight.shape[0])
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk)
    return _chunked(hidden, weight, bias, labels, chunk, False, False, False)[0]


def loss_positions(shift_labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into batch x seq) of the tokens that carry loss; the collator makes them on the host, so
    selecting them on the device needs no sync."""
    return (shift_labels.reshape(-1) != IGNORE).nonzero().squeeze(1)


@contextlib.contextmanager
def head_loss(model: nn.Module, shift_labels: torch.Tensor, positions: torch.Tensor):
    """While active, the model's head computes the summed next-token loss of `shift_labels` (batch x seq, IGNORE
    where no loss) at `positions` (see loss_positions) into `result["loss"]` and returns empty logits."""
    head = model.get_output_embeddings()
    result: dict[str, torch.Tensor] = {}

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden[:, -shift_labels.shape[1]:]  # prompt tuning prepends virtual-token positions
        flat_h = hidden.reshape(-1, hidden.shape[-1])[positions]
        result["loss"] = linear_cross_entropy(flat_h, head.weight, head.bias, shift_labels.reshape(-1)[positions])
        return hidden[..., :0].clone()  # empty, still on the graph; a clone, since FSDP warns of returned views

    head.forward = forward
    try:
        yield result
    finally:
        del head.forward  # back to the class's forward
