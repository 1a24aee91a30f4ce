"""FLOP counting against hand computation and torch's FlopCounterMode; MFU in metrics rows; profiler traces."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ASSETS, FAST, train_1proc
from fsdp_ft.observability import flops
from fsdp_ft.observability.flops import FlopCounts, batch_flops, count_flops
from fsdp_ft.observability.metrics import read_metrics

CFG = json.loads((ASSETS / "tiny-llama" / "config.json").read_text())
R = 4  # LoRA rank in these tests


def _shapes():
    """(in, out) of each matmul of one block (q, k, v, o, gate, up, down) and of the LM head, from the config."""
    h, inter = CFG["hidden_size"], CFG["intermediate_size"]
    nq, nkv = CFG["num_attention_heads"] * CFG["head_dim"], CFG["num_key_value_heads"] * CFG["head_dim"]
    return [(h, nq), (h, nkv), (h, nkv), (nq, h), (h, inter), (h, inter), (inter, h)], (h, CFG["vocab_size"])


def hand_counts(lora: bool) -> tuple[float, float]:
    """(per token, per causal pair) by hand: 2 FLOPs per weight per token forward; backward: 2 per weight for the
    input gradient where the input needs one, 2 per weight for the weight gradient where the weight trains."""
    block, head = _shapes()
    layers = CFG["num_hidden_layers"]
    base = 2 * (layers * sum(i * o for i, o in block) + head[0] * head[1])
    attn_fwd = layers * 2 * (CFG["head_dim"] + CFG["head_dim"]) * CFG["num_attention_heads"]  # QK^T and PV
    per_pair = 3 * attn_fwd  # backward = 2 x forward (q, k, v need grads in both cases below)
    if not lora:  # everything trains: forward + input grads + weight grads
        return 3 * base, per_pair
    adapters = 2 * layers * sum(R * (i + o) for i, o in block)  # A: in -> r, B: r -> out on every block linear
    forward = base + adapters
    # nothing before block 0's q/k/v needs a gradient (embeddings are frozen): their base matmuls and their
    # lora_A (which read the frozen embedding output) compute no input gradient; everything after does
    q, k, v = block[:3]
    no_input_grad = 2 * (q[0] * q[1] + k[0] * k[1] + v[0] * v[1]) + 3 * 2 * R * CFG["hidden_size"]
    return forward + (forward - no_input_grad) + adapters, per_pair


def tiny_llama(attn: str = "eager", lora: bool = False):
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ASSETS / "tiny-llama"),
                                             attn_implementation=attn)
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, target_modules="all-linear"))
    return model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_counts_equal_hand_computation(lora):
    counts = count_flops(tiny_llama("sdpa", lora))
    per_token, per_pair = hand_counts(lora)
    assert counts.causal and counts.attention_layers == CFG["num_hidden_layers"]
    assert counts.per_token == per_token and counts.per_pair == per_pair and counts.per_sequence == 0
    seq = 64
    assert flops.train_flops_per_token(tiny_llama("sdpa", lora), seq) == per_token + per_pair * (seq + 1) / 2


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_counts_match_flop_counter_mode(lora):
    """torch counts the matmuls of a real forward + backward (eager attention computes all L x L pairs, masked
    ones included, so compare with count_masked=True). Margin: 0.1%; they agree exactly here."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_llama("eager", lora)
    counts = count_flops(model)
    batch, seq = 2, 24
    ids = torch.randint(0, CFG["vocab_size"], (batch, seq))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids, use_cache=False).logits
        logits.float().sum().backward()
    measured = counter.get_total_flops()
    predicted = batch * counts.for_sequence(seq, count_masked=True)
    assert measured == pytest.approx(predicted, rel=1e-3), (measured, predicted)
    # and the attention share on its own: the batched matmuls (bmm) are QK^T and PV, forward and backward
    bmm = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "bmm" in str(op))
    assert bmm == pytest.approx(batch * counts.per_pair * seq * seq, rel=1e-3)


