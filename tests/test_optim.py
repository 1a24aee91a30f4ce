"""The optimizer's state made at set-up (fsdp_ft.optim.init_state) trains exactly as the lazily made one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fsdp_ft.config import load_config
from fsdp_ft.optim import build_optimizer, init_state
from conftest import TINY


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.LayerNorm(24), nn.Linear(24, 5))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> list[float]:
    torch.manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("implementation", ["fused", "foreach", "for_loop"])
def test_state_made_at_setup_trains_like_the_lazy_state(tmp_path, implementation):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "optim.lr=1e-2", "optim.weight_decay=0.1",
                             f"optim.implementation={implementation}"])
    lazy_model, eager_model = _model(), _model()
    lazy = build_optimizer(lazy_model, cfg, torch.device("cpu"))
    eager = build_optimizer(eager_model, cfg, torch.device("cpu"))
    before = [p.detach().clone() for p in eager_model.parameters()]

    init_state(eager)
    # the state exists before any step: zero moments at step 0, the weights untouched, no gradients left
    assert len(eager.state) == len(before)
    for p, b in zip(eager_model.parameters(), before):
        state = eager.state[p]
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        assert torch.equal(p, b) and p.grad is None
    assert [g["lr"] for g in eager.param_groups] == [1e-2, 1e-2]

    assert _train(eager_model, eager) == _train(lazy_model, lazy)
    for a, b in zip(eager_model.parameters(), lazy_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(eager_model.parameters(), lazy_model.parameters()):
        assert float(eager.state[a]["step"]) == float(lazy.state[b]["step"]) == 3
        assert torch.equal(eager.state[a]["exp_avg_sq"], lazy.state[b]["exp_avg_sq"])


def test_state_made_at_setup_leaves_existing_state_alone(tmp_path):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "optim.lr=1e-2"])
    model = _model()
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    _train(model, opt, steps=2)
    snapshot = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    weights = [p.detach().clone() for p in model.parameters()]
    init_state(opt)  # e.g. after a resume loaded the state: nothing to do
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
        assert all(torch.equal(v, snapshot[id(p)][k]) for k, v in opt.state[p].items())
