"""The chat SFT / preference-pair prepare step, on a small zip laid out like the `evals` wheel."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from fsdp_ft.prepare import evals_chat
from fsdp_ft.prepare.common import PrepareError


def _sample(name: str, i: int) -> dict:
    system = {"role": "system", "content": f"instruction of {name}"}
    if name == "quartz":
        return {"input": [system, {"role": "user", "content": f"question {i}\n\n A: more\n B: less"}],
                "ideal": "AB"[i % 2]}
    if name == "event_categories":
        return {"input": [system, {"role": "user", "content": f"log line {i}"}],
                "ideal": evals_chat.EVENT_LEVELS[i % 3]}
    return {"input": [system, {"role": "user", "content": f"{name} prompt {i}"}], "ideal": f"answer {i}"}


def fake_wheel(path: Path, n: int = 60) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name in evals_chat.SETS:
            rows = [_sample(name, i) for i in range(n)] + [_sample(name, 0)]  # one duplicate prompt
            z.writestr(f"evals/registry/data/{name}/samples.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    return path


SIZES = {"sft_train": 100, "sft_eval": 20, "pref_train": 80, "pref_eval": 20}


def _prompt(row: dict) -> str:
    msgs = row.get("messages") or row["chosen"]
    return json.dumps(msgs[:-1])


def test_splits_are_disjoint_and_pairs_differ_only_in_a_valid_wrong_answer(tmp_path):
    wheel = fake_wheel(tmp_path / "evals-3.0.1-py3-none-any.whl")
    splits, stats = evals_chat.build(wheel, seed=0, sizes=SIZES)
    assert {k: len(v) for k, v in splits.items()} == SIZES
    assert all(s["distinct_prompts"] == 60 for s in stats.values())  # the duplicate prompt is dropped
    assert not {_prompt(r) for r in splits["sft_train"]} & {_prompt(r) for r in splits["sft_eval"]}
    assert not {_prompt(r) for r in splits["pref_train"]} & {_prompt(r) for r in splits["pref_eval"]}
    for row in splits["sft_train"]:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    for row in splits["pref_train"] + splits["pref_eval"]:
        chosen, rejected = row["chosen"], row["rejected"]
        assert chosen[:-1] == rejected[:-1] and chosen[-1]["content"] != rejected[-1]["content"]
        if row["set"] == "quartz":
            assert {chosen[-1]["content"], rejected[-1]["content"]} == {"A", "B"}
        elif row["set"] == "event_categories":
            assert rejected[-1]["content"] in evals_chat.EVENT_LEVELS
        else:  # another sample's answer from the same set
            assert rejected[-1]["content"].startswith("answer ")
    # the right answer is the sample's own ideal
    for row in splits["sft_eval"]:
        i = int(row["messages"][1]["content"].split()[-1 if row["set"] != "quartz" else 1])
        assert row["messages"][-1]["content"] == _sample(row["set"], i)["ideal"]


def test_same_seed_same_files_other_seed_other_order(tmp_path):
    wheel = fake_wheel(tmp_path / "evals-3.0.1-py3-none-any.whl")
    a, _ = evals_chat.build(wheel, 0, SIZES)
    b, _ = evals_chat.build(wheel, 0, SIZES)
    c, _ = evals_chat.build(wheel, 1, SIZES)
    assert a == b and a != c


def test_too_many_rows_or_a_bad_sample_is_one_error(tmp_path):
    wheel = fake_wheel(tmp_path / "evals-3.0.1-py3-none-any.whl", n=30)
    with pytest.raises(PrepareError, match="set 'imperial_date_to_string' has 30 distinct prompts"):
        evals_chat.build(wheel, 0, SIZES)
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("evals/registry/data/imperial_date_to_string/samples.jsonl",
                   json.dumps(_sample("x", 1)) + "\n" + json.dumps({"input": "not a list", "ideal": "x"}) + "\n")
    with pytest.raises(PrepareError, match="line 2: expected input"):
        evals_chat.read_set(bad, "imperial_date_to_string")
