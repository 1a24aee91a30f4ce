"""Chat SFT data and preference pairs from the prompt -> answer sets in the `evals` wheel, built reproducibly.

    python -m fsdp_ft.prepare.evals_chat [--out data] [--seed S] [--sft-train N --sft-eval N]
                                         [--pref-train N --pref-eval N]

The `evals` wheel (OpenAI's eval registry, MIT) holds chat-format samples: `input` is a list of
{role, content} messages (a system instruction and a user turn) and `ideal` the reference answer. It is only
downloaded and read as a zip, never installed. Four English sets with short, checkable answers are used:

- `imperial_date_to_string`: an ISO date -> "Weekday, Month D, YYYY." (the instruction calls it mm-dd-yyyy);
- `quartz`: QuaRTz qualitative-relationship questions with two or three lettered options -> the letter;
- `event_categories`: a Windows event log line -> Information, Warning or Error;
- `soc_codes`: a job title -> its US Bureau of Labor Statistics occupation title.

SFT rows (`data/chat/`): {"messages": [...input, {"role": "assistant", "content": ideal}], "set": name}.
Preference rows (`data/pref/`): {"chosen": messages + correct answer, "rejected": messages + a wrong answer,
"set": name}. The wrong answer is another valid answer of the same set (another option letter, another event
level, another sample's date or occupation title), so a model can only prefer the right one by reading the
prompt. Sample order is a seeded shuffle per set, rows are spread over the splits by set in fixed shares, and
no prompt is on both sides of a split; the same seed gives the same files byte for byte.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import zipfile
from pathlib import Path

from fsdp_ft.errors import UserError
from fsdp_ft.prepare.common import PrepareError, pip, sha256
from fsdp_ft.prepare.imdb import write_jsonl

PACKAGE = "evals"
SETS = {  # name -> share of each split; the date set is the easiest to learn and to read in generations
    "imperial_date_to_string": 0.3,
    "quartz": 0.3,
    "event_categories": 0.2,
    "soc_codes": 0.2,
}
EVENT_LEVELS = ("Information", "Warning", "Error")


def download_wheel(cache: Path) -> Path:
    found = sorted(cache.glob("evals-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        pip("download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", str(cache))
        found = sorted(cache.glob("evals-*.whl"))
    if not found:
        raise PrepareError(f"pip download {PACKAGE} left no evals-*.whl in '{cache}'")
    return found[-1]


def read_set(wheel: Path, name: str) -> list[dict]:
    """The set's samples as {"messages", "answer"}, each checked for the chat shape we rely on."""
    member = f"evals/registry/data/{name}/samples.jsonl"
    try:
        with zipfile.ZipFile(wheel) as z:
            lines = z.read(member).decode("utf-8").splitlines()
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise PrepareError(f"'{wheel}' does not hold {member}: {e}; delete it and rerun") from None
    out, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise PrepareError(f"{wheel}:{member} line {n} is not JSON: {e}") from None
        msgs, ideal = rec.get("input"), rec.get("ideal")
        if isinstance(ideal, list) and ideal:
            ideal = ideal[0]
        ok = (isinstance(msgs, list) and msgs and isinstance(ideal, str) and ideal.strip()
              and all(isinstance(m, dict) and m.get("role") in ("system", "user") and isinstance(m.get("content"), str)
                      for m in msgs))
        if not ok:
            raise PrepareError(f"{wheel}:{member} line {n}: expected input=[system/user messages] and a string ideal")
        msgs = [{"role": m["role"], "content": m["content"].strip()} for m in msgs]
        key = json.dumps(msgs)
        if key in seen:  # the same prompt twice would let it sit on both sides of a split
            continue
        seen.add(key)
        out.append({"messages": msgs, "answer": ideal.strip(), "set": name})
    return out


