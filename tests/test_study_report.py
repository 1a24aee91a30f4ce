"""`fsdp-ft report` of a search: real Optuna studies laid out as `fsdp-ft tune` lays them out, rendered to one page;
the numbers read back from its tables and charts are the ones the test told the study."""
from __future__ import annotations

import html
import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from fsdp_ft.errors import UserError
from fsdp_ft.tuning.study import Record
from test_report import _chart, axis_tolerance, chart_points, headless

optuna = pytest.importorskip("optuna")

ACCURACY = {"metric": "accuracy", "direction": "maximize", "source": "eval"}
LR, METHOD, WARMUP = "optim.lr", "finetune.method", "optim.warmup_steps"
# trial number -> (params, how it ends); told values are what the charts must show
TRIALS = {
    0: ({LR: 1e-4, METHOD: "lora", WARMUP: 0}, ("COMPLETE", 0.62)),
    1: ({LR: 1e-3, METHOD: "full", WARMUP: 5}, ("COMPLETE", 0.70)),
    2: ({LR: 1e-5, METHOD: "lora", WARMUP: 10}, ("PRUNED", None)),
    3: ({LR: 3e-4, METHOD: "full", WARMUP: 20}, ("COMPLETE", 0.66)),
    4: ({LR: 1e-2, METHOD: "lora", WARMUP: 15}, ("FAIL", None)),
    5: ({LR: 5e-5, METHOD: "full", WARMUP: 0}, ("COMPLETE", 0.75)),
    6: ({LR: 2e-4, METHOD: "lora", WARMUP: 5}, ("RUNNING", None)),
    7: ({LR: 4e-4, METHOD: "full", WARMUP: 10}, ("WAITING", None)),
}
REPORTED = {0: {1: 0.5, 2: 0.6}, 2: {1: 0.3, 2: 0.35}}  # trial -> step -> intermediate value
FAIL_REASON = "CUDA out of memory at step 3"
USER_ATTRS = {0: {"tokens": 4096, "peak_mem_bytes": 3 * 2 ** 30}}


def new_study(out: Path, objectives: list[dict], trials: int = 8, name: str = "study-under-test"):
    """An empty study in `out` as the search creates it: a journal file beside tune.json."""
    out.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    study = optuna.create_study(study_name=name, storage=storage, directions=[o["direction"] for o in objectives])
    Record(study_name=name, storage=f"journal:{out / 'study.journal'}", fingerprint="x", objectives=objectives,
           pruner="median", sampler="tpe", seed=0, trials=trials).write(out)
    return study


def suggest(trial, params: dict) -> None:
    """The space of these tests; the enqueued values come back from each suggest."""
    assert trial.suggest_float(LR, 1e-5, 1e-2, log=True) == params[LR]
    assert trial.suggest_categorical(METHOD, ["lora", "full"]) == params[METHOD]
    assert trial.suggest_int(WARMUP, 0, 20, step=5) == params[WARMUP]


def build_single(out: Path):
    study = new_study(out, [ACCURACY])
    for number, (params, (state, value)) in TRIALS.items():
        study.enqueue_trial(params)
        if state == "WAITING":
            continue
        trial = study.ask()
        assert trial.number == number
        suggest(trial, params)
        for step, v in REPORTED.get(number, {}).items():
            trial.report(v, step)
        for k, v in USER_ATTRS.get(number, {}).items():
            trial.set_user_attr(k, v)
        if state == "COMPLETE":
            study.tell(trial, value)
        elif state == "PRUNED":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif state == "FAIL":
            trial.set_user_attr("fail_reason", FAIL_REASON)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return study


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, str]:
    from fsdp_ft.tuning.report import write_study_report

    out = tmp_path_factory.mktemp("study") / "search"
    build_single(out)
    path = write_study_report(out)
    assert path == out / "report.html"
    return out, path.read_text()


