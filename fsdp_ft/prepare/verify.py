"""Check that our loader (meta build + `_source_key` name mapping + `materialize`) gives the checkpoint's own model.

A checkpoint saved from a bare encoder (sentence-transformers folders have no `bert.` prefix) must still load
into the classifier's `bert.*` tensors; only the new classification head may be initialised.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fsdp_ft.errors import UserError

SAMPLES = ["This movie was a complete waste of two hours.", "An absolute delight from start to finish, with a "
           "wonderful cast and a script that never talks down to its audience."]


class LoaderMismatch(UserError):
    """Our loader's model differs from transformers' own load of the same folder."""


def verify_loader(model_dir: Path, tol: float = 1e-5) -> float:
    """Max |difference| of the encoder's hidden states and pooler output: ours vs AutoModel.from_pretrained."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from fsdp_ft.config import load_config
    from fsdp_ft.model.build import build_meta_model, load_hf_config, load_tokenizer
    from fsdp_ft.model.materialize import materialize, open_weight_source

    cfg = load_config(None, [f"model.path={model_dir}", "task=seq_cls", "data.train=unused.jsonl",
                             "output_dir=unused", "model.attn_implementation=eager"])
    tok = load_tokenizer(cfg, Path(model_dir))
    ours = build_meta_model(cfg, load_hf_config(cfg, Path(model_dir)), tok, ["negative", "positive"])
    mat = materialize(ours, open_weight_source(cfg, Path(model_dir), ours), seed=0, device=torch.device("cpu"))
    saved = set(ours.state_dict())  # non-persistent buffers (token_type_ids) are built, never saved
    unexpected = [n for n in mat["initialised"] if n in saved and not n.startswith("classifier.")]
    if unexpected:
        raise LoaderMismatch(f"'{model_dir}': these tensors were not found in the checkpoint: {unexpected[:5]} "
                             "(checkpoint names differ from the model's; see _source_key in fsdp_ft/model/build.py)")
    hf_logging.disable_progress_bar()
    ref = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    ours.eval()
    enc = tok(SAMPLES, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # as tasks/seq_cls.py calls it
    with torch.no_grad():
        a = ours.base_model(**batch)
        b = ref(**batch)
    mask = batch["attention_mask"].unsqueeze(-1).bool()
    diff = max((a.last_hidden_state - b.last_hidden_state).masked_fill(~mask, 0).abs().max().item(),
               (a.pooler_output - b.pooler_output).abs().max().item())
    if not diff <= tol:
        raise LoaderMismatch(f"'{model_dir}': our loaded encoder differs from AutoModel.from_pretrained by {diff:.2e} "
                             f"(> {tol:.0e})")
    return diff
