"""The chunked LM-head loss gives the plain path's loss and gradients (HF logits + F.cross_entropy)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import ASSETS, FAST, TINY, losses
from fsdp_ft.config import Config
from fsdp_ft.tasks import head_loss
from fsdp_ft.tasks.causal_lm import IGNORE, CausalLMTask, shift


def _model(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(ASSETS / name)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype)


def _batch(vocab: int, masked: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    labels = ids.clone()
    if masked:  # a prompt without loss and a padded tail, as SFT batches have
        labels[0, :9] = IGNORE
        labels[1, 17:] = IGNORE
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _plain(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), shift(batch["labels"]).flatten(), ignore_index=IGNORE,
                           reduction="sum")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-tied", "tiny-gpt2"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rows_per_chunk", [5, None])
def test_chunked_head_loss_equals_plain_loss_and_gradients(name, masked, rows_per_chunk):
    model = _model(name)
    assert head_loss.supported(model)
    batch = _batch(model.config.vocab_size, masked)
    _plain(model, batch).backward()
    want_loss = _plain(model, batch).item()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    task = CausalLMTask(Config(), tokenizer=None)
    labels = shift(batch["labels"])
    positions = head_loss.loss_positions(labels)
    assert len(positions) == int((labels != IGNORE).sum())
    saved = head_loss.CHUNK_ELEMENTS["cpu"]
    if rows_per_chunk:  # 5-token chunks: several chunks, and a short last one; else all rows in one chunk
        head_loss.CHUNK_ELEMENTS["cpu"] = rows_per_chunk * model.config.vocab_size
    assert (len(positions) > 5) and (rows_per_chunk or len(positions) * model.config.vocab_size <= saved)
    try:
        with head_loss.head_loss(model, labels, positions) as result:
            out = task._forward(model, batch)
    finally:
        head_loss.CHUNK_ELEMENTS["cpu"] = saved
    assert out.logits.shape[-1] == 0  # the full logits were never made
    result["loss"].backward()
    assert result["loss"].item() == pytest.approx(want_loss, rel=1e-6)
    got = _grads(model)
    assert sorted(got) == sorted(want)
    for n in want:
        err = ((got[n] - want[n]).norm() / want[n].norm()).item()
        assert err < 1e-5, (n, err)


@pytest.mark.parametrize("head_trains", [False, True])
def test_bf16_matches_plain_and_a_frozen_head_gets_no_gradient(head_trains):
    """A frozen head (LoRA) gets no weight gradient; in bf16 the chunked path is as close to the exact gradients
    as the plain bf16 path is. Exact: the plain path on an fp32 copy of the same bf16 weights. Both bf16 paths run
    the same bf16 model and differ only in how the head's output gradient is made (fp32 softmax rounded to bf16
    once, here all rows fit one chunk), so their distance to the exact gradients may differ by at most about one
    bf16 rounding of it: 2**-7 (bf16's machine epsilon) of each gradient's norm. The plain path's own error is
    ~1e-2 here (bf16 activations through 4 blocks), and a chunk dropping or misweighting ~3% of the positions'
    gradient lands far outside."""
    import copy

    model = _model("tiny-llama", torch.bfloat16)
    model.lm_head.weight.requires_grad_(head_trains)
    batch = _batch(model.config.vocab_size, masked=True)
    exact_model = copy.deepcopy(model).float()
    _plain(exact_model, batch).backward()
    exact = _grads(exact_model)
    want_loss = _plain(model, batch)
    want_loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    labels = shift(batch["labels"])
    with head_loss.head_loss(model, labels, head_loss.loss_positions(labels)) as result:
        CausalLMTask._forward(model, batch)
    result["loss"].backward()
    assert (model.lm_head.weight.grad is not None) == head_trains
    assert result["loss"].item() == pytest.approx(want_loss.item(), rel=4e-3)
    got = _grads(model)
    assert sorted(got) == sorted(want) == sorted(exact)
    norm = lambda g: g.float().norm().item()  # noqa: E731
    for n in want:
        plain_err, chunked_err = norm(want[n].float() - exact[n]), norm(got[n].float() - exact[n])
        assert chunked_err <= plain_err + 2 ** -7 * norm(exact[n]), (n, chunked_err, plain_err, norm(exact[n]))


def test_no_grad_loss_equals_plain():
    model = _model("tiny-llama-tied")
    batch = _batch(model.config.vocab_size, masked=True)
    labels = shift(batch["labels"])
    with torch.no_grad():
        want = _plain(model, batch)
        with head_loss.head_loss(model, labels, head_loss.loss_positions(labels)) as result:
            CausalLMTask._forward(model, batch)
    assert result["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert type(model.lm_head).forward is type(model.lm_head).__dict__["forward"]  # the head is itself again
    assert "forward" not in vars(model.lm_head)


def test_training_with_and_without_chunked_head_loss_gives_the_same_losses(tmp_path, monkeypatch):
    """The whole trainer path (collate's host-made positions, FSDP's gathered head, LoRA) on one process, in this
    process so that the model's forwards can be watched: with train.chunked_head_loss=true every forward runs
    inside head_loss (and returns no logits), with false none does (full logits), and the losses agree."""
    from fsdp_ft.api import train
    from fsdp_ft.config import load_config

    seen: list[tuple[bool, int]] = []  # per forward: inside head_loss?, width of the logits it returned
    inside = []
    real_head_loss, real_forward = head_loss.head_loss, CausalLMTask._forward

    @contextlib.contextmanager
    def watched_head_loss(*args, **kwargs):
        with real_head_loss(*args, **kwargs) as result:
            inside.append(True)
            try:
                yield result
            finally:
                inside.pop()

    def watched_forward(model, batch):
        out = real_forward(model, batch)
        seen.append((bool(inside), out.logits.shape[-1]))
        return out

    monkeypatch.setattr(head_loss, "head_loss", watched_head_loss)
    monkeypatch.setattr(CausalLMTask, "_forward", staticmethod(watched_forward))
    runs = {}
    for name, extra in (("chunked", []), ("plain", ["train.chunked_head_loss=false"])):
        seen.clear()
        out = tmp_path / name
        train(load_config(TINY, [f"output_dir={out}", *FAST, "finetune.method=lora", *extra]))
        runs[name] = (losses(out), list(seen))
    vocab = transformers.AutoConfig.from_pretrained(ASSETS / "tiny-llama").vocab_size
    (a, chunked), (b, plain) = runs["chunked"], runs["plain"]
    assert len(chunked) >= 16 and set(chunked) == {(True, 0)}  # 8 steps x 2 micro-batches, then the evaluation
    assert len(plain) == len(chunked) and set(plain) == {(False, vocab)}
    assert sorted(a) == sorted(b) and len(a) == 8
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)


def test_cuda_chunks_scale_with_the_card_and_the_cpu_chunk_is_unchanged():
    """An 80 GB card takes a chunk per 2k tokens at Llama-3's 128,256-token vocabulary (one fp32 sum per ~2k
    tokens instead of per 523); smaller cards keep the old 2**26, larger ones stop at 2**29 (4k tokens)."""
    gib = 2 ** 30
    rows = lambda total: head_loss.cuda_chunk_elements(total) // 128256  # noqa: E731
    assert head_loss.cuda_chunk_elements(int(79.2 * gib)) == 1 << 28 and rows(int(79.2 * gib)) >= 2048  # H100 80GB
    assert head_loss.cuda_chunk_elements(int(139.8 * gib)) == 1 << 29  # H200
    assert head_loss.cuda_chunk_elements(int(39.4 * gib)) == 1 << 27  # A100 40GB
    assert head_loss.cuda_chunk_elements(24 * gib) == 1 << 26  # the former fixed CUDA chunk
    assert head_loss.cuda_chunk_elements(4 * gib) == 1 << 26 and head_loss.cuda_chunk_elements(2 ** 50) == 1 << 29
    assert head_loss.chunk_elements(torch.device("cpu")) == 1 << 25
    assert head_loss._accumulator(torch.device("cpu"), torch.bfloat16) == "cast"  # out_dtype GEMMs are CUDA-only
