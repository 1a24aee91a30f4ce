"""What every system trains in one benchmark: one saved model folder, one list of fixed-length samples, one plan.

Comparability is built in, not hoped for:
- the same initial weights: a random-init model is built once from a config and saved; every system loads it;
- the same tokens: each sample is tokenized by fsdp_ft's own causal-LM encoder and is exactly seq_len tokens long
  (paragraphs of the repo's text joined until they overflow), so there is no padding anywhere and every system
  trains seq_len x global batch tokens per step — that is the token count the table uses;
- the same order: the peers get the samples in the order of fsdp_ft's batch plan, so step k trains the same
  micro-batches on the same ranks everywhere.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "assets" / "tokenizer"
TEXT = REPO / "tests" / "assets" / "data" / "tiny_text_train.jsonl"

# SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M config.json): 30 Llama blocks, hidden 576, GQA 9/3 heads,
# vocab 49,152, tied embeddings; 134.5M parameters.
SMOLLM2_135M_SHAPE = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "vocab_size": 49152,
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
}
MODEL_PRESETS = {
    "smollm2-135m-shape": SMOLLM2_135M_SHAPE,
    "tiny": json.loads((REPO / "tests" / "assets" / "tiny-llama" / "config.json").read_text()),
}


@dataclass
class Workload:
    """One benchmark case: the same for every system."""
    mode: str = "full"                   # full | lora | qlora
    model: str = "smollm2-135m-shape"    # a preset, or a folder with config.json (random init from it)
    pretrained: str | None = None        # a folder with weights and tokenizer (e.g. data/smollm2-135m-instruct)
    nproc: int = 2
    seq_len: int = 512
    micro_batch_size: int = 1
    grad_accum: int = 4
    warmup_steps: int = 2                # run but not timed
    timed_steps: int = 10
    precision: str = "bf16"              # bf16 mixed precision (fp32 parameters) | fp32
    seed: int = 0
    lr: float = 1e-4
    lora_r: int = 16
    lora_alpha: float = 32.0
    qlora_scaler_block: int | None = None  # fsdp_ft's NF4 double-quant block; None: auto (from each weight's shape)
    reshard_after_forward: bool = True   # fsdp_ft and hf_fsdp2: free gathered blocks after forward (ZeRO-3-like)
    fsdp_ft_set: tuple[str, ...] = ()    # extra KEY=VALUE overrides for fsdp_ft only (shown in the report)
    text: str = str(TEXT)

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.nproc

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch

    def key(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    model_dir: Path
    train_jsonl: Path            # texts, for fsdp_ft (it tokenizes them itself)
    samples_json: Path           # token ids in the batch plan's order, for the peers
    block_class: str
    extra: dict = field(default_factory=dict)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def prepare_model(w: Workload, work: Path) -> Path:
    """A folder every system loads: the pretrained one as is, or a random-init model saved once (cached)."""
    if w.pretrained:
        return Path(w.pretrained).resolve()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = MODEL_PRESETS.get(w.model)
    if shape is None:
        shape = json.loads((Path(w.model) / "config.json").read_text())
    manifest = {"config": shape, "seed": w.seed}
    out = work / f"model-{_digest(manifest)}"
    if (out / "bench_manifest.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fields = {k: v for k, v in shape.items() if k not in ("model_type", "transformers_version", "architectures")}
    cfg = AutoConfig.for_model(shape["model_type"], **fields)
    torch.manual_seed(w.seed)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, tmp / f.name)
    (tmp / "bench_manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _encoder(model_dir: Path, seq_len: int):
    """fsdp_ft's own causal-LM encoding (tokenizer special tokens, EOS, truncation) for this seq_len."""
    from fsdp_ft.config import Config
    from fsdp_ft.model.build import load_tokenizer
    from fsdp_ft.tasks.causal_lm import CausalLMTask

    cfg = Config()
    cfg.train.seq_len = seq_len
    cfg.data.format, cfg.data.truncation = "text", "keep_start"  # as in the fsdp_ft config the harness writes
    return CausalLMTask(cfg, load_tokenizer(cfg, model_dir))


def build_samples(w: Workload, model_dir: Path) -> tuple[list[str], list[list[int]]]:
    """steps x global batch texts, each encoding to exactly seq_len tokens, and their token ids."""
    task = _encoder(model_dir, w.seq_len)
    paragraphs = [json.loads(line)["text"] for line in Path(w.text).read_text().splitlines() if line.strip()]
    texts, ids, cursor = [], [], 0
    for _ in range(w.steps * w.global_batch):
        parts = []
        while True:
            parts.append(paragraphs[cursor % len(paragraphs)])
            cursor += 1
            text = "\n\n".join(parts)
            # strictly longer than seq_len, so truncation (not the appended EOS) decides the last token
            if len(task.tok(text, add_special_tokens=True)["input_ids"]) > w.seq_len:
                break
        row = task.encode({"text": text})["input_ids"]
        assert len(row) == w.seq_len, (len(row), w.seq_len)
        texts.append(text)
        ids.append(row)
    return texts, ids


def plan_order(w: Workload, num_samples: int) -> list[int]:
    """Sample indices in the order fsdp_ft's batch plan trains them (epoch 0): global batch by global batch."""
    from fsdp_ft.data.splits import BatchPlan

    plan = BatchPlan(num_samples, w.micro_batch_size, w.grad_accum, w.nproc, 0, w.seed)
    return plan.permutation(0)[: w.steps * w.global_batch].tolist()


def block_class(model_dir: Path) -> str:
    """The transformer block class (for HF Trainer's FSDP auto-wrap), found on a meta-device model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdp_ft.parallel.fsdp import find_blocks

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return type(find_blocks(model)[0]).__name__


def prepare(w: Workload, work: Path) -> Prepared:
    work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(w, work)
    texts, ids = build_samples(w, model_dir)
    tag = _digest({"model": str(model_dir), "w": w.key()})
    train_jsonl = work / f"train-{tag}.jsonl"
    train_jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    samples_json = work / f"samples-{tag}.json"
    samples_json.write_text(json.dumps([ids[i] for i in plan_order(w, len(ids))]))
    return Prepared(model_dir, train_jsonl, samples_json, block_class(model_dir))