def test_batch_flops_count_real_tokens_of_padded_and_packed_rows():
    c = FlopCounts(forward_per_token=10.0, input_grad_per_token=10.0, weight_grad_per_token=10.0,
                   per_sequence=7.0, attention_forward_per_pair=1.0, attention_backward_per_pair=2.0, causal=True)
    padded = {"attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    assert batch_flops(c, padded).item() == c.for_sequence(5) + c.for_sequence(3)
    packed = {"attention_mask": torch.ones(1, 5, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    assert batch_flops(c, packed).item() == c.for_sequence(3) + c.for_sequence(2)
    c.causal = False  # bidirectional (BERT): every real token sees every real token of its row
    assert batch_flops(c, padded).item() == 30 * 8 + 2 * 7 + 3 * (25 + 9)


def test_gpu_peaks_by_name():
    """Dense peaks from NVIDIA's data sheets (tensor-core rows are printed with 2:4 sparsity there, marked "*", and
    footnoted "specifications 1/2 lower without sparsity": the dense value is half the printed one):
    - "NVIDIA H100 Tensor Core GPU" datasheet, table "Technical Specifications", columns H100 SXM and H100 PCIe:
      BFLOAT16 Tensor Core 1,979* (SXM) and 1,513* (PCIe) TFLOPS -> 989 and 756 dense (989.5 and 756.5, rounded
      down as NVIDIA's own dense figures are);
    - "NVIDIA A100 Tensor Core GPU" datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4), table "NVIDIA A100 Tensor
      Core GPU Specifications (SXM4 and PCIe Form Factors)": FP32 19.5 TFLOPS (no tensor cores, no sparsity);
      Tensor Float 32 (TF32) 156 | 312* TFLOPS;
    - "NVIDIA H200 Tensor Core GPU" datasheet, table "Technical Specifications", column H200 SXM: BFLOAT16 Tensor
      Core 1,979* TFLOPS, the H100 SXM's (same GH100 compute; only the memory differs) -> 989 dense."""
    assert flops.gpu_table_peak("NVIDIA H100 80GB HBM3", torch.bfloat16, tf32=False) == 1979e12 // 2 // 1e12 * 1e12
    assert flops.gpu_table_peak("NVIDIA H100 PCIe", torch.bfloat16, tf32=False) == 1513e12 // 2 // 1e12 * 1e12
    assert flops.gpu_table_peak("NVIDIA A100-SXM4-80GB", torch.float32, tf32=True) == 312e12 / 2
    assert flops.gpu_table_peak("NVIDIA A100-SXM4-80GB", torch.float32, tf32=False) == 19.5e12
    assert flops.gpu_table_peak("NVIDIA H200", torch.bfloat16, tf32=False) == 1979e12 // 2 // 1e12 * 1e12
    assert flops.gpu_table_peak("Some Future GPU", torch.bfloat16, tf32=False) is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FSDP_FT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(flops, "_MEASURED", {})
    calls = []
    real = flops.measure_matmul_flops
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda *a, **k: calls.append(1) or real(*a, seconds=0.2))
    peak, source = flops.peak_flops("cpu", torch.float32)
    assert peak > 1e8 and source.startswith("measured") and calls == [1]
    cached = json.loads((tmp_path / "peak_flops.json").read_text())
    assert [v["flops"] for v in cached.values()] == [peak]
    monkeypatch.setattr(flops, "_MEASURED", {})  # a new process: reads the file, measures nothing
    assert flops.peak_flops("cpu", torch.float32)[0] == peak and calls == [1]


# ---------------------------------------------------------------- in a real run

SEQ = int(next(o for o in FAST if o.startswith("train.seq_len=")).split("=")[1])
ROWS_PER_STEP = 4 * 2  # configs/tiny.yaml: micro-batch 4 x accumulation 2


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    """Every row longer than train.seq_len, so each is cut to exactly SEQ tokens: a step's FLOPs are known by hand."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    texts = [json.loads(line)["text"] for line in (ASSETS / "data" / "tiny_text_train.jsonl").read_text().splitlines()]
    rows, current = [], ""
    for text in texts:
        current = f"{current} {text}".strip()
        if len(tok(current)["input_ids"]) > SEQ:
            rows.append(current)
            current = ""
        if len(rows) == 4 * ROWS_PER_STEP:
            break
    data = tmp_path_factory.mktemp("mfu-data") / "long_rows.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out = tmp_path_factory.mktemp("mfu") / "run"
    return train_1proc(out, "train.max_steps=4", "train.profile_steps=[2,3]", "train.peak_flops=1e9",
                       f"data.train={data}")


def test_mfu_in_training_rows(profiled_run):
    """Each row's rate is a step's FLOPs counted by hand over its time: 8 rows of exactly SEQ tokens, each costing
    per_token x SEQ + per_pair x SEQ (SEQ + 1) / 2 (causal pairs); the step's time is its tokens over tokens_per_s.
    MFU is that rate over the configured peak (1e9 FLOP/s, one rank)."""
    rows = read_metrics(profiled_run)
    setup = next(r for r in rows if r.get("split") == "setup")
    per_token, per_pair = hand_counts(lora=False)
    assert setup["flops_per_token"] == per_token + per_pair * (SEQ + 1) / 2
    assert setup["peak_flops"] == 1e9 and setup["peak_flops_source"] == "config: train.peak_flops"
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    step_flops = ROWS_PER_STEP * (per_token * SEQ + per_pair * SEQ * (SEQ + 1) / 2)
    tokens = [0] + [r["tokens"] for r in train]
    for r, before in zip(train, tokens):
        assert r["tokens"] - before == ROWS_PER_STEP * SEQ  # no padding, no short row
        seconds = (r["tokens"] - before) / r["tokens_per_s"]
        assert r["flops_per_s"] == pytest.approx(step_flops / seconds, rel=1e-9)
        assert r["mfu"] == pytest.approx(step_flops / seconds / 1e9, rel=1e-9)


def test_profile_trace_covers_the_window(profiled_run):
    traces = list((profiled_run / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, list((profiled_run / "profile").iterdir())
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("name") == "aten::mm" for e in events)  # the ops inside the steps are there


@pytest.mark.parametrize("value", ["[3,2]", "[0,1]", "[2]"])
def test_bad_profile_window_is_a_one_line_config_error(value, tmp_path):
    from conftest import TINY
    from fsdp_ft.config import load_config
    from fsdp_ft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^config key 'train.profile_steps' must be \[start, end\]"):
        load_config(TINY, [f"output_dir={tmp_path}", f"train.profile_steps={value}"])
