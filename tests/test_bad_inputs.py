"""Bad inputs end in one actionable line (a UserError naming the key, file, line or row), never in a traceback, a
hang or a silent wrong result: non-UTF-8 and over-nested data, hostile or ambiguous YAML, a sequence length past
the model's position table, a metrics file cut mid-row, a predict output that would replace its input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ASSETS, TINY
from fsdp_ft.config import load_config
from fsdp_ft.errors import ConfigError, DataError

LATIN1 = "café crème".encode("latin-1")  # b"caf\xe9 cr\xe8me": \xe9 then a space is no UTF-8


# ---------------------------------------------------------------- data files that are not UTF-8

@pytest.mark.parametrize("name, body, line", [
    ("rows.jsonl", b'{"text": "fine"}\n{"text": "' + LATIN1 + b'"}\n', 2),
    ("rows.json", b'[{"text": "fine"},\n {"text": "' + LATIN1 + b'"}]\n', 2),
    ("rows.csv", b"text,label\nfine,a\n" + LATIN1 + b",b\n", 3),
])
def test_non_utf8_data_names_file_line_and_byte(tmp_path, name, body, line):
    from fsdp_ft.data.splits import load_table

    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(DataError) as e:  # today: .jsonl loads and fails later, bare; .json/.csv name no line
        load_table(str(path), "train", "data.train")
    offset = body.index(b"\xe9")
    msg = str(e.value)
    assert f"'{path}'" in msg and f"line {line}, byte offset {offset} (0xe9" in msg and "re-encode it as UTF-8" in msg
    assert "\n" not in msg


def test_json_nested_too_deeply_names_the_line(tmp_path):
    from fsdp_ft.data.splits import load_table

    deep = "[" * 1500 + "]" * 1500  # past Python's recursion limit (1000) and Arrow's JSON depth limit (1024)
    for name, body, line in (("deep.json", '[{"text": "a"},\n{"text": ' + deep + "}]", 2),
                             ("deep.jsonl", '{"text": "a"}\n{"text": "b"}\n{"x": ' + deep + "}\n", 3)):
        path = tmp_path / name
        path.write_text(body)
        with pytest.raises(DataError, match=rf"'{path}': line {line} nests JSON deeper than"):  # was RecursionError
            load_table(str(path), "train", "data.train")


# ---------------------------------------------------------------- YAML the config loader must refuse

def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_nested_too_deeply(tmp_path):
    for text in ("model:\n  path: " + "[" * 10_000 + "]" * 10_000 + "\n",  # flow style: RecursionError today
                 "".join("  " * i + f"k{i}:\n" for i in range(300)) + "  " * 300 + "x: 1\n"):  # block style
        path = _yaml(tmp_path, text)
        with pytest.raises(ConfigError, match=rf"^config file '{path}' line \d+: nesting deeper than 64 levels"):
            load_config(path)
    with pytest.raises(ConfigError, match=r"^override 'model.block_classes': nesting deeper than"):
        load_config(None, ["model.block_classes=" + "[" * 10_000 + "]" * 10_000])


def test_yaml_alias_bombs_and_cycles(tmp_path):
    # 10^6 values through aliases: a million-entry walk today, a billion with three more levels (a hang)
    bomb = ["x0: &x0 {" + ", ".join(f"k{j}: 1" for j in range(10)) + "}"]
    bomb += [f"x{i}: &x{i} {{" + ", ".join(f"k{j}: *x{i - 1}" for j in range(10)) + "}" for i in range(1, 6)]
    path = _yaml(tmp_path, "\n".join(bomb) + "\n")
    with pytest.raises(ConfigError, match=rf"^config file '{path}' line 5: aliases \(\*name\) expand to more than"):
        load_config(path)
    path = _yaml(tmp_path, "model: &m\n  path: x\n  sub: *m\n")  # a mapping that holds itself: RecursionError today
    with pytest.raises(ConfigError, match=rf"^config file '{path}' line 1: an alias refers to a node that contains it"):
        load_config(path)


def test_yaml_duplicate_keys_name_both_lines_but_overrides_last_wins(tmp_path):
    required = ["model.path=/m", "data.train=/t.jsonl"]
    path = _yaml(tmp_path, "output_dir: /tmp/x\noptim:\n  lr: 1.0e-4\n  weight_decay: 0.1\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError) as e:  # PyYAML keeps 3e-4 silently
        load_config(path, required)
    assert str(e.value) == (f"config file '{path}' line 5: key 'optim.lr' is given twice (line 3 and line 5; YAML "
                            "would silently keep the last): keep one")
    path = _yaml(tmp_path, "output_dir: /tmp/x\noptim:\n  lr: 1.0e-4\ntrain: {seed: 1}\noptim: {eps: 1.0e-6}\n")
    with pytest.raises(ConfigError, match="key 'optim' is given twice \\(line 2 and line 5"):
        load_config(path, required)
    # a merge key (<<) may be overridden, as YAML means it; the same override given twice: the last wins
    path = _yaml(tmp_path, "output_dir: /tmp/x\nmodel: {path: /m}\ndata: {train: /t.jsonl}\n"
                           "optim:\n  <<: {lr: 1.0e-4, eps: 1.0e-6}\n  lr: 3.0e-4\n")
    assert (load_config(path).optim.lr, load_config(path).optim.eps) == (3e-4, 1e-6)
    cfg = load_config(TINY, ["optim.lr=1e-3", "optim.lr=2e-3"])
    assert cfg.optim.lr == 2e-3


# ---------------------------------------------------------------- train.seq_len vs. the model's positions

def _cfg(model: str, *overrides: str):
    return load_config(TINY, [f"model.path={ASSETS / model}", *overrides])


@pytest.mark.parametrize("model, key, extra", [
    ("tiny-bert", "max_position_embeddings", ["task=seq_cls"]),  # learned absolute positions, 512 rows
    ("tiny-gpt2", "n_positions", []),
])
def test_seq_len_above_a_position_table_is_refused_before_the_model(model, key, extra):
    from fsdp_ft.model.build import load_hf_config

    cfg = _cfg(model, "train.seq_len=1024", *extra)
    with pytest.raises(ConfigError) as e:  # today: an index error at the first batch longer than 512
        load_hf_config(cfg, ASSETS / model)
    assert str(e.value).startswith(f"train.seq_len=1024 is more than the 512 positions model '{ASSETS / model}' has "
                                   f"({key}=512 in its config.json;")
    assert str(e.value).endswith("set train.seq_len to at most 512")
    assert load_hf_config(_cfg(model, "train.seq_len=512", *extra), ASSETS / model) is not None
    # prompt tuning puts its virtual tokens in front of every sequence
    prompt = _cfg(model, "train.seq_len=500", "finetune.method=prompt", "finetune.prompt.num_virtual_tokens=20", *extra)
    with pytest.raises(ConfigError, match=r"train.seq_len=500 \+ 20 virtual tokens .* at most 492$"):
        load_hf_config(prompt, ASSETS / model)


def test_rotary_model_past_max_positions_only_warns(capsys, monkeypatch):
    from fsdp_ft.model.build import load_hf_config

    monkeypatch.delenv("RANK", raising=False)
    load_hf_config(_cfg("tiny-llama", "train.seq_len=1024"), ASSETS / "tiny-llama")  # not refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning: train.seq_len=1024 is above max_position_embeddings=512" in err[0]
    monkeypatch.setenv("RANK", "1")
    load_hf_config(_cfg("tiny-llama", "train.seq_len=1024"), ASSETS / "tiny-llama")
    assert capsys.readouterr().err == ""  # rank 0 only


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    """Random tiny BERT and RoBERTa classifiers saved as HF folders, with the tiny tokenizer (1 token per word)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, RobertaConfig

    root = tmp_path_factory.mktemp("classifiers")
    bert = AutoConfig.from_pretrained(ASSETS / "tiny-bert", num_labels=2)
    roberta = RobertaConfig(**{k: v for k, v in bert.to_dict().items() if k not in ("model_type", "architectures")})
    out = {}
    for name, hf in (("bert", bert), ("roberta", roberta)):
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(hf).save_pretrained(root / name)
        for f in (ASSETS / "tiny-bert").iterdir():
            if f.name != "config.json":
                shutil.copy(f, root / name / f.name)
        out[name] = root / name
    return out


