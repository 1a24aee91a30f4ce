"""Run under torchrun (2 gloo ranks): FSDP2 gradients with fsdp_ft's gloo reduce-scatter vs torch's own.

Writes one JSON per rank to argv[1]: whether every sharded gradient is bit-equal to torch's default
reduce-scatter, the dtype the gradients were exchanged in, the most reductions ever pending, how many were left
pending after backward, the buffer pool's bytes after each step, and how many all-gathers were swapped in place;
under "replicated", the same for weights whole on every rank, against FSDP's own HSDP all-reduce.
"""
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from fsdp_ft.parallel import gloo_reduce, fsdp
from worker_exit import write_result_and_exit


def build(seed: int, param_dtype, stored=torch.float32, blocks_train=True, mesh=None):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48)) for _ in range(5)],
                          nn.Linear(48, 7)).to(stored)
    model[:5].requires_grad_(blocks_train)
    mesh = mesh if mesh is not None else init_device_mesh("cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model[:5]:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def grads_after_backward(model, x, y, steps=2, pool=None, held=None):
    out = []
    for _ in range(steps):  # twice: the second backward reuses the comm object after its flush
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y).backward()
        out.append([p.grad.to_local().clone() for p in model.parameters() if p.requires_grad])
        if pool is not None:
            held.append(pool.held_bytes())
    return out


def counting(pending) -> list:
    """Record the most reductions `pending` ever held."""
    most, add = [0], pending.add

    def counting_add(*args, **kwargs):
        add(*args, **kwargs)
        most[0] = max(most[0], len(pending.queue))
    pending.add = counting_add
    return most


def replicated_cases(x, y) -> dict:
    """Every weight whole on every rank (replicas x 1 shard): FSDP's native HSDP all-reduce vs FSDP on the
    size-1 shard mesh with gloo_reduce's deferred all-reduce over the replicate group."""
    world = dist.get_world_size()
    hsdp = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    result = {}
    for name, param_dtype, stored in (("fp32", None, torch.float32), ("bf16", torch.bfloat16, torch.float32),
                                      ("bf16-stored", None, torch.bfloat16)):
        reference = grads_after_backward(build(0, param_dtype, stored, mesh=hsdp), x, y)
        model = build(0, param_dtype, stored, mesh=hsdp["shard"])
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        asynchronous = gloo_reduce.install_replicated(model, [*model[:5], model], policy,
                                                      hsdp["replicate"].get_group())
        pending = model._get_fsdp_state()._fsdp_param_group._all_reduce_hook.pending
        most = counting(pending)
        got = grads_after_backward(model, x, y)
        result[name] = {
            "asynchronous": asynchronous, "most_pending": most[0], "left_pending": len(pending.queue),
            "equal": all(torch.equal(a, b) for ra, rb in zip(got, reference) for a, b in zip(ra, rb)),
            "max_abs_grad": max(float(g.abs().max()) for g in got[0]),
        }
    return result


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # each rank its own batch
    x, y = torch.randn(16, 48), torch.randint(0, 7, (16,))
    result = {}
    # root-only: the blocks are frozen, so the only reduction is issued inside FSDP's end-of-backward callback.
    # This model's buffers are a few KiB, below SWAP_MIN_BYTES: the 2-rank in-place all-gather is tested with the
    # threshold at 0, torch's all-gather into the pooled buffer with the default threshold ("fp32-small").
    default_swap_min = gloo_reduce.SWAP_MIN_BYTES
    cases = (("fp32", None, torch.float32, True, 0), ("bf16", torch.bfloat16, torch.float32, True, 0),
             ("bf16-stored", None, torch.bfloat16, True, 0), ("root-only", None, torch.float32, False, 0),
             ("fp32-small", None, torch.float32, True, default_swap_min))
    for name, param_dtype, stored, blocks_train, swap_min in cases:
        gloo_reduce.SWAP_MIN_BYTES = swap_min
        reference = grads_after_backward(build(0, param_dtype, stored, blocks_train), x, y)
        model = build(0, param_dtype, stored, blocks_train)
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        asynchronous, sent = gloo_reduce.install(model, [*model[:5], model], policy, dist.get_world_size())
        if name in ("fp32", "bf16"):  # training's default: the next block's all-gather issued asynchronously
            fsdp.set_prefetch(model, list(model[:5]), 1, "cpu")
        comm = model._get_fsdp_state()._fsdp_param_group._reduce_scatter_comm
        gathers = [m._get_fsdp_state()._fsdp_param_group._all_gather_comm for m in model[:5]]
        pending = comm.pending
        most = counting(pending)
        held = []  # the buffer pool's bytes after each step: the second step reuses the first one's buffers
        got = grads_after_backward(model, x, y, pool=comm.pool, held=held)
        result[name] = {
            "asynchronous": asynchronous, "sent": str(sent).removeprefix("torch."),
            "equal": all(torch.equal(a, b) for ra, rb in zip(got, reference) for a, b in zip(ra, rb)),
            "most_pending": most[0], "left_pending": len(pending.queue),
            "max_abs_grad": max(float(g.abs().max()) for g in got[0]), "pool_bytes": held,
            "swapped_all_gathers": sum(g.swaps for g in gathers),
        }
    result["replicated"] = replicated_cases(x, y)
    write_result_and_exit(f"{sys.argv[1]}/rank{rank}.json", result)


if __name__ == "__main__":
    main()
