"""The evaluation report: every model's benchmark scores side by side, as HTML, PNG and Markdown.

One call writes `report.html` (self-contained: inline CSS, the chart embedded as base64) and
`benchmarks.png` (each task's primary metric as grouped bars, one colour per role, with a
dashed chance line for multiple-choice tasks) and returns the score table as Markdown (for a
Prefect artifact or the README). Chance is read from lm-eval's own sample log: a multiple-choice
document logs one loglikelihood request per choice, so chance = mean over documents of 1/choices.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from steps.evaluation.benchmarks import BenchmarkScore, ModelBenchmarks

ROLE_COLOURS = {"base": "#9e9e9e", "challenger": "#1f77b4", "champion": "#e6862e"}
MISSING = "—"
# lm-eval's `acc_norm` is length-normalised accuracy, the number papers usually quote for
# ARC/OpenBookQA/PIQA; exact_match's flexible-extract is the GSM8K number most leaderboards use.
PRIMARY_METRICS = (("acc_norm", "none"), ("acc", "none"), ("exact_match", "flexible-extract"),
                   ("exact_match", "strict-match"), ("exact_match", "none"))  # fmt: skip


@dataclass(frozen=True)
class ReportFiles:
    html_path: Path
    chart_path: Path | None  # None: no model has a score to plot
    markdown: str


def _ordered(models: list[ModelBenchmarks]) -> list[ModelBenchmarks]:
    for model in models:
        if model.role not in ROLE_COLOURS:
            raise ValueError(f"model {model.label!r}: role {model.role!r} is not one of "
                             f"{'|'.join(ROLE_COLOURS)}")  # fmt: skip
    return sorted(models, key=lambda m: list(ROLE_COLOURS).index(m.role))


def _scores(model: ModelBenchmarks) -> tuple[BenchmarkScore, ...]:
    return model.report.scores if model.report is not None else ()


def _tasks(models: list[ModelBenchmarks]) -> list[str]:
    return list(dict.fromkeys(s.task for m in models for s in _scores(m)))


def primary_metric(scores: Iterable[BenchmarkScore]) -> tuple[str, str] | None:
    """The (metric, filter) a task is charted by, or None (e.g. perplexity alone)."""
    present = {(s.metric, s.filter) for s in scores}
    return next((key for key in PRIMARY_METRICS if key in present), None)


def chance_levels(results_path: Path, samples_path: Path) -> dict[str, float]:
    """Task → chance accuracy, for the multiple-choice tasks (lm-eval's `output_type`) of one
    run; samples are logged once per filter, so each document counts once."""
    configs = json.loads(results_path.read_text()).get("configs", {})
    multiple_choice = {t for t, c in configs.items() if c.get("output_type") == "multiple_choice"}
    choices: dict[str, dict[int, int]] = {}
    with samples_path.open() as handle:
        for line in handle:
            row = json.loads(line)
            if row["task"] in multiple_choice:
                choices.setdefault(row["task"], {})[row["doc_id"]] = len(row["arguments"])
    return {task: sum(1 / n for n in docs.values()) / len(docs) for task, docs in choices.items()}


def _chances(models: list[ModelBenchmarks]) -> dict[str, float]:
    """Chance per task, each task's from the first model whose logs on disk cover it (the
    same task and documents give the same choices for every model)."""
    found: dict[str, float] = {}
    covered: set[str] = set()
    for model in models:
        report = model.report
        tasks = {s.task for s in _scores(model)}
        if report is None or tasks <= covered:
            continue  # a sample log can be tens of MB: read one per task
        results, samples = Path(report.results_path), Path(report.samples_path)
        if results.is_file() and samples.is_file():
            found = {**chance_levels(results, samples), **found}
            covered |= tasks
    return found


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}"


def format_score(score: BenchmarkScore | None) -> str:
    if score is None:
        return MISSING
    if score.stderr is None:
        return _number(score.value)
    return f"{_number(score.value)} ± {_number(score.stderr)}"


def score_table_rows(
    models: list[ModelBenchmarks], chances: dict[str, float] | None = None
) -> list[list[str]]:
    """Header, one row per task and metric (value ± stderr per model), then held-out loss;
    `chances` (task → chance accuracy) is read from the models' sample logs when not given."""
    models = _ordered(models)
    chances = _chances(models) if chances is None else chances
    rows = [["task", "version", "documents", "metric", "chance", *(m.label for m in models)]]
    for task in _tasks(models):
        keys = dict.fromkeys(s.key for m in models for s in _scores(m) if s.task == task)
        for key in keys:
            cells = [next((s for s in _scores(m) if s.key == key), None) for m in models]
            present = [s for s in cells if s is not None]
            version = " / ".join(dict.fromkeys(s.version for s in present))
            documents = " / ".join(dict.fromkeys(str(s.documents) for s in present))
            metric = present[0].metric + ("" if present[0].filter == "none" else
                                          f" ({present[0].filter})")  # fmt: skip
            chance = f"{chances[task]:.3f}" if task in chances and metric.startswith("acc") else ""
            rows.append([task, version, documents, metric, chance,
                         *(format_score(s) for s in cells)])  # fmt: skip
    losses = [MISSING if m.eval_loss is None else f"{m.eval_loss:.4f}" for m in models]
    rows.append(["held-out eval loss", "", "", "loss (nats/token)", "", *losses])
    return rows