def _rows(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": "LABEL_0"}) + "\n" for t in texts))
    return path


LONG = "word " * 700  # 700+ tokens with the tiny tokenizer


def test_roberta_positions_start_after_padding(classifiers):
    """RoBERTa-style models number positions from pad_token_id + 1: the tiny one (pad 3, 512 rows) takes 508."""
    from fsdp_ft.model.build import load_hf_config

    folder = classifiers["roberta"]
    load_hf_config(load_config(TINY, [f"model.path={folder}", "task=seq_cls", "train.seq_len=508"]), folder)
    with pytest.raises(ConfigError, match="^train.seq_len=509 is more than the 508 positions"):
        load_hf_config(load_config(TINY, [f"model.path={folder}", "task=seq_cls", "train.seq_len=509"]), folder)


def test_eval_and_predict_past_the_position_table(classifiers, tmp_path):
    from fsdp_ft.inference.evaluate import evaluate_file
    from fsdp_ft.inference.loading import load_model
    from fsdp_ft.inference.predict import predict_file

    rows = _rows(tmp_path / "rows.jsonl", ["short text", LONG])
    loaded = load_model(str(classifiers["bert"]), ["train.seq_len=1024"])
    with pytest.raises(ConfigError, match="^train.seq_len=1024 is more than the 512 positions"):  # today: index error
        evaluate_file(loaded, str(rows))
    loaded = load_model(str(classifiers["bert"]))
    with pytest.raises(ConfigError, match="^--max-length=1024 is more than the 512 positions"):
        predict_file(loaded, str(rows), str(tmp_path / "out.jsonl"), max_length=1024)
    assert not (tmp_path / "out.jsonl").exists()
    # no --max-length: RoBERTa's table holds 512 rows, but only 508 positions after its padding id (3)
    loaded = load_model(str(classifiers["roberta"]))
    assert predict_file(loaded, str(rows), str(tmp_path / "out.jsonl")) == 2


# ---------------------------------------------------------------- predict's output vs. its input

def test_predict_refuses_to_write_over_its_input(classifiers, tmp_path):
    from fsdp_ft.inference.loading import load_model
    from fsdp_ft.inference.predict import predict_file

    loaded = load_model(str(classifiers["bert"]))
    rows = _rows(tmp_path / "rows.jsonl", ["one", "two"])
    before = rows.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(rows)
    for output in (rows, tmp_path / "link.jsonl", tmp_path / "sub" / ".." / "rows.jsonl"):
        with pytest.raises(ConfigError, match=f"^--output '{output}' is the --input file itself"):
            predict_file(loaded, str(rows), str(output))  # today: the input is replaced by the predictions
        assert rows.read_bytes() == before


def test_predict_failure_leaves_no_partial_file(classifiers, tmp_path, monkeypatch):
    from fsdp_ft.inference import predict
    from fsdp_ft.inference.loading import load_model

    loaded = load_model(str(classifiers["bert"]))
    rows = _rows(tmp_path / "rows.jsonl", ["one", "two", "three"])
    out = tmp_path / "out.jsonl"
    out.write_text("previous predictions\n")
    calls = []

    def dumps_then_fail(obj, *a, **k):
        calls.append(obj)
        if len(calls) == 2:
            raise OSError("disk full")
        return json.JSONEncoder().encode(obj)

    monkeypatch.setattr(predict.json, "dumps", dumps_then_fail)
    with pytest.raises(OSError, match="disk full"):
        predict.predict_file(loaded, str(rows), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "rows.jsonl"]  # today: a .tmp file is left
    assert out.read_text() == "previous predictions\n"


def test_predict_input_not_utf8(classifiers, tmp_path):
    from fsdp_ft.inference.loading import load_model
    from fsdp_ft.inference.predict import predict_file

    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "fine"}\n{"text": "' + LATIN1 + b'"}\n')
    offset = rows.read_bytes().index(b"\xe9")
    with pytest.raises(DataError, match=rf"^--input: file '{rows}' is not UTF-8 text: line 2, byte offset {offset} "):
        predict_file(load_model(str(classifiers["bert"])), str(rows), str(tmp_path / "out.jsonl"))  # today: "caf?"


