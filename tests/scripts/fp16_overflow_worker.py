"""Run under torchrun (2 gloo ranks): an overflow on one rank skips the step on every rank.

A small model sharded by FSDP2 computes in fp16 (fsdp_ft's MixedPrecisionPolicy for fsdp.mixed_precision=fp16),
with fsdp_ft's own loss scaler (engine._grad_scaler), optimizer (optim.build_optimizer) and optimizer step
(Trainer.optimizer_step: unscale, clip, step, update). Step 1 is clean. Before step 2's optimizer step, rank 1
alone writes an inf into its shard of one gradient, as an fp16 overflow on that rank would. Each rank writes
argv[1]/rank<R>.json: the loss scale before and after each step, whether its own gradients were finite, and
whether each step changed its parameter shards.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from fsdp_ft.config import load_config
from fsdp_ft.parallel import fsdp
from fsdp_ft.runtime import distributed
from fsdp_ft.training.fsdp_engine import _grad_scaler
from fsdp_ft.training.optim import build_optimizer
from fsdp_ft.training.trainer import Trainer
from worker_exit import write_result_and_exit

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def local_shards(model) -> list[torch.Tensor]:
    return [p.to_local().detach().clone() for p in model.parameters()]


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(TINY, [f"output_dir={sys.argv[1]}", "fsdp.mixed_precision=fp16", "optim.lr=1e-2"])
    env = distributed.DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"),
                              backend="gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    mesh = init_device_mesh("cpu", (world,))
    policy = fsdp.mixed_precision_policy(cfg)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    optimizer = build_optimizer(model, cfg, env.device)
    scaler = _grad_scaler(cfg, env)
    # the trainer's optimizer step, on a trainer holding only what that step reads
    trainer = object.__new__(Trainer)
    trainer.cfg, trainer.optimizer, trainer.scaler = cfg, optimizer, scaler
    trainer.trainable = [p for p in model.parameters() if p.requires_grad]

    torch.manual_seed(1 + rank)  # each rank its own micro-batch
    x, y = torch.randn(4, 16), torch.randint(0, 8, (4,))
    result = {"scaler": type(scaler).__name__, "steps": []}
    for step in (1, 2):
        before, scale_before = local_shards(model), float(scaler.get_scale())
        loss = nn.functional.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        first = next(model.parameters()).grad.to_local()
        if step == 2 and rank == 1:
            first.view(-1)[0] = float("inf")  # an overflow in this rank's shard of the first weight only
        finite = all(bool(torch.isfinite(p.grad.to_local()).all()) for p in model.parameters())
        trainer.optimizer_step()
        after = local_shards(model)
        result["steps"].append({
            "step": step, "scale_before": scale_before, "scale_after": float(scaler.get_scale()),
            "local_grads_finite": finite, "compute_dtype": str(policy.param_dtype).removeprefix("torch."),
            "changed": [not torch.equal(a, b) for a, b in zip(before, after)],
        })
    write_result_and_exit(f"{sys.argv[1]}/rank{rank}.json", result)


if __name__ == "__main__":
    main()