def table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the first table after the <h2> `heading`, header row included."""
    section = text.split(f"<h2>{heading}</h2>", 1)[1]
    table = re.search(r"<table>.*?</table>", section, flags=re.S).group(0)
    return [[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)]


def header(text: str) -> dict[str, str]:
    return {label: value for label, value in table_after(text, "Study")}


def close_points(text: str, title: str, points: list[tuple[float, float]]) -> list:
    """`points` as approximate values within what 0.1 px coordinates can keep."""
    tol_x, tol_y = axis_tolerance(text, title)
    return [(pytest.approx(x, abs=tol_x), pytest.approx(y, abs=tol_y)) for x, y in points]


def complete_values() -> dict[int, float]:
    return {n: end[1] for n, (_, end) in TRIALS.items() if end[0] == "COMPLETE"}


def test_header_counts_states_and_names_the_best_trial(single):
    out, text = single
    facts = header(text)
    assert facts["study name"] == "study-under-test"
    assert facts["storage"] == f"journal:{out / 'study.journal'}"
    assert (facts["sampler"], facts["pruner"], facts["objective"]) == ("tpe", "median", "accuracy (maximize)")
    states = [end[0] for _, end in TRIALS.values()]
    for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"):
        assert int(facts[f"trials {state}"]) == states.count(state) == (4 if state == "COMPLETE" else 1), state
    assert (int(facts["trials"]), int(facts["budget (trials)"])) == (8, 8)
    best = max(complete_values(), key=complete_values().get)
    assert int(facts["best trial"]) == best == 5
    assert float(facts["best accuracy"]) == 0.75
    assert facts["best params"] == f"{LR}=5e-05, {METHOD}=full, {WARMUP}=0"


def test_trials_table_has_a_row_per_trial_with_its_facts(single):
    out, text = single
    rows = table_after(text, "Trials")
    head, body = rows[0], {int(r[0]): dict(zip(rows[0], r)) for r in rows[1:]}
    assert head == ["trial", "state", LR, METHOD, WARMUP, "accuracy", "last step", "wall time", "tokens",
                    "peak memory", "fail reason"]
    assert sorted(body) == list(TRIALS)
    durations = {t.number: t.duration for t in optuna.load_study(
        study_name="study-under-test", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))).trials}
    for number, (params, (state, value)) in TRIALS.items():
        row = body[number]
        assert row["state"] == state
        if state != "WAITING":
            assert float(row[LR]) == params[LR] and row[METHOD] == params[METHOD] and int(row[WARMUP]) == params[WARMUP]
        if state == "COMPLETE":
            assert float(row["accuracy"]) == value
        if state in ("COMPLETE", "PRUNED", "FAIL"):
            assert float(row["wall time"].removesuffix(" s")) == pytest.approx(
                durations[number].total_seconds(), rel=5e-3)
        else:
            assert row["wall time"] == ""
        assert row["last step"] == (str(max(REPORTED[number])) if number in REPORTED else "")
        assert row["fail reason"] == (FAIL_REASON if state == "FAIL" else "")
    assert float(body[2]["accuracy"]) == REPORTED[2][2]  # a pruned trial's value: its last report
    assert (body[0]["tokens"], body[0]["peak memory"]) == ("4,096", "3.00 GiB")
    assert (body[1]["tokens"], body[1]["peak memory"]) == ("", "")


def test_objective_chart_shows_the_told_values_and_the_running_best(single):
    _, text = single
    told = complete_values()
    title = "accuracy by trial"
    assert chart_points(text, title, "accuracy") == close_points(text, title, list(told.items()))
    running = list(itertools.accumulate(told.values(), max))
    assert running == [0.62, 0.70, 0.70, 0.75]
    title = "Best accuracy so far (maximize)"
    assert chart_points(text, title, "best so far") == close_points(text, title, list(zip(told, running)))


def test_best_so_far_follows_a_minimized_objective(tmp_path):
    from fsdp_ft.tuning.report import render_study

    losses = [2.0, 2.5, 1.5, 1.8, 1.2]
    study = new_study(tmp_path, [{"metric": "loss", "direction": "minimize", "source": "eval"}], trials=5)
    for i, loss in enumerate(losses):
        study.enqueue_trial({"x": float(i)})
        trial = study.ask()
        trial.suggest_float("x", 0.0, 10.0)
        study.tell(trial, loss)
    text = render_study(tmp_path)
    running = list(itertools.accumulate(losses, min))
    assert running == [2.0, 2.0, 1.5, 1.5, 1.2]
    title = "Best loss so far (minimize)"
    assert chart_points(text, title, "best so far") == close_points(text, title, list(enumerate(running)))
    assert header(text)["best trial"] == "4" and header(text)["objective"] == "loss (minimize)"
    assert chart_points(text, "loss vs x", "loss") == close_points(text, "loss vs x", list(enumerate(losses)))


def test_intermediate_values_of_every_reporting_trial(single):
    _, text = single
    title = "Intermediate values"
    assert set(re.findall(r'data-series="([^"]+)"', _chart(text, title))) == {"trial 0", "trial 2 (pruned)"}
    for number, name in ((0, "trial 0"), (2, "trial 2 (pruned)")):
        assert chart_points(text, title, name) == close_points(text, title, list(REPORTED[number].items()))


def test_parameter_charts_put_each_value_on_x(single):
    _, text = single
    done = [n for n, (_, end) in TRIALS.items() if end[0] == "COMPLETE"]
    told = complete_values()
    xs = {LR: [math.log10(TRIALS[n][0][LR]) for n in done],
          METHOD: [["lora", "full"].index(TRIALS[n][0][METHOD]) for n in done],
          WARMUP: [TRIALS[n][0][WARMUP] for n in done]}
    assert xs[LR] == pytest.approx([-4, -3, math.log10(3e-4), math.log10(5e-5)])
    for param, x in xs.items():
        title = f"accuracy vs {param}"
        assert chart_points(text, title, "accuracy") == close_points(text, title, list(zip(x, told.values())))
    assert ">log10(optim.lr)</text>" in _chart(text, f"accuracy vs {LR}")
    assert ">finetune.method (choice index: 0 = lora, 1 = full)</text>" in _chart(text, f"accuracy vs {METHOD}")
    assert f">{WARMUP}</text>" in _chart(text, f"accuracy vs {WARMUP}")
    # scatter: the points are markers, the polyline joining them is not drawn
    assert 'stroke-width="0" data-series="accuracy"' in _chart(text, f"accuracy vs {LR}")
    assert _chart(text, f"accuracy vs {LR}").count("<circle") == len(done)


def test_importances_share_the_variation_between_the_parameters(single):
    _, text = single
    rows = table_after(text, "Parameter importances")
    assert rows[0] == ["parameter", "share"]
    assert sorted(r[0] for r in rows[1:]) == sorted([LR, METHOD, WARMUP])
    assert sum(float(r[1].removesuffix("%")) for r in rows[1:]) == pytest.approx(100, abs=0.2)


def test_importances_are_skipped_with_a_note_when_nothing_varies(tmp_path):
    from fsdp_ft.tuning.report import render_study

    study = new_study(tmp_path, [ACCURACY])
    for value in (0.5, 0.6):
        study.enqueue_trial({"x": 1.0})
        trial = study.ask()
        trial.suggest_float("x", 0.0, 10.0)
        study.tell(trial, value)
    section = render_study(tmp_path).split("<h2>Parameter importances</h2>", 1)[1]
    assert section.lstrip().startswith("<p>Not estimated: importances need at least 2 complete trials")
    assert "<table>" not in section



def dominated(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """`a` (maximize, minimize) is dominated by `b`: no worse in both, better in one."""
    return b[0] >= a[0] and b[1] <= a[1] and b != a


def test_two_objectives_show_their_pareto_front(tmp_path):
    from fsdp_ft.tuning.report import render_study

    told = {0: (0.80, 100.0), 1: (0.90, 200.0), 2: (0.70, 150.0), 3: (0.90, 250.0), 4: (0.60, 50.0)}
    objectives = [ACCURACY, {"metric": "wall_s", "direction": "minimize", "source": "run"}]
    study = new_study(tmp_path, objectives, trials=6)
    for number, values in told.items():
        study.enqueue_trial({"x": float(number)})
        trial = study.ask()
        trial.suggest_float("x", 0.0, 10.0)
        study.tell(trial, list(values))
    pruned = study.ask()
    pruned.suggest_float("x", 0.0, 10.0)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    text = render_study(tmp_path)

    front = [n for n, v in told.items() if not any(dominated(v, w) for w in told.values())]
    assert front == [0, 1, 4]
    rows = table_after(text, "Pareto front")
    assert rows[0] == ["trial", "x", "accuracy", "wall_s"]
    assert [int(r[0]) for r in rows[1:]] == front
    assert [(float(r[2]), float(r[3])) for r in rows[1:]] == [told[n] for n in front]
    assert header(text)["Pareto front"] == "0, 1, 4"
    assert header(text)["objectives"] == "accuracy (maximize); wall_s (minimize)"

    title = "Pareto front: accuracy vs wall_s"
    assert chart_points(text, title, "complete trials") == close_points(text, title, list(told.values()))
    assert chart_points(text, title, "Pareto front") == close_points(
        text, title, sorted(told[n] for n in front))
    for i, name in enumerate(("accuracy", "wall_s")):
        assert chart_points(text, f"{name} by trial", name) == close_points(
            text, f"{name} by trial", [(n, v[i]) for n, v in told.items()])
    assert "so far" not in text and "Parameter importances" not in text and "best trial" not in text


def test_an_empty_study_renders_with_a_line_saying_so(tmp_path):
    from fsdp_ft.tuning.report import write_study_report

    new_study(tmp_path / "search", [ACCURACY], trials=6)
    text = write_study_report(tmp_path / "search", tmp_path / "page" / "study.html").read_text()
    assert "<p>No trials yet: the search has not started one.</p>" in text
    assert "<svg" not in text and not (tmp_path / "search" / "report.html").exists()
    facts = header(text)
    assert (facts["trials"], facts["trials COMPLETE"], facts["budget (trials)"]) == ("0", "0", "6")
    assert facts["best trial"] == "no trial has completed"


def test_report_of_a_folder_that_is_no_search(tmp_path):
    from fsdp_ft.tuning.report import write_study_report

    with pytest.raises(UserError) as e:
        write_study_report(tmp_path)
    assert str(e.value).splitlines() == [f"'{tmp_path}' holds no search (tune.json is missing): start one with "
                                         "`fsdp-ft tune`"]


def test_report_of_a_study_its_storage_does_not_hold(tmp_path):
    from fsdp_ft.tuning.report import write_study_report

    new_study(tmp_path, [ACCURACY])
    record = Record.read(tmp_path)
    record.study_name = "another-study"
    record.write(tmp_path)
    with pytest.raises(UserError) as e:
        write_study_report(tmp_path)
    assert str(e.value).splitlines() == [f"'{tmp_path / 'tune.json'}' names study 'another-study', which storage "
                                         f"'journal:{tmp_path / 'study.journal'}' does not hold (was the storage "
                                         "moved or cleared?)"]


def test_page_is_self_contained_and_the_module_imports_lightly(single):
    _, text = single
    assert "<script" not in text and "<link" not in text and " src=" not in text
    assert re.findall(r"https?://[^\"' ]+", text) == ["http://www.w3.org/2000/svg"] * text.count("<svg")
    code = ("import sys, fsdp_ft.tuning.report; bad = {'torch', 'optuna'} & set(sys.modules); "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_chromium_renders_the_study_page(single, tmp_path):
    out, text = single
    titles = re.findall(r'<text [^>]*class="title">([^<]+)</text>', text)
    assert titles == ["accuracy by trial", "Best accuracy so far (maximize)", f"accuracy vs {LR}",
                      f"accuracy vs {METHOD}", f"accuracy vs {WARMUP}", "Intermediate values"]
    page = (out / "report.html").as_uri()
    dom = headless("--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<svg") == len(titles)
    for title in titles:
        assert f">{html.escape(title)}</text>" in dom.stdout
    assert f"<td>{FAIL_REASON}</td>" in dom.stdout
    shot = tmp_path / "study.png"
    proc = headless(f"--screenshot={shot}", "--window-size=1280,1600", page)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pil = pytest.importorskip("PIL.Image")
    img = pil.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    background = max(colors)[1]
    assert sum(n for n, c in colors if c != background) > 0.03 * img.size[0] * img.size[1]  # not blank
    assert any(c == (0x00, 0x72, 0xB2) for _, c in colors)  # the first series' colour: markers were drawn


def test_importances_that_fail_leave_a_note_and_the_rest_of_the_page(single, monkeypatch):
    from fsdp_ft.tuning.report import render_study

    def refuse(study, **kw):
        raise RuntimeError("the estimator refuses\nsecond line")

    monkeypatch.setattr(optuna.importance, "get_param_importances", refuse)
    text = render_study(single[0])
    section = text.split("<h2>Parameter importances</h2>", 1)[1]
    assert section.lstrip().startswith("<p>Not estimated: the estimator refuses</p>")
    assert "second line" not in text and "accuracy by trial" in text
