"""`fsdp-ft train` in one process against an independent trainer (tests/reference_trainer.py: plain PyTorch,
transformers and peft), step for step in fp32: the loss, the gradient norm before clipping, the learning rate,
and the final weights.

The cases are chosen so that each rule of the training arithmetic changes the numbers: dropout is on (attention
dropout 0.1, LoRA dropout 0.1), the clip threshold sits below the gradient norms, weight decay is large enough
to move a norm weight if it were wrongly decayed, the schedules are read where cosine and linear disagree, and
the micro-batches are padded rows of unequal length accumulated over several micro-steps, so that a mean of
micro-batch means differs from the step's token-weighted mean. The resume case stops after 3 steps and resumes
to 6 with dropout on, so a resume that does not restore the RNG state draws other dropout masks.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ASSETS, FAST, TINY, cli, losses, save_tiny_llama
from reference_trainer import Recipe, read_rows, tokenize, train

TRAIN_FILE = ASSETS / "data" / "tiny_text_train.jsonl"
# measured agreement on this machine: losses and norms within 3e-7 relative, weights within 5e-6 (norm of the
# difference over the norm of the tensor); fused (fsdp_ft) and foreach (reference) AdamW kernels, the chunked
# and the plain head loss, and FSDP's flat gradient norm account for it
LOSS_RTOL, WEIGHT_RTOL = 5e-6, 5e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 'pretrained' tiny Llama saved by transformers, with attention dropout 0.1 so the RNG matters."""
    return save_tiny_llama(tmp_path_factory.mktemp("reference") / "tiny-llama-dropout", seed=5, attention_dropout=0.1)


def run_fsdp_ft(out: Path, model_dir: Path, r: Recipe, *extra: str) -> list[dict]:
    overrides = [f"output_dir={out}", *FAST, f"model.path={model_dir}", "model.random_init=false",
                 f"train.max_steps={r.steps}", f"train.seq_len={r.seq_len}", f"train.micro_batch_size={r.micro}",
                 f"train.grad_accum={r.accum}", f"train.seed={r.seed}", f"optim.lr={r.lr}",
                 f"optim.weight_decay={r.weight_decay}", f"optim.warmup_steps={r.warmup}",
                 f"optim.schedule={r.schedule}", f"optim.min_lr_ratio={r.min_lr_ratio}",
                 f"optim.max_grad_norm={'null' if r.max_grad_norm is None else r.max_grad_norm}"]
    cli("train", str(TINY), *overrides, *extra)
    return train_rows(out)


def train_rows(out: Path) -> list[dict]:
    from fsdp_ft.observability.metrics import read_metrics

    rows = {r["step"]: r for r in read_metrics(out) if "split" not in r and "loss" in r}
    return [rows[s] for s in sorted(rows)]


def reference(model, model_dir: Path, r: Recipe) -> Recipe:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return train(model, tokenize(tok, read_rows(TRAIN_FILE), r.seq_len), tok.pad_token_id, r)