# ---------------------------------------------------------------- metrics.jsonl cut mid-row by a killed run

ROWS = (b'{"split": "setup", "device": "cpu"}\n{"step": 1, "loss": 2.5, "lr": 0.001}\n'
        b'{"step": 2, "loss": 2.0, "lr": 0.001}\n')


def test_metrics_cut_last_line_is_skipped_and_counted_a_bad_middle_line_is_not(tmp_path):
    from fsdp_ft.observability import metrics
    from fsdp_ft.observability.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(ROWS + b'{"step": 3, "lo')
    assert [r.get("step") for r in read_metrics(tmp_path)] == [None, 1, 2]  # today: JSONDecodeError
    assert metrics.read_metrics_file(path)[1] == 1
    path.write_bytes(ROWS + b'{"step": 3, "lo\n{"step": 4, "loss": 1.0}\n')
    with pytest.raises(DataError, match=rf"^metrics file '{path}' line 4 is not valid JSON"):
        read_metrics(tmp_path)


def test_metrics_logger_after_a_cut_row_starts_a_new_line(tmp_path, capsys):
    from fsdp_ft.observability.metrics import MetricsLogger, read_metrics

    (tmp_path / "metrics.jsonl").write_bytes(ROWS + b'{"step": 3, "lo')
    MetricsLogger(tmp_path, True, 10, progress_bar=False).log({"step": 3, "loss": 1.5})  # a resumed run's row
    assert [r.get("step") for r in read_metrics(tmp_path)] == [None, 1, 2, 3]  # today: glued onto the cut row
    (tmp_path / "metrics.jsonl").write_bytes(ROWS + b'{"step": 3, "loss": 1.5}')  # whole, only its newline missing
    MetricsLogger(tmp_path, True, 10, progress_bar=False).log({"step": 4, "loss": 1.25})
    assert [r.get("step") for r in read_metrics(tmp_path)] == [None, 1, 2, 3, 4]


def test_report_of_a_run_killed_mid_row(tmp_path):
    from fsdp_ft.observability.report import render_run

    (tmp_path / "metrics.jsonl").write_bytes(ROWS + b'{"step": 3, "lo')
    page = render_run(tmp_path)  # today: JSONDecodeError
    assert "2 training rows" in page and "ends in a row cut short by a stopped run" in page