def report_notes(
    models: list[ModelBenchmarks], chances: dict[str, float] | None = None
) -> list[str]:
    """Truncated tasks, models at chance level, and plans that differ between models."""
    models = _ordered(models)
    chances = _chances(models) if chances is None else chances
    notes = []
    for task in _tasks(models):
        seen: dict[tuple[int, int, int], list[str]] = {}
        for model in models:
            score = next((s for s in _scores(model) if s.task == task), None)
            if score is not None and score.truncated > 0 and model.report is not None:
                facts = (score.truncated, score.documents, model.report.max_length)
                seen.setdefault(facts, []).append(model.label)
        for (cut, documents, length), labels in seen.items():
            who = "" if len(seen) == 1 else f" ({', '.join(labels)})"
            notes.append(f"{task}{who}: {cut} of {documents} documents had requests "
                         f"left-truncated to the model's context of {length} tokens: these "
                         "scores are not comparable with published ones")  # fmt: skip
    for model in models:
        graded = [s for s in _scores(model) if s.task in chances and s.metric.startswith("acc")]
        if graded and all(
            s.stderr is not None and abs(s.value - chances[s.task]) <= 2 * s.stderr for s in graded
        ):
            notes.append(f"{model.label}: scores at chance level (every multiple-choice score "
                         "within 2 stderr of chance): expected for a model this small")  # fmt: skip
    plans = {m.report.plan_fingerprint for m in models if m.report is not None}
    if len(plans) > 1:
        notes.append("the models were scored on different benchmark plans (tasks, data, limit "
                     "or lm-eval version): their scores are not comparable")  # fmt: skip
    return notes