def base_model(model_dir: Path):
    """The pretrained model as fsdp_ft runs it: sdpa attention, or eager where transformers has no sdpa (gpt-oss)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    except ValueError as e:
        if "scaled_dot_product_attention" not in str(e):
            raise
        return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")


def assert_steps_match(got: list[dict], want: Recipe) -> None:
    assert [row["step"] for row in got] == list(range(1, want.steps + 1))
    for row, ref in zip(got, want.history):
        for key in ("loss", "grad_norm"):
            rel = abs(row[key] - ref[key]) / abs(ref[key])
            assert rel <= LOSS_RTOL, f"step {row['step']} {key}: fsdp_ft {row[key]} vs reference {ref[key]} ({rel:.1e})"
        assert row["lr"] == pytest.approx(ref["lr"], rel=1e-12, abs=0), f"step {row['step']} lr"


def assert_weights_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        rel = ((got[name].float() - w.float()).norm() / w.float().norm().clamp_min(1e-12)).item()
        assert rel <= WEIGHT_RTOL, f"{name}: relative difference {rel:.1e}"


def exported_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def test_full_cosine_dropout_clipping_decay_accumulation(tmp_path, model_dir):
    r = Recipe(steps=6, micro=2, accum=2, seq_len=64, lr=3e-3, weight_decay=0.5, warmup=2, schedule="cosine",
               max_grad_norm=0.5)
    got = run_fsdp_ft(tmp_path / "run", model_dir, r)
    model = base_model(model_dir)
    want = reference(model, model_dir, r)
    assert all(h["grad_norm"] > r.max_grad_norm for h in want.history), "the case must clip at every step"
    assert want.history[3]["lr"] == pytest.approx(3e-3 * 0.8535533905932737)  # step 4 of 6, warmup 2: cosine
    assert_steps_match(got, want)
    assert_weights_match(exported_weights(tmp_path / "run"), model.state_dict())


def test_partial_linear_unclipped_padded_accumulation(tmp_path, model_dir):
    """Embeddings and the first block frozen; micro-batches of one row each, so every micro-step has its own
    length and a per-micro-batch mean would weigh short rows up."""
    r = Recipe(steps=5, micro=1, accum=3, seq_len=48, lr=2e-3, weight_decay=0.1, warmup=1, schedule="linear",
               min_lr_ratio=0.1, max_grad_norm=None, seed=3)
    got = run_fsdp_ft(tmp_path / "run", model_dir, r, "finetune.method=partial", "finetune.freeze_embeddings=true",
                      "finetune.freeze_first_n_blocks=1")
    model = base_model(model_dir)
    frozen = ("model.embed_tokens.", "model.layers.0.")
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    want = reference(model, model_dir, r)
    assert want.history[2]["lr"] == pytest.approx(2e-3 * (0.1 + 0.9 * 0.75))  # step 3 of 5, warmup 1: linear
    assert_steps_match(got, want)
    weights = exported_weights(tmp_path / "run")
    assert_weights_match(weights, model.state_dict())
    for name, w in weights.items():  # the frozen part is bit for bit what was loaded
        if name.startswith(frozen):
            assert torch.equal(w, initial[name]), name


def test_lora_dropout_constant_schedule(tmp_path, model_dir):
    """LoRA with dropout 0.1 on its input. The adapters' initial values are read from a run at lr 0 (exported as
    a PEFT folder and loaded by peft itself): the reference takes fsdp_ft's seeded init as its input, not its
    arithmetic."""
    from peft import PeftModel, get_peft_model_state_dict

    lora = ["finetune.method=lora", "finetune.lora.r=4", "finetune.lora.alpha=8", "finetune.lora.dropout=0.1"]
    r = Recipe(steps=5, micro=2, accum=2, seq_len=64, lr=5e-3, weight_decay=0.1, warmup=1, schedule="constant",
               max_grad_norm=0.2, seed=1)
    init = tmp_path / "init"
    run_fsdp_ft(init, model_dir, Recipe(steps=1, micro=2, accum=1, seq_len=64, lr=0.0, seed=1), *lora)
    got = run_fsdp_ft(tmp_path / "run", model_dir, r, *lora)
    model = PeftModel.from_pretrained(base_model(model_dir), init / "final", is_trainable=True)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    want = reference(model, model_dir, r)
    assert [h["lr"] for h in want.history] == [5e-3] * 5
    assert any(h["grad_norm"] > r.max_grad_norm for h in want.history), "the case must clip"
    assert_steps_match(got, want)
    trained = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert_weights_match(trained, get_peft_model_state_dict(model))


def test_resume_restores_rng_and_data_position(tmp_path, model_dir):
    """3 steps, then a second `fsdp-ft train` resumes to 6: the same as 6 steps of the reference in one go. With
    dropout on, the resumed steps use the RNG state saved at step 3 (a fresh seed would repeat step 1's masks)."""
    r = Recipe(steps=6, micro=2, accum=2, seq_len=64, lr=3e-3, weight_decay=0.1, schedule="constant",
               max_grad_norm=1.0, seed=2)
    out = tmp_path / "run"
    first = Recipe(**{**vars(r), "steps": 3, "history": []})
    run_fsdp_ft(out, model_dir, first)
    assert sorted(losses(out)) == [1, 2, 3]
    assert (out / "checkpoints" / "step-3" / "rng-rank0.pt").is_file()
    got = run_fsdp_ft(out, model_dir, r, "resume=auto")
    model = base_model(model_dir)
    want = reference(model, model_dir, r)
    assert_steps_match(got, want)
    assert_weights_match(exported_weights(out), model.state_dict())


def test_dropout_is_on_in_these_cases(model_dir):
    """Guards the premise of the cases above: the model draws dropout masks in training mode."""
    model = base_model(model_dir)
    ids = torch.arange(2, 40).unsqueeze(0)
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    torch.manual_seed(1)
    b = model(input_ids=ids).logits
    model.eval()
    c = model(input_ids=ids).logits
    assert model.config.attention_dropout == 0.1
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
