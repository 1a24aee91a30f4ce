"""The optimizer's state made at set-up (fsdp_ft.training.optim.init_state) trains exactly as the lazily made one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fsdp_ft.config import load_config
from fsdp_ft.training.optim import build_optimizer, init_state
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


def test_param_groups_decay_matrices_only(tmp_path):
    """AdamW's groups: weight decay on the two Linear weights only; the biases and the LayerNorm weight and bias
    (the README's "no decay on biases and norms") get 0. Hyper-parameters reach the optimizer as configured."""
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "optim.lr=7e-4", "optim.weight_decay=0.3",
                             "optim.betas=[0.8,0.95]", "optim.eps=1e-6", "finetune.method=full"])
    model = _model()
    model[2].bias.requires_grad_(False)  # frozen parameters stay out of the optimizer
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = [(g["weight_decay"], sorted(by_id[id(p)] for p in g["params"])) for g in opt.param_groups]
    assert groups == [(0.3, ["0.weight", "2.weight"]), (0.0, ["0.bias", "1.bias", "1.weight"])]
    for g in opt.param_groups:
        assert (g["lr"], g["betas"], g["eps"]) == (7e-4, (0.8, 0.95), 1e-6)


# lr multipliers by hand, 6 steps, warmup 2 (steps 0 and 1 at 1/2 and 2/2), then progress p = (s - 2) / 4:
# cosine (1 + cos(pi p)) / 2 = 1, 0.85355, 0.5, 0.14645; linear 1 - p = 1, 0.75, 0.5, 0.25; with min_lr_ratio m:
# m + (1 - m) * shape
SCHEDULES = {
    ("cosine", 0.0): [0.5, 1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627],
    ("linear", 0.0): [0.5, 1.0, 1.0, 0.75, 0.5, 0.25],
    ("constant", 0.0): [0.5, 1.0, 1.0, 1.0, 1.0, 1.0],
    ("cosine", 0.2): [0.5, 1.0, 1.0, 0.2 + 0.8 * 0.8535533905932737, 0.6, 0.2 + 0.8 * 0.14644660940672627],
    ("linear", 0.2): [0.5, 1.0, 1.0, 0.8, 0.6, 0.4],
}


def _lrs(cfg, steps: int) -> tuple[list[float], float]:
    """The lr of each of `steps` optimizer steps under cfg's schedule (optim.lr=1: the multipliers), and after."""
    from fsdp_ft.training.optim import build_scheduler

    opt = build_optimizer(_model(), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, steps, cfg)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen, opt.param_groups[0]["lr"]


@pytest.mark.parametrize("schedule,min_ratio", sorted(SCHEDULES))
def test_schedule_multipliers_by_hand(tmp_path, schedule, min_ratio):
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "optim.lr=1.0", "optim.warmup_steps=2",
                             f"optim.schedule={schedule}", f"optim.min_lr_ratio={min_ratio}"])
    seen, after = _lrs(cfg, 6)
    assert seen == pytest.approx(SCHEDULES[(schedule, min_ratio)], rel=1e-12)
    assert after == pytest.approx(min_ratio if schedule != "constant" else 1.0)


@pytest.mark.parametrize("overrides,kernel", [
    ([], "fused"), (["optim.implementation=foreach"], "foreach"), (["optim.implementation=for_loop"], None),
    (["fsdp.mixed_precision=fp16"], "foreach"), (["model.dtype=fp16"], "foreach"),
    (["fsdp.mixed_precision=bf16"], "fused"), (["model.dtype=bf16"], "fused"),  # bf16 needs no loss scaling
])
def test_kernel_choice(tmp_path, overrides, kernel):
    """auto is fused, except under fp16 loss scaling (pytorch#140514), where it is foreach."""
    cfg = load_config(TINY, [f"output_dir={tmp_path}", *overrides])
    opt = build_optimizer(_model(), cfg, torch.device("cpu"))
    chosen = [k for k in ("fused", "foreach") if opt.defaults.get(k)]
    assert chosen == ([kernel] if kernel else [])


def test_fused_refused_under_fp16(tmp_path):
    from fsdp_ft.errors import ConfigError

    cfg = load_config(TINY, [f"output_dir={tmp_path}", "fsdp.mixed_precision=fp16", "optim.implementation=fused"])
    with pytest.raises(ConfigError, match="optim.implementation"):
        build_optimizer(_model(), cfg, torch.device("cpu"))


def test_decay_follows_the_number_of_dimensions(tmp_path):
    """Decay on every parameter of 2 or more dimensions (convolution kernels of 3 and 4 too), none on scalars and
    vectors, whatever the module type."""
    cfg = load_config(TINY, [f"output_dir={tmp_path}", "optim.weight_decay=0.1", "finetune.method=full"])
    model = nn.Module()
    model.conv1, model.conv2 = nn.Conv1d(2, 3, 3), nn.Conv2d(2, 3, 3)
    model.scale = nn.Parameter(torch.tensor(1.0))
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: sorted(by_id[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert groups == {0.1: ["conv1.weight", "conv2.weight"], 0.0: ["conv1.bias", "conv2.bias", "scale"]}


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_by_hand_with_an_odd_warmup(tmp_path, schedule):
    """10 steps, warmup 3: steps 0-2 at 1/3, 2/3, 1; then progress (s - 3) / 7 (7 = 10 - 3; a warmup of 2 over 6
    steps could not tell 6 - 2 from other arithmetic on the two, such as 6 XOR 2)."""
    import math

    cfg = load_config(TINY, [f"output_dir={tmp_path}", "optim.lr=1.0", "optim.warmup_steps=3",
                             f"optim.schedule={schedule}", "optim.min_lr_ratio=0.0"])
    shape = {"cosine": lambda p: (1 + math.cos(math.pi * p)) / 2, "linear": lambda p: 1 - p}[schedule]
    want = [1 / 3, 2 / 3, 1.0] + [shape((s - 3) / 7) for s in range(3, 10)]
    assert _lrs(cfg, 10)[0] == pytest.approx(want, rel=1e-12)
