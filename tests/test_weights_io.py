"""Tests for fsdp_ft.storage.weights_io: streamed safetensors/DCP I/O and per-rank row ranges."""

import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.tensor import Replicate, Shard

from fsdp_ft.storage.weights_io import (
    SafetensorsReader,
    atomic_dir,
    dcp_tensor_keys,
    iter_dcp_tensors,
    local_rows,
    write_safetensors_shards,
)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(11, 6, generator=g).to(torch.bfloat16),
        "layers.0.w": torch.randn(7, 5, 3, generator=g),
        "layers.0.bias": torch.randn(9, generator=g),
        "scale": torch.tensor(3.25),
        "positions": torch.arange(13, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def listing(path):
    return sorted(os.listdir(path))


# --- safetensors writing and reading ------------------------------------------------------


def test_single_file_roundtrip_and_rows(tmp_path):
    ref = sample_tensors()
    files = write_safetensors_shards(ref.items(), tmp_path / "out")
    assert [os.path.basename(f) for f in files] == ["model.safetensors"]
    assert listing(tmp_path) == ["out"] and listing(tmp_path / "out") == ["model.safetensors"]
    with safe_open(files[0], framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    with SafetensorsReader(tmp_path / "out") as r:
        assert sorted(r.keys()) == sorted(ref) and "scale" in r and "nope" not in r
        for name, t in ref.items():
            assert r.shape(name) == tuple(t.shape) and r.dtype(name) == t.dtype
            got = r.read(name)
            assert got.dtype == t.dtype and torch.equal(got, t)
            if t.dim() == 0:
                assert torch.equal(r.read_rows(name, 0, 0), t)  # scalars come back whole
                continue
            n = t.shape[0]
            for start, stop in [(0, n), (1, 3), (n - 1, n), (2, 2), (n, n)]:
                rows = r.read_rows(name, start, stop)
                assert rows.dtype == t.dtype and torch.equal(rows, t[start:stop])
        with pytest.raises(ValueError, match="outside dim 0"):
            r.read_rows("layers.0.bias", 3, 10)
        with pytest.raises(KeyError, match="nope"):
            r.read("nope")


def _rss_file_kib() -> int:
    """File-backed resident KiB, counted from the page tables (/proc/self/status's counters lag)."""
    with open("/proc/self/smaps_rollup") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1] == "kB"}
    return fields["Rss"] - fields["Anonymous"]


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux /proc")
def test_reader_maps_the_files_afresh_so_read_pages_leave_the_rss(tmp_path, monkeypatch):
    # 40 weights of 1 MiB: read whole, the way a QLoRA rank reads every weight to quantize it
    weights = {f"layers.{i}.w": torch.full((256, 1024), float(i)) for i in range(40)}
    write_safetensors_shards(weights.items(), tmp_path / "w")
    grown = {}
    for remap in (1 << 40, 4 << 20):  # never, and every 4 MiB
        monkeypatch.setattr(SafetensorsReader, "REMAP_BYTES", remap)
        with SafetensorsReader(tmp_path / "w") as r:
            before = _rss_file_kib()
            kept = r.read_rows("layers.0.w", 0, 256)  # held across the remaps: it must stay valid
            for i, name in enumerate(weights):  # each read, used and dropped, as the loader does
                assert float(r.read_rows(name, 0, 256).sum()) == i * 256 * 1024
            grown[remap] = _rss_file_kib() - before
            assert torch.equal(kept, weights["layers.0.w"])
            assert torch.equal(r.read("layers.3.w"), weights["layers.3.w"])
    assert grown[1 << 40] > 30 * 1024, grown  # all 40 MiB stayed mapped and resident
    assert grown[4 << 20] < 10 * 1024, grown  # at most about one remap interval