def wrong_answer(row: dict, pool: list[dict], rng: random.Random) -> str:
    """A valid answer of the same set that is not this row's answer."""
    if row["set"] == "quartz":
        letters = re.findall(r"^\s*([A-E]):", row["messages"][-1]["content"], flags=re.M)
        others = [x for x in letters if x != row["answer"]]
        if others:
            return rng.choice(others)
    if row["set"] == "event_categories" and row["answer"] in EVENT_LEVELS:
        return rng.choice([x for x in EVENT_LEVELS if x != row["answer"]])
    while True:
        other = rng.choice(pool)["answer"]
        if other != row["answer"]:
            return other


def split_counts(total: int) -> dict[str, int]:
    counts = {name: int(total * share) for name, share in SETS.items()}
    counts[next(iter(SETS))] += total - sum(counts.values())
    return counts


def build(wheel: Path, seed: int, sizes: dict[str, int]) -> tuple[dict[str, list[dict]], dict]:
    """Splits sft_train, sft_eval, pref_train, pref_eval: disjoint prompts within SFT and within preference."""
    splits = {k: [] for k in sizes}
    stats = {}
    for name in SETS:
        rows = read_set(wheel, name)
        rng = random.Random(f"{seed}-{name}")
        rng.shuffle(rows)
        need = {k: split_counts(v)[name] for k, v in sizes.items()}
        sft_need, pref_need = need["sft_eval"] + need["sft_train"], need["pref_eval"] + need["pref_train"]
        if max(sft_need, pref_need) > len(rows):
            raise PrepareError(f"set '{name}' has {len(rows)} distinct prompts; the requested sizes need "
                               f"{max(sft_need, pref_need)} — ask for fewer rows")
        stats[name] = {"distinct_prompts": len(rows), **need}
        splits["sft_eval"] += rows[:need["sft_eval"]]
        splits["sft_train"] += rows[need["sft_eval"]:sft_need]
        # preference pairs come from the same shuffled list, counted from the far end: eval first there too
        back = rows[::-1]
        splits["pref_eval"] += back[:need["pref_eval"]]
        splits["pref_train"] += back[need["pref_eval"]:pref_need]
    out = {}
    for key, rows in splits.items():
        random.Random(f"{seed}-{key}").shuffle(rows)
        if key.startswith("sft"):
            out[key] = [{"messages": r["messages"] + [{"role": "assistant", "content": r["answer"]}], "set": r["set"]}
                        for r in rows]
        else:
            rng = random.Random(f"{seed}-{key}-wrong")
            pool_by_set = {}
            for r in rows:
                pool_by_set.setdefault(r["set"], []).append(r)
            out[key] = [{"chosen": r["messages"] + [{"role": "assistant", "content": r["answer"]}],
                         "rejected": r["messages"] + [{"role": "assistant",
                                                       "content": wrong_answer(r, pool_by_set[r["set"]], rng)}],
                         "set": r["set"]} for r in rows]
    return out, stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fsdp_ft.prepare.evals_chat", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data", help="folder for downloads/, chat/ and pref/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-train", type=int, default=1600)
    p.add_argument("--sft-eval", type=int, default=200)
    p.add_argument("--pref-train", type=int, default=1200)
    p.add_argument("--pref-eval", type=int, default=300)
    args = p.parse_args(argv)
    out = Path(args.out)
    sizes = {"sft_train": args.sft_train, "sft_eval": args.sft_eval, "pref_train": args.pref_train,
             "pref_eval": args.pref_eval}
    try:
        wheel = download_wheel(out / "downloads")
        splits, stats = build(wheel, args.seed, sizes)
        for key, rows in splits.items():
            folder = out / ("chat" if key.startswith("sft") else "pref")
            folder.mkdir(parents=True, exist_ok=True)
            write_jsonl(rows, folder / f"{key.split('_')[1]}.jsonl")
        manifest = {"source": wheel.name, "source_sha256": sha256(wheel), "seed": args.seed, "sizes": sizes,
                    "sets": stats}
        for folder in ("chat", "pref"):
            (out / folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"[prepare] chat SFT {args.sft_train}/{args.sft_eval} rows in {out / 'chat'}, preference pairs "
              f"{args.pref_train}/{args.pref_eval} in {out / 'pref'}", file=sys.stderr)
    except UserError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
