"""The evaluation report from hand-written scores and a tiny lm-eval log (no model run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steps.evaluation.benchmarks import BenchmarkReport, BenchmarkScore, ModelBenchmarks
from steps.evaluation.report import chance_levels, score_table_rows, write_report


def _score(task: str, metric: str, value: float, stderr: float | None, **fields) -> BenchmarkScore:
    defaults = {"filter": "none", "higher_is_better": True, "version": "1.0", "documents": 2,
                "truncated": 0}  # fmt: skip
    return BenchmarkScore(task, metric, value=value, stderr=stderr, **{**defaults, **fields})


def _logs(run_dir: Path) -> tuple[Path, Path]:
    """results.json naming each task's output type, and a samples.jsonl: piqa 2 choices per
    document, arc_easy 4 then 2 (chance 0.375), gsm8k logged once per filter as lm-eval does."""
    run_dir.mkdir(parents=True)
    results = run_dir / "results.json"
    types = {"piqa": "multiple_choice", "arc_easy": "multiple_choice", "gsm8k": "generate_until"}
    results.write_text(json.dumps({"configs": {t: {"output_type": o} for t, o in types.items()}}))
    rows = [("piqa", 0, 2), ("piqa", 1, 2), ("arc_easy", 0, 4), ("arc_easy", 1, 2)]
    lines = [{"task": t, "doc_id": d, "arguments": [["Q:", f" {i}"] for i in range(n)]}
             for t, d, n in rows]  # fmt: skip
    for filter_name in ("strict-match", "flexible-extract"):
        lines += [{"task": "gsm8k", "doc_id": d, "filter": filter_name,
                   "arguments": [["Q:", {"until": ["\n"]}]]} for d in (0, 1)]  # fmt: skip
    samples = run_dir / "samples.jsonl"
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return results, samples


def _model(
    role: str, label: str, shift: float, run_dir: Path, answer: str, truncated_gsm8k: int = 0
) -> ModelBenchmarks:
    results, samples = _logs(run_dir)
    scores = (
        _score("piqa", "acc", 0.5 + shift, 0.05),
        _score("piqa", "acc_norm", 0.55 + shift, 0.05),
        _score("arc_easy", "acc", 0.375 + shift, 0.04),
        _score(
            "gsm8k",
            "exact_match",
            0.01,
            0.01,
            filter="strict-match",
            truncated=truncated_gsm8k,
            version="3.0",
        ),
        _score(
            "gsm8k",
            "exact_match",
            0.02 + shift,
            0.01,
            filter="flexible-extract",
            truncated=truncated_gsm8k,
            version="3.0",
        ),
    )
    report = BenchmarkReport("plan-md5", scores, str(results), str(samples), 512, 6, 1.0)
    return ModelBenchmarks(role, label, 2.5 - shift, report, (("What is 2+2?", answer),))


@pytest.fixture
def models(tmp_path: Path) -> list[ModelBenchmarks]:
    return [
        _model("base", "tiny (base)", 0.0, tmp_path / "base", "<b>four</b>", truncated_gsm8k=2),
        _model(
            "challenger", "tiny-sft", 0.25, tmp_path / "challenger", "4 & more", truncated_gsm8k=2
        ),
    ]


def test_chance_is_the_mean_over_documents_of_one_over_choices(tmp_path: Path) -> None:
    levels = chance_levels(*_logs(tmp_path / "run"))
    assert levels == {"piqa": 0.5, "arc_easy": pytest.approx(0.375)}  # gsm8k: not multiple choice


def test_report_files_scores_notes_and_escaped_generations(
    models: list[ModelBenchmarks], tmp_path: Path
) -> None:
    files = write_report(models, tmp_path / "report", "tiny vs tiny-sft")
    assert files.chart_path is not None and files.html_path.is_file()
    png = files.chart_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    page = files.html_path.read_text()
    assert "data:image/png;base64," in page and "<script" not in page and "http" not in page
    for text in ("piqa", "arc_easy", "gsm8k", "tiny (base)", "tiny-sft", "2.5000", "2.2500"):
        assert text in page
    assert "0.500 ± 0.050" in page and "0.750 ± 0.050" in page  # piqa acc, base / challenger
    assert "0.625 ± 0.040" in page  # arc_easy acc of the challenger
    truncation = "2 of 2 documents had requests left-truncated to the model&#x27;s context of 512"
    assert page.count(truncation) == 1 and "gsm8k: 2 of 2" in page
    assert "piqa: 2 of" not in page and "arc_easy: 2 of" not in page
    assert "&lt;b&gt;four&lt;/b&gt;" in page and "<b>four" not in page and "4 &amp; more" in page
    assert 'href="../base/results.json"' in page and 'href="../challenger/samples.jsonl"' in page
    # the base model is within 2 stderr of chance everywhere, the challenger is not
    assert "tiny (base): scores at chance level" in page
    assert "tiny-sft: scores at chance" not in page


def test_markdown_has_a_header_and_one_row_per_task_and_metric(
    models: list[ModelBenchmarks], tmp_path: Path
) -> None:
    markdown = write_report(models, tmp_path / "report", "t").markdown
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert table[0] == "| task | version | documents | metric | chance | tiny (base) | tiny-sft |"
    assert len(table) == 2 + 5 + 1  # header, rule, 5 task/metric rows, held-out loss
    assert "| piqa | 1.0 | 2 | acc | 0.500 | 0.500 ± 0.050 | 0.750 ± 0.050 |" in table
    assert any(line.startswith("| gsm8k | 3.0 | 2 | exact_match (flexible-extract) |")
               for line in table)  # fmt: skip
    assert "- gsm8k: 2 of 2 documents had requests left-truncated" in markdown


def test_table_orders_models_by_role_and_marks_missing_scores(
    models: list[ModelBenchmarks], tmp_path: Path
) -> None:
    base, challenger = models
    champion = ModelBenchmarks("champion", "old", None, None)  # no benchmarks (suite=none)
    rows = score_table_rows([champion, challenger, base])
    assert rows[0][5:] == ["tiny (base)", "tiny-sft", "old"]
    assert rows[1][7] == "—" and rows[-1] == ["held-out eval loss", "", "", "loss (nats/token)",
                                               "", "2.5000", "2.2500", "—"]  # fmt: skip
    with pytest.raises(ValueError, match="role 'mystery'"):
        score_table_rows([ModelBenchmarks("mystery", "x", None, None)])