def test_sharded_write_index_and_reader(tmp_path):
    ref = sample_tensors()
    out = tmp_path / "sharded"
    cap = 200  # bytes: forces several shards; layers.0.w (420 B) exceeds it and goes alone
    files = write_safetensors_shards(iter(ref.items()), out, max_shard_bytes=cap, metadata={"who": "test"})
    n = len(files)
    assert n >= 3
    assert [os.path.basename(f) for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert listing(out) == sorted([os.path.basename(f) for f in files] + ["model.safetensors.index.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    assert sorted(index["weight_map"]) == sorted(ref)
    order = [index["weight_map"][k] for k in ref]  # streamed in order: shard numbers never go back
    assert order == sorted(order)
    for f in files:
        with safe_open(f, framework="pt") as h:
            assert h.metadata() == {"who": "test", "format": "pt"}
            sizes = [h.get_tensor(k).nbytes for k in h.keys()]
            assert sum(sizes) <= cap or len(sizes) == 1
    with SafetensorsReader(out) as r:
        assert r.keys() == list(index["weight_map"])
        for name, t in ref.items():
            assert torch.equal(r.read(name), t)
            if t.dim():
                assert torch.equal(r.read_rows(name, 1, 2), t[1:2])


def test_views_and_shared_storage_are_written(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    ref = {"a": base, "tied": base, "view": base[2:4], "t": base.t(), "col": base[:, 1]}
    write_safetensors_shards(ref.items(), tmp_path / "o")
    with SafetensorsReader(tmp_path / "o") as r:
        for name, t in ref.items():
            assert torch.equal(r.read(name), t)


def test_reader_folder_layouts_and_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        SafetensorsReader(empty)
    one = tmp_path / "one"
    write_safetensors_shards([("x", torch.ones(2))], one)
    os.rename(one / "model.safetensors", one / "adapter_model.safetensors")
    with SafetensorsReader(one) as r:  # any single *.safetensors is accepted
        assert torch.equal(r.read("x"), torch.ones(2))
    with SafetensorsReader(one / "adapter_model.safetensors") as r:  # so is a file path
        assert r.keys() == ["x"]
    (one / "other.safetensors").write_bytes((one / "adapter_model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="2 \\*.safetensors files"):
        SafetensorsReader(one)
    sharded = tmp_path / "sharded"
    files = write_safetensors_shards([("a", torch.ones(4)), ("b", torch.zeros(4))], sharded, max_shard_bytes=16)
    os.remove(files[1])
    with pytest.raises(FileNotFoundError, match="missing"):
        SafetensorsReader(sharded)


# --- atomic folders -------------------------------------------------------------------------


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith("ckpt.tmp-")
            (open(os.path.join(tmp, "half.bin"), "wb")).write(b"x" * 10)
            raise RuntimeError("boom")
    assert listing(tmp_path) == []

    def failing():
        yield "a", torch.ones(3)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_safetensors_shards(failing(), out, max_shard_bytes=4)
    assert listing(tmp_path) == []

    with atomic_dir(out, tag="rank-agreed") as tmp:
        assert tmp.endswith("ckpt.tmp-rank-agreed")
        open(os.path.join(tmp, "done"), "w").write("ok")
    assert listing(tmp_path) == ["ckpt"] and (out / "done").read_text() == "ok"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_folders_get_this_users_normal_modes(tmp_path, umask):
    """safetensors writes 0600 files; an export must be readable by whom the umask allows (a model server)."""
    old = os.umask(umask)
    try:
        write_safetensors_shards(((f"t{i}", torch.ones(8)) for i in range(3)), tmp_path / "out", max_shard_bytes=40)
        with atomic_dir(tmp_path / "folder") as tmp:
            os.mkdir(os.path.join(tmp, "sub"), 0o700)
            open(os.path.join(tmp, "sub", "f"), "w").close()
            os.chmod(os.path.join(tmp, "sub", "f"), 0o600)
    finally:
        os.umask(old)
    paths = [tmp_path / "out", *(tmp_path / "out").iterdir(), tmp_path / "folder", *(tmp_path / "folder").rglob("*")]
    assert len(paths) == 8  # 3 shards + index, sub/ and sub/f
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode & 0o777))


def test_existing_folders_are_never_touched(tmp_path):
    out = tmp_path / "user"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(out)):
        write_safetensors_shards([("a", torch.ones(2))], out)
    with pytest.raises(FileExistsError, match=str(out)):
        with atomic_dir(out):
            pytest.fail("body must not run")
    assert listing(tmp_path) == ["user"] and listing(out) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileExistsError):  # checkpoints: even an empty folder is refused
        with atomic_dir(empty):
            pass
    write_safetensors_shards([("a", torch.ones(2))], empty)  # exports may fill an empty one
    assert listing(empty) == ["model.safetensors"] and listing(tmp_path) == ["empty", "user"]


# --- DCP -----------------------------------------------------------------------------------


def save_nested_dcp(path, model_sd):
    state = {
        "model": model_sd,
        "optim": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.ones(3, 2)}},
                  "param_groups": [{"lr": 0.1, "params": [0]}]},
        "step": 7,
    }
    with warnings.catch_warnings():  # no_dist=True always warns that it is single-process
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_dcp_keys_and_grouped_streaming(tmp_path, monkeypatch):
    ref = sample_tensors()
    save_nested_dcp(tmp_path / "ck", ref)
    keys = dcp_tensor_keys(tmp_path / "ck")
    assert {k: v for k, v in keys.items() if k.startswith("model.")} == {
        f"model.{k}": (t.shape, t.dtype) for k, t in ref.items()}
    assert set(keys) - {f"model.{k}" for k in ref} == {"optim.state.0.step", "optim.state.0.exp_avg"}

    calls = []
    real_load = dcp.load
    monkeypatch.setattr(dcp, "load", lambda sd, **kw: (calls.append(sorted(sd)), real_load(sd, **kw))[1])
    got = list(iter_dcp_tensors(tmp_path / "ck", "model.", max_group_bytes=200))
    assert [k for k, _ in got] == [k[len("model."):] for k in keys if k.startswith("model.")]
    for name, t in got:
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name])
    assert len(calls) >= 3 and sum(len(c) for c in calls) == len(ref)  # loaded group by group
    for c in calls:
        if len(c) > 1:
            assert sum(ref[k[6:]].nbytes for k in c) <= 200
    optim = dict(iter_dcp_tensors(tmp_path / "ck", "optim.state.0."))
    assert torch.equal(optim["exp_avg"], torch.ones(3, 2)) and optim["step"].item() == 5.0


