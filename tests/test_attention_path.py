"""The causal-LM step without host syncs: a batch with no padding reaches the model with no attention mask (SDPA's
is_causal path, flash and native GQA on a GPU; transformers no longer reads the mask on the device to find it all
ones), with the loss and gradients of the all-ones mask; and the tasks' counts are made on the batch's device."""
from __future__ import annotations

import types

import pytest
import torch
import transformers

from conftest import ASSETS
from fsdp_ft.config import Config
from fsdp_ft.tasks.causal_lm import UNPADDED, CausalLMTask
from fsdp_ft.tasks.pairs import PairTask
from fsdp_ft.tasks.seq_cls import SeqClsTask

TOK = types.SimpleNamespace(pad_token_id=0)


def _model(name: str):
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(ASSETS / name)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _rows(vocab: int, lengths: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "attention_mask": [1] * n})
    return rows


def _loss_and_grads(task, model, batch):
    model.zero_grad(set_to_none=True)
    sums = task.loss_sums(model, batch)
    sums["loss"].backward()
    return sums["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _forward_kwargs(model, task, batch) -> dict:
    seen = {}
    forward = model.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return forward(*args, **kwargs)

    model.forward = spy
    try:
        task.loss_sums(model, batch)
    finally:
        del model.forward
    return seen


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # rotary positions; learned absolute positions
def test_unpadded_batch_goes_without_mask_and_gives_the_masked_loss_and_grads(name, chunked):
    model = _model(name)
    cfg = Config()
    cfg.train.chunked_head_loss = chunked
    task = CausalLMTask(cfg, TOK)
    batch = task.collate(_rows(model.config.vocab_size, [24, 24, 24]))
    assert UNPADDED in batch and batch[UNPADDED].numel() == 0
    assert "attention_mask" not in _forward_kwargs(model, task, batch)
    loss, grads = _loss_and_grads(task, model, batch)
    masked = {k: v for k, v in batch.items() if k != UNPADDED}  # the same batch through its all-ones mask
    assert "attention_mask" in _forward_kwargs(model, task, masked)
    want_loss, want = _loss_and_grads(task, model, masked)
    assert torch.equal(loss, want_loss)
    assert sorted(grads) == sorted(want)
    for n in want:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-6, atol=1e-7, msg=n)


def test_padded_and_packed_batches_keep_their_mask_or_positions():
    model = _model("tiny-llama")
    task = CausalLMTask(Config(), TOK)
    padded = task.collate(_rows(model.config.vocab_size, [24, 17]))
    assert UNPADDED not in padded
    assert _forward_kwargs(model, task, padded)["attention_mask"] is padded["attention_mask"]
    packed_rows = _rows(model.config.vocab_size, [24, 24])
    for r in packed_rows:  # two samples of 12 tokens in each row
        r["position_ids"] = list(range(12)) * 2
    packed = task.collate(packed_rows)
    assert UNPADDED not in packed
    seen = _forward_kwargs(model, task, packed)
    assert "attention_mask" not in seen and seen["position_ids"] is packed["position_ids"]


def test_counts_are_made_on_the_batch_device():
    """On the meta device a host-made count shows as a CPU tensor: the GPU would have waited for its copy."""
    cls = SeqClsTask(Config(), TOK)
    batch = {k: v.to("meta") for k, v in cls.collate([{"input_ids": [5, 6], "attention_mask": [1, 1], "label": 1},
                                                      {"input_ids": [7], "attention_mask": [1], "label": 0}]).items()}
    count = cls.count(batch)
    assert count.device.type == "meta" and count.dtype == torch.long and count.shape == ()
    pairs = PairTask.__new__(PairTask)
    count = pairs.count({"input_ids": torch.zeros(6, 5, dtype=torch.long, device="meta")})
    assert count.device.type == "meta" and count.shape == ()
    assert PairTask.count(pairs, {"input_ids": torch.zeros(6, 5, dtype=torch.long)}).item() == 3
    assert cls.count({"labels": torch.tensor([1, 0, 2])}).item() == 3
