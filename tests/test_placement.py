"""Every tensor where it belongs (fsdp_ft/model/placement.py) and the set-up that puts it there.

The audit itself: it flags a parameter, a buffer, a quantized weight's inner tensor (NF4 and int8) and peft's
prompt ids planted on the wrong device, and passes real tiny models built by `fsdp-ft train` (full, LoRA, QLoRA
nf4/int8, with fsdp.cpu_offload, 1 and 2 ranks), whose setup row counts the tensors it checked. Where a CPU
machine cannot tell a GPU from the host, the meta device stands in for the accelerator: set-up under
fsdp.cpu_offload must put FSDP's shards on the CPU and everything else (buffers, ignored whole weights) on it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ASSETS, REPO, TINY, drop_leftover_process_group, free_port, losses, train_1proc, train_nproc
from fsdp_ft.model import placement
from fsdp_ft.observability.metrics import read_metrics
from fsdp_ft.quant import quantize
from fsdp_ft.quant.int8_weight import Int8Weight

META, CPU = torch.device("meta"), torch.device("cpu")


class Tiny(nn.Module):
    """A linear, an NF4 and an int8 weight, a non-persistent buffer (as BERT's position_ids)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(64, 64)
        self.q = nn.Linear(64, 64, bias=False)
        self.q.weight = nn.Parameter(quantize.quantize_weight(torch.randn(64, 64), "nf4", 64, 64), requires_grad=False)
        self.i8 = nn.Linear(64, 64, bias=False)
        self.i8.weight = nn.Parameter(Int8Weight.from_float(torch.randn(64, 64)), requires_grad=False)
        self.register_buffer("pos", torch.arange(8), persistent=False)


def _nf4_with(weight, **parts):
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    return nf4_tensor.NF4Tensor(*nf4_tensor.construct_nf4_args(weight, parts))


def _plant(m: Tiny, where: str) -> str:
    """Put one tensor on the meta device; returns the name the audit must give."""
    if where == "parameter":
        m.lin.weight = nn.Parameter(torch.empty(64, 64, device=META))
        return "lin.weight"
    if where == "buffer":
        m.pos = torch.empty(8, dtype=torch.long, device=META)
        return "pos"
    w = m.q.weight.data
    if where == "nf4 codes":
        m.q.weight = nn.Parameter(_nf4_with(w, quantized_data=w.quantized_data.to(META)), requires_grad=False)
        return "q.weight.quantized_data"
    if where == "nf4 code book":  # what torchao's empty_like leaves on meta after to_empty
        m.q.weight = nn.Parameter(_nf4_with(w, nf4=w.nf4.to(META)), requires_grad=False)
        return "q.weight.nf4"
    if where == "nf4 wrapper":  # inner tensors right, the tensor FSDP and dispatch see says otherwise
        m.q.weight = nn.Parameter(_nf4_with(w, device=META), requires_grad=False)
        return "q.weight"
    if where == "int8 scales":
        i8 = m.i8.weight.data
        m.i8.weight = nn.Parameter(Int8Weight(i8.codes, i8.absmax.to(META), i8.dtype), requires_grad=False)
        return "i8.weight.absmax"
    assert where == "prompt ids"
    m.prompt_tokens = {"default": torch.arange(4, device=META)}
    return "prompt_tokens[default]"


def test_audit_passes_a_model_in_place_and_counts_every_stored_tensor():
    # lin weight + bias, NF4's 5 inner tensors, int8's 2, the buffer
    assert placement.check(Tiny(), CPU) == 2 + 5 + 2 + 1


@pytest.mark.parametrize("where", ["parameter", "buffer", "nf4 codes", "nf4 code book", "nf4 wrapper",
                                   "int8 scales", "prompt ids"])
def test_audit_flags_a_planted_misplaced_tensor(where):
    m = Tiny()
    name = _plant(m, where)
    with pytest.raises(RuntimeError) as e:
        placement.check(m, CPU)
    msg = str(e.value)
    assert f"'{name}' is on meta, expected cpu" in msg and "report" in msg and "\n" not in msg, msg


def test_audit_flags_everything_on_the_host_when_the_device_is_elsewhere():
    """The other way round: a model left on the host when the rank computes elsewhere (meta stands in)."""
    with pytest.raises(RuntimeError, match="'lin.weight' is on cpu, expected meta"):
        placement.check(Tiny(), META)


# ---------------------------------------------------------------- set-up under fsdp.cpu_offload, 2 (fake) ranks

def _sharded(overrides: list[str], device: torch.device, path=TINY):
    """The model as engine.build shards it on 2 ranks (torch's fake process group: rank 0 of 2, in this process),
    for a rank whose device is `device`."""
    from fsdp_ft.config import load_config
    from fsdp_ft.model.build import load_tokenizer, resolve_model_dir
    from fsdp_ft.parallel import fsdp
    from fsdp_ft.runtime import distributed
    from fsdp_ft.training.run_setup import build_meta

    cfg = load_config(path, ["output_dir=/tmp/unused", "fsdp.mixed_precision=fp32", *overrides])
    model_dir = resolve_model_dir(cfg)
    labels = ["a", "b"] if cfg.task == "seq_cls" else None
    env = distributed.DistEnv(rank=0, world_size=2, local_rank=0, device=device, backend="fake")
    model, _ = build_meta(cfg, env, model_dir, load_tokenizer(cfg, model_dir), labels)
    mesh = distributed.build_mesh(distributed.DistEnv(0, 2, 0, CPU, "fake"), 1)  # a CPU mesh: meta has none
    info = fsdp.parallelize(model, cfg, mesh)
    return cfg, model, info


BERT = ["task=seq_cls", f"model.path={ASSETS / 'tiny-bert'}"]
QUANT = ["finetune.method=qlora", "finetune.lora.r=4"]


@pytest.mark.parametrize("overrides", [
    [*BERT, "finetune.method=full"],                               # BERT's position_ids/token_type_ids (B4)
    [*BERT, "finetune.method=lora", "fsdp.shard_frozen=false"],    # a frozen base FSDP ignores (B2)
    ["finetune.method=prompt"],                                    # peft's prompt ids
], ids=["bert-full", "bert-lora-whole-base", "prompt"])
def test_offload_puts_shards_on_the_host_and_the_rest_on_the_device(overrides):
    """fsdp.cpu_offload on a GPU: FSDP2 requires its shards on the CPU, but never moves buffers made on meta or
    parameters it ignores, and the forward reads them on the GPU. The meta device stands in for the GPU."""
    from torch.distributed.tensor import DTensor

    from fsdp_ft.model.materialize import materialize
    from fsdp_ft.planner import memsim

    drop_leftover_process_group()
    with memsim.fake_world(2):
        cfg, model, _ = _sharded([*overrides, "fsdp.cpu_offload=true"], META)
        materialize(model, None, 0, META, offload=True)
        checked = placement.check(model, META, offload=True)
        params = dict(model.named_parameters())
        sharded = [n for n, p in params.items() if isinstance(p, DTensor)]
        whole = [n for n, p in params.items() if not isinstance(p, DTensor)]
        assert sharded and all(params[n].to_local().device == CPU for n in sharded)
        assert all(params[n].device == META for n in whole)
        assert bool(whole) is ("fsdp.shard_frozen=false" in overrides)
        buffers = dict(model.named_buffers())
        assert all(b.device == META for b in buffers.values())
        assert all(ids.device == META for ids in getattr(model, "prompt_tokens", {}).values())
        if cfg.task == "seq_cls":
            assert {"position_ids", "token_type_ids"} <= {n.rpartition(".")[2] for n in buffers}
        assert checked == len(params) + len(buffers) + len(getattr(model, "prompt_tokens", {}))
        # and the audit does look at FSDP's shards: without offload they belong on the device
        with pytest.raises(RuntimeError, match=f"'{sharded[0]}' is on cpu, expected meta"):
            placement.check(model, META, offload=False)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_each_rank_stores_only_its_shard_of_the_quantized_base(quant):
    """A rank's shard of a quantized weight is a row chunk of the whole one quantized on that rank; kept as a
    view, its inner tensors would hold the whole base's storage on every rank. The code book stays FP4's."""
    from torch.distributed.tensor import DTensor

    from fsdp_ft.model.materialize import materialize
    from fsdp_ft.planner import memsim

    drop_leftover_process_group()
    with memsim.fake_world(2):
        _, model, _ = _sharded([*QUANT, f"finetune.quant.type={quant}"], CPU)
        materialize(model, None, 0, CPU)
        shards = [p.to_local() for p in model.parameters() if quantize.is_quantized(p)]
        assert shards and all(isinstance(p, DTensor) for p in model.parameters() if quantize.is_quantized(p))
        for shard in shards:
            for name in shard.__tensor_flatten__()[0]:
                inner = getattr(shard, name)
                assert inner.untyped_storage().nbytes() == inner.nbytes, (name, inner.shape)
            if quant == "fp4":
                assert torch.equal(shard.nf4, torch.tensor(quantize.FP4_VALUES) / 12)


def test_offload_keeps_the_frozen_base_sharded():
    """B2: a PEFT base under fsdp.cpu_offload is sharded in host memory, however small; set to false it stays
    whole (and materialize then puts it on the device, test above)."""
    from fsdp_ft.config import load_config
    from fsdp_ft.parallel import fsdp

    def decide(*overrides):
        cfg = load_config(TINY, ["output_dir=/tmp/unused", "finetune.method=lora", *overrides])
        return fsdp.shard_frozen_without_model(cfg, 2)

    assert decide() is None  # without offload: it depends on the model's size
    why = "auto: fsdp.cpu_offload keeps the frozen base sharded in host memory"
    assert decide("fsdp.cpu_offload=true") == (True, why)
    assert decide("fsdp.cpu_offload=true", "fsdp.shard_frozen=false") == (False, "config")


WORKER = """
import os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
os.environ["LOCAL_WORLD_SIZE"] = str(rank + 1)   # rank 1 sees half the host memory per rank that rank 0 sees
from fsdp_ft.parallel import fsdp
out = {"agreed": fsdp.device_memory_per_rank("cpu"),
       "own": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (rank + 1)}
from worker_exit import write_result_and_exit   # tests/scripts: gloo's teardown aborted here once
write_result_and_exit(os.path.join(sys.argv[1], f"rank{rank}.json"), out)
"""


@pytest.mark.distributed
def test_ranks_agree_on_the_memory_budget(tmp_path):
    """B11: ranks whose devices differ (mixed GPUs, MIG slices) decide fsdp.shard_frozen / hybrid_replicas from the
    smallest budget of all, so they build the same mesh."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "scripts")])}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          f"--master-port={free_port()}", str(script), str(tmp_path)], timeout=120, cwd=REPO,
                         env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["own"] != got[1]["own"]
    assert got[0]["agreed"] == got[1]["agreed"] == min(g["own"] for g in got)


# ---------------------------------------------------------------- the audit in real runs

def expected_count(overrides: list[str]) -> int:
    """Tensors the audit must visit, counted on the meta model before sharding: each parameter once (a quantized
    one by its inner tensors), each buffer."""
    from fsdp_ft.config import load_config
    from fsdp_ft.model.build import load_tokenizer, resolve_model_dir
    from fsdp_ft.runtime.distributed import DistEnv
    from fsdp_ft.training.run_setup import build_meta

    cfg = load_config(TINY, ["output_dir=/tmp/unused", "fsdp.mixed_precision=fp32", *overrides])
    model_dir = resolve_model_dir(cfg)
    model, _ = build_meta(cfg, DistEnv(0, 2, 0, CPU, "fake"), model_dir, load_tokenizer(cfg, model_dir), None)
    inner = {"nf4": 5, "fp4": 5, "int8": 2}[cfg.finetune.quant.type]
    return (sum(inner if quantize.is_quantized(p) else 1 for p in model.parameters())
            + sum(1 for _ in model.buffers()))


@pytest.mark.distributed
@pytest.mark.parametrize("ranks,overrides", [
    (1, ["finetune.method=full", "fsdp.cpu_offload=true"]),
    (2, ["finetune.method=lora", "fsdp.cpu_offload=true", "fsdp.shard_frozen=false"]),
    (1, [*QUANT, "fsdp.cpu_offload=true"]),
    (2, [*QUANT, "finetune.quant.type=int8", "fsdp.cpu_offload=true"]),
    (2, [*QUANT]),
], ids=["full-offload-1", "lora-offload-whole-base-2", "qlora-nf4-offload-1", "qlora-int8-offload-2", "qlora-nf4-2"])
def test_every_setup_runs_the_audit(tmp_path, ranks, overrides):
    args = ["train.max_steps=2", *overrides]
    out = train_1proc(tmp_path / "run", *args) if ranks == 1 else train_nproc(ranks, tmp_path / "run", *args)
    setup = next(r for r in read_metrics(out) if r.get("split") == "setup")
    assert setup["placement_checked"] == expected_count(overrides), setup
    assert len(losses(out)) == 2
