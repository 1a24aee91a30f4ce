"""`fsdp-ft report OUTPUT_DIR` of a search: the study as one self-contained HTML page, like a run's report.

The page holds inline SVG charts (`svgplot`) and tables, no scripts and no links, so it opens offline and can be
mailed or archived as one file. Optuna is imported inside the functions: the CLI imports this module cheaply.
"""
from __future__ import annotations

import html
import math
import re
from pathlib import Path

from fsdp_ft.observability.svgplot import Series, fmt_cell, line_chart, page, save_page, table_html
from fsdp_ft.observability.units import fmt_bytes
from fsdp_ft.tuning.study import Record, StudyError, load, masked

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def write_study_report(output_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the page (default OUTPUT_DIR/report.html) and return its path."""
    return save_page(render_study(output_dir), output_dir, out)


def render_study(output_dir: str | Path) -> str:
    study, record = open_study(output_dir)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    names = objective_names(study, record)
    multi = len(study.directions) > 1
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    body = ["<h2>Study</h2>", table_html(None, header_rows(study, record, trials, names))]
    if not trials:
        body.append("<p>No trials yet: the search has not started one.</p>")
    else:
        body += ["<h2>Trials</h2>", table_html(*trials_table(trials, names))]
        if multi:
            body += ["<h2>Pareto front</h2>", pareto_table(study, names)]
        if not complete:
            body.append("<p>No trial has completed yet: the charts of objective values are empty.</p>")
        body += ["<h2>Charts</h2>", '<div class="charts">', *study_charts(study, trials, names), "</div>"]
        if not multi:
            body += ["<h2>Parameter importances</h2>", importance_html(study, complete)]
    sub = f"{Path(output_dir).resolve()} — {len(trials)} trials of a budget of {record.trials}"
    return page(f"fsdp-ft study report: {record.study_name}", sub, body)


def open_study(output_dir: str | Path):
    """The study and its record; one line when tune.json names a study its storage does not hold."""
    try:
        return load(output_dir)
    except KeyError:  # Optuna's answer for an unknown study name
        record = Record.read(output_dir)
        raise StudyError(f"'{Path(output_dir) / 'tune.json'}' names study '{record.study_name}', which storage "
                         f"'{masked(record.storage)}' does not hold (was the storage moved or cleared?)") from None


def objective_names(study, record) -> list[str]:
    """The metric of each objective, from tune.json (Optuna's own names as a fallback)."""
    names = [o.get("metric") for o in record.objectives]
    if len(names) != len(study.directions) or not all(names):
        names = study.metric_names or [f"objective {i + 1}" for i in range(len(study.directions))]
    return names


def header_rows(study, record, trials, names) -> list[list]:
    counts = {state: 0 for state in STATES}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    objectives = "; ".join(f"{name} ({d.name.lower()})" for name, d in zip(names, study.directions))
    rows = [["study name", record.study_name], ["storage", masked(record.storage)], ["sampler", record.sampler],
            ["pruner", record.pruner], ["objectives" if len(names) > 1 else "objective", objectives],
            ["trials", len(trials)], *([f"trials {state}", counts[state]] for state in STATES),
            ["budget (trials)", record.trials]]
    if len(study.directions) > 1:
        front = study.best_trials if any(t.state.name == "COMPLETE" for t in trials) else []
        rows.append(["Pareto front", ", ".join(str(t.number) for t in sorted(front, key=lambda t: t.number))
                     or "no trial has completed"])
        return rows
    best = best_trial(study, trials)
    if best is None:
        return rows + [["best trial", "no trial has completed"]]
    return rows + [["best trial", best.number], ["best params", params_text(best.params)],
                   [f"best {names[0]}", best.value]]


def best_trial(study, trials):
    if not any(t.state.name == "COMPLETE" for t in trials):
        return None
    return study.best_trial


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={fmt_cell(v)}" for k, v in params.items())


def param_names(trials) -> list[str]:
    """Every parameter any trial has, in the order they first appear (conditional ones are missing in some)."""
    names: list[str] = []
    for t in trials:
        names += [k for k in t.params if k not in names]
    return names


def trials_table(trials, names) -> tuple[list[str], list[list]]:
    params = param_names(trials)
    has_tokens = any("tokens" in t.user_attrs for t in trials)
    has_mem = any("peak_mem_bytes" in t.user_attrs for t in trials)
    has_reason = any("fail_reason" in t.user_attrs for t in trials)
    header = ["trial", "state", *params, *names, "last step", "wall time"]
    header += ["tokens"] * has_tokens + ["peak memory"] * has_mem + ["fail reason"] * has_reason
    rows = []
    for t in trials:
        values = t.values or [None] * len(names)
        row = [t.number, t.state.name, *(t.params.get(p, "") for p in params),
               *("" if v is None else v for v in values),
               "" if t.last_step is None else t.last_step, fmt_seconds(t.duration)]
        if has_tokens:
            row.append(t.user_attrs.get("tokens", ""))
        if has_mem:
            mem = t.user_attrs.get("peak_mem_bytes")
            row.append(fmt_bytes(mem) if isinstance(mem, (int, float)) else "")
        if has_reason:
            row.append(t.user_attrs.get("fail_reason", "") if t.state.name == "FAIL" else "")
        rows.append(row)
    return header, rows


def fmt_seconds(duration) -> str:
    """A trial's wall time; empty while it has not finished."""
    if duration is None:
        return ""
    s = duration.total_seconds()
    if s < 60:
        return f"{s:.3g} s"
    minutes, s = divmod(round(s), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def pareto_table(study, names) -> str:
    front = sorted(study.best_trials, key=lambda t: t.number) if any(
        t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)) else []
    if not front:
        return "<p>No trial has completed yet.</p>"
    params = param_names(front)
    return table_html(["trial", *params, *names],
                      [[t.number, *(t.params.get(p, "") for p in params), *t.values] for t in front])


def study_charts(study, trials, names) -> list[str]:
    """Objective by trial (with the best so far for one objective), each parameter against each objective, the
    values trials reported while training, and for two objectives their Pareto front."""
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    xs = [t.number for t in complete]
    charts = []
    for i, (name, direction) in enumerate(zip(names, study.directions)):
        ys = [t.values[i] for t in complete]
        chart = line_chart([Series(name, xs, ys, markers=True)], f"{name} by trial", x_label="trial", y_label=name)
        charts.append(without_lines(chart, {name}))
        if len(names) == 1:  # a chart of its own: a legend would cover the best values in the top corner
            best = Series("best so far", xs, best_so_far(ys, direction.name == "MAXIMIZE"), markers=True)
            charts.append(line_chart([best], f"Best {name} so far ({direction.name.lower()})", x_label="trial",
                                     y_label=name))
    params = param_names(complete)
    for i, name in enumerate(names):
        for p in params:
            x_label, points = param_axis(p, complete, i)
            chart = line_chart([Series(name, [x for x, _ in points], [y for _, y in points], markers=True)],
                               f"{name} vs {p}", x_label=x_label, y_label=name)
            charts.append(without_lines(chart, {name}))
    reported = [t for t in trials if t.intermediate_values]
    if reported:
        series = []
        for t in reported:
            steps = sorted(t.intermediate_values)
            label = f"trial {t.number}" + (" (pruned)" if t.state.name == "PRUNED" else "")
            series.append(Series(label, steps, [t.intermediate_values[s] for s in steps], markers=True))
        steps = [x for one in series for x in one.xs]
        charts.append(line_chart(series, "Intermediate values", x_label="step", y_label=f"{names[0]} (reported)",
                                 x_range=legend_room(steps)))
    if len(names) == 2:
        charts.append(pareto_chart(study, complete, names))
    return charts


def best_so_far(values: list[float], maximize: bool) -> list[float]:
    out: list[float] = []
    for v in values:
        out.append(v if not out else (max if maximize else min)(out[-1], v))
    return out


def param_axis(name: str, trials, objective: int) -> tuple[str, list[tuple[float, float]]]:
    """The x label and (x, objective) points of a parameter: categorical choices by index, log-scaled values as
    log10, so every axis is numeric and evenly spread where the sampler searched."""
    import optuna.distributions as d

    dist = next(t.distributions[name] for t in trials if name in t.distributions)
    have = [t for t in trials if name in t.params]
    if isinstance(dist, d.CategoricalDistribution):
        shown = ", ".join(f"{i} = {c}" for i, c in enumerate(dist.choices[:4]))
        label = f"{name} (choice index: {shown}{', …' if len(dist.choices) > 4 else ''})"
        return label, [(dist.choices.index(t.params[name]), t.values[objective]) for t in have]
    if getattr(dist, "log", False):
        return f"log10({name})", [(math.log10(t.params[name]), t.values[objective]) for t in have]
    return name, [(t.params[name], t.values[objective]) for t in have]


def pareto_chart(study, complete, names) -> str:
    front = sorted(study.best_trials, key=lambda t: t.values[0]) if complete else []
    series = [Series("complete trials", [t.values[0] for t in complete], [t.values[1] for t in complete],
                     markers=True),
              Series("Pareto front", [t.values[0] for t in front], [t.values[1] for t in front], markers=True)]
    chart = line_chart(series, f"Pareto front: {names[0]} vs {names[1]}", x_label=names[0], y_label=names[1],
                       x_range=legend_room(series[0].xs))
    return without_lines(chart, {"complete trials"})


def legend_room(xs: list[float]) -> tuple[float, float] | None:
    """An x axis a third longer than the data, so the legend (top right) covers no point."""
    finite = [x for x in xs if math.isfinite(x)]
    if not finite:
        return None
    lo, hi = min(finite), max(finite)
    return lo, hi + 0.4 * ((hi - lo) or abs(hi) or 1.0)


def without_lines(chart: str, series: set[str]) -> str:
    """Markers only for the named series (a scatter): their polyline stays, so its points and name are still in
    the page, but it is drawn with no stroke."""
    names = "|".join(re.escape(html.escape(s)) for s in series)
    return re.sub(rf'stroke-width="2"( data-series="(?:{names})")', r'stroke-width="0"\1', chart)


def importance_html(study, complete) -> str:
    """Shares of the objective's variation per parameter; a note instead where they cannot be estimated."""
    varied = [p for p in param_names(complete) if len({repr(t.params.get(p)) for t in complete}) > 1]
    if len(complete) < 2 or not varied:
        return ("<p>Not estimated: importances need at least 2 complete trials and a parameter whose value "
                "differs between them.</p>")
    import warnings

    import optuna

    try:
        with warnings.catch_warnings(record=True) as caught:  # shown on the page, not printed by the command
            warnings.simplefilter("always")
            shares = optuna.importance.get_param_importances(study)
    except Exception as e:  # noqa: BLE001 - the estimator's limits are its own; the rest of the page still renders
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        return f"<p>Not estimated: {html.escape(line)}</p>"
    notes = dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip())
    table = table_html(["parameter", "share"], [[name, f"{100 * share:.3g}%"] for name, share in shares.items()])
    return table + "".join(f'<p class="sub">Optuna: {html.escape(note)}</p>' for note in notes)
