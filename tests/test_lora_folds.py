"""LoRA of MoE expert stacks: peft folds `W + s * B @ A` into a full-size stack each forward, and autograd would keep
that fold until backward (a whole expert stack per adapted tensor and layer). fsdp_ft has backward remake it
instead. Measured against peft's own model by a live-storage tracker written here, and for the gradients, bit for
bit."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fsdp_ft.model import lora_folds
from fsdp_ft.runtime import recompute
from test_moe import _cfg, save_tiny_moe

LAYERS, EXPERTS, HIDDEN, INNER = 4, 4, 64, 256


class LivePeak(TorchDispatchMode):
    """Peak bytes of the storages that ops allocate while open, each followed to its release (a weak reference)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.live.setdefault(st._cdata, (StorageWeakRef(st), st.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _peft_mixtral(experts: str):
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mixtral", num_hidden_layers=LAYERS, num_local_experts=EXPERTS,
                               num_experts_per_tok=2, hidden_size=HIDDEN, intermediate_size=INNER,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = AutoModelForCausalLM.from_config(cfg)
    model.set_experts_implementation(experts)
    # all-linear: attention, router and both expert stacks; B starts non-zero so every gradient is informative
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def _step(model, ids):
    with LivePeak() as tracker:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.item(), tracker.peak


@pytest.mark.parametrize("experts", ["grouped_mm", "eager"])
def test_backward_remakes_the_fold_instead_of_keeping_it(experts):
    """Same loss and bit-identical gradients as peft's model, and a peak lower by at least the folds of all
    layers but one (each layer's stacks: E x 2I x H + E x H x I fp32 values, counted by hand), on both of
    transformers' experts forwards: the grouped matmul saves the whole fold, the eager loop one view per expert."""
    theirs = _peft_mixtral(experts)
    ours = copy.deepcopy(theirs)
    assert lora_folds.install(list(ours.base_model.model.model.layers)) == LAYERS
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    loss_theirs, peak_theirs = _step(theirs, ids)
    loss_ours, peak_ours = _step(ours, ids)

    assert loss_ours == loss_theirs
    grads = 0
    for (name, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name
            grads += ".experts." in name
    assert grads == LAYERS * 2 * 2  # lora_A and lora_B of both stacks in every layer
    fold = EXPERTS * (2 * INNER * HIDDEN + HIDDEN * INNER) * 4
    assert peak_theirs - peak_ours >= (LAYERS - 1) * fold, (peak_theirs, peak_ours, fold)


def test_views_of_a_marked_tensor_share_one_remade_copy():
    """Three saved views of one marked tensor: backward remakes it once, the gradients equal those of the same
    graph with nothing marked, and nothing of the remade copy outlives backward."""
    w = torch.randn(3, 4, 5, requires_grad=True)
    x = torch.randn(2, 4, requires_grad=True)  # so that each matmul saves its view of `big` for x's gradient
    calls = []

    def graph(marked: bool):
        big = w * 2.0
        if marked:
            recompute.mark(big, lambda: calls.append(1) or w.detach() * 2.0)
        with recompute.dropping_marked():
            out = (x @ big[0]).sum() + (x @ big[2]).sum() + (big.transpose(1, 2) @ x.T).square().sum()
        return torch.autograd.grad(out, (w, x)), big

    want, _ = graph(False)
    got, big = graph(True)
    assert all(torch.equal(g, h) for g, h in zip(got, want))
    assert len(calls) == 1
    assert getattr(big, recompute.RECIPE_ATTR).copy is None


@pytest.mark.parametrize("checkpointing", ["none", "selective:2"])
def test_training_set_up_remakes_folds_where_checkpointing_does_not(tmp_path, checkpointing):
    """fsdp_ft's set-up installs the remaking on the experts of every block that activation checkpointing leaves
    alone (a checkpointed block keeps nothing of its forward already)."""
    from fsdp_ft.model import adapters
    from fsdp_ft.parallel import fsdp
    from fsdp_ft.runtime import distributed
    from fsdp_ft.training import fsdp_engine

    path = save_tiny_moe(tmp_path / "mixtral", "mixtral")
    built = fsdp_engine.build(_cfg(tmp_path, path, "finetune.method=lora",
                                   f"activation_checkpointing={checkpointing}"), distributed.init_distributed())
    blocks = fsdp.find_blocks(adapters.base_model(built.model), None)
    marked = [any(hasattr(m, lora_folds.INSTALLED_ATTR) for m in b.modules()) for b in blocks]
    assert marked == {"none": [True, True], "selective:2": [False, True]}[checkpointing]