def test_dcp_export_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_nested_dcp(tmp_path / "ck", sd)

    out = tmp_path / "export"
    files = write_safetensors_shards(iter_dcp_tensors(tmp_path / "ck", "model.", max_group_bytes=20_000),
                                     out, max_shard_bytes=30_000)
    assert len(files) >= 4 and (out / "model.safetensors.index.json").exists()
    cfg.save_pretrained(out)
    with SafetensorsReader(out) as r:
        assert sorted(r.keys()) == sorted(sd)
        assert all(torch.equal(r.read(k), v) for k, v in sd.items())

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# --- row ranges per rank --------------------------------------------------------------------


def chunk_rows(n, world, rank):
    """(start, stop) of torch.chunk(arange(n), world)[rank]; empty at the end when n < world."""
    chunks = torch.arange(n).chunk(world)
    if rank >= len(chunks) or chunks[rank].numel() == 0:
        return n, n
    return int(chunks[rank][0]), int(chunks[rank][-1]) + 1


@pytest.mark.parametrize("mesh_shape", [(3,), (2, 2)])
def test_local_rows_fake_mesh_matches_chunk(mesh_shape):
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.device_mesh import init_device_mesh

    world = mesh_shape[0] if len(mesh_shape) == 1 else mesh_shape[0] * mesh_shape[1]
    placements = (Shard(0),) if len(mesh_shape) == 1 else (Replicate(), Shard(0))
    shards = mesh_shape[-1]
    if dist.is_initialized():  # an in-process training test of this session left its world-size-1 group
        dist.destroy_process_group()
    for rank in range(world):
        dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world)
        try:
            mesh = init_device_mesh("cpu", mesh_shape)
            for n in (1, 2, 3, 7, 8):
                start, stop = local_rows((n, 4), mesh, placements)
                assert (start, stop) == chunk_rows(n, shards, rank % shards), (rank, n)
            with pytest.raises(ValueError, match="0-d"):
                local_rows((), mesh, placements)
            with pytest.raises(ValueError, match="Shard\\(dim=1\\)"):
                local_rows((4, 4), mesh, (Shard(1),) * len(mesh_shape))
        finally:
            dist.destroy_process_group()


def _fsdp_worker(rank, world, init_file, weights_dir, ckpt_dir, q):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)  # same init as the parent's reference weights
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 1), torch.nn.Embedding(3, 4))
        fully_shard(model, mesh=mesh)
        checked = 0
        with SafetensorsReader(weights_dir) as r:
            for name, p in model.named_parameters():
                start, stop = local_rows(p)
                assert (start, stop) == chunk_rows(p.shape[0], world, rank), (name, start, stop)
                assert torch.equal(r.read_rows(name, start, stop), p.to_local()), name
                checked += 1
        dcp.save({"model": model.state_dict(), "step": 3}, checkpoint_id=ckpt_dir)  # sharded DTensors
        q.put((rank, checked))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_local_rows_match_fully_shard_on_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 1), torch.nn.Embedding(3, 4))
    write_safetensors_shards(ref.state_dict().items(), tmp_path / "w", max_shard_bytes=64)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "w"), str(tmp_path / "ck"), q), nprocs=2)
    assert sorted(q.get(timeout=5) for _ in range(2)) == [(0, 5), (1, 5)]
    # the ranks' shards, saved by DCP, stream back as full tensors in a process without a group
    full = dict(iter_dcp_tensors(tmp_path / "ck", "model.", max_group_bytes=100))
    assert list(full) == list(ref.state_dict())
    assert all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