def write_chart(
    models: list[ModelBenchmarks], chances: dict[str, float], path: Path, title: str
) -> Path | None:
    """Grouped bars of each task's primary metric (± stderr), a dashed line at chance."""
    # an Agg canvas of its own: no pyplot, so no global backend or figure state is touched
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = [m for m in _ordered(models) if m.report is not None]
    charted = []
    for task in _tasks(models):
        key = primary_metric(s for m in models for s in _scores(m) if s.task == task)
        if key is not None:
            charted.append((task, key))
    if not charted:
        return None
    figure = Figure(figsize=(max(6.0, 1.3 * len(charted) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(models)
    top = 1.0
    for i, model in enumerate(models):
        found = [next((s for s in _scores(model) if (s.task, (s.metric, s.filter)) == (t, k)),
                      None) for t, k in charted]  # fmt: skip
        heights = [s.value if s else 0.0 for s in found]
        errors = [(s.stderr or 0.0) if s else 0.0 for s in found]
        top = max(top, *(h + e for h, e in zip(heights, errors, strict=True)))
        offsets = [x - 0.4 + width * (i + 0.5) for x in range(len(charted))]
        bars = axes.bar(offsets, heights, width, yerr=errors, capsize=3, label=model.label,
                        color=ROLE_COLOURS[model.role])  # fmt: skip
        values = [f"{s.value:.2f}" if s else "" for s in found]
        axes.bar_label(bars, labels=values, fontsize=7, padding=2)
    labelled = False
    for x, (task, _) in enumerate(charted):
        if task in chances:
            label = "_nolegend_" if labelled else "chance"  # underscore: kept out of the legend
            axes.hlines(chances[task], x - 0.45, x + 0.45, colors="black", linestyles="dashed",
                        linewidth=1, label=label)  # fmt: skip
            labelled = True
    axes.set_xticks(range(len(charted)))
    ticks = [f"{t}\n{m}" + ("" if f == "none" else f"\n{f}") for t, (m, f) in charted]
    axes.set_xticklabels(ticks, fontsize=8)
    axes.set_ylim(0, max(1.05, top * 1.05))
    axes.set_ylabel("score (primary metric)")
    axes.set_title(title)
    axes.legend(fontsize=8, loc="upper right")
    axes.grid(axis="y", alpha=0.3)
    figure.savefig(path, dpi=120)
    return path


def _markdown_table(rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join("---" if i < 4 else "---:" for i in range(len(rows[0]))) + "|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;margin:0}img{max-width:100%}"""


def _html_table(rows: list[list[str]]) -> str:
    def cell(i: int, text: str) -> str:
        numeric = ' class="num"' if i >= 4 else ""  # the chance and per-model columns
        return f"<td{numeric}>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    lines = ("".join(cell(i, c) for i, c in enumerate(row)) for row in rows[1:])
    body = "".join(f"<tr>{line}</tr>" for line in lines)
    return f"<table><tr>{head}</tr>{body}</table>"


def _generations_html(models: list[ModelBenchmarks]) -> str:
    prompts = list(dict.fromkeys(p for m in models for p, _ in m.generations))
    if not prompts:
        return "<p>No sample generations.</p>"
    parts = []
    for prompt in prompts:
        rows = "".join(
            f"<tr><th>{html.escape(m.label)}</th><td><pre>"
            f"{html.escape(dict(m.generations).get(prompt, MISSING))}</pre></td></tr>"
            for m in models
        )
        parts.append(f"<h3>Prompt</h3><pre>{html.escape(prompt)}</pre><table>{rows}</table>")
    return "".join(parts)


def _links_html(models: list[ModelBenchmarks], out_dir: Path) -> str:
    items = []
    for model in models:
        paths = [] if model.report is None else [model.report.results_path,
                                                 model.report.samples_path]  # fmt: skip
        links = [
            f'<a href="{html.escape(Path(os.path.relpath(p, out_dir)).as_posix())}">'
            f"{html.escape(Path(p).name)}</a>"
            for p in paths
            if Path(p).is_file()
        ]
        if links:
            items.append(f"<li>{html.escape(model.label)}: {', '.join(links)}</li>")
    return f"<ul>{''.join(items)}</ul>" if items else "<p>No lm-eval logs on disk.</p>"


def write_report(models: list[ModelBenchmarks], out_dir: Path, title: str) -> ReportFiles:
    """Writes out_dir/report.html and out_dir/benchmarks.png; returns them and the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    models = _ordered(models)
    chances = _chances(models)
    rows, notes = score_table_rows(models, chances), report_notes(models, chances)
    chart = write_chart(models, chances, out_dir / "benchmarks.png", title)
    image = (
        f'<img alt="primary metric per task" src="data:image/png;base64,'
        f'{base64.b64encode(chart.read_bytes()).decode()}">'
        if chart is not None
        else "<p>No benchmark scores to chart.</p>"
    )
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes) or "<li>none</li>"
    roles = ", ".join(f"{html.escape(m.label)} ({m.role})" for m in models)
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Models: {roles}.</p>{image}"
        f"<h2>Scores</h2>{_html_table(rows)}<h2>Notes</h2><ul>{notes_html}</ul>"
        f"<h2>Sample generations</h2>{_generations_html(models)}"
        f"<h2>lm-eval logs</h2>{_links_html(models, out_dir)}</body></html>\n"
    )
    html_path = out_dir / "report.html"
    html_path.write_text(page)
    markdown = _markdown_table(rows) + "\n"
    if notes:
        markdown += "\n" + "".join(f"- {note}\n" for note in notes)
    return ReportFiles(html_path, chart, markdown)
