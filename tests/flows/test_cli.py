"""The `sift` command line: argument errors name the setting; `sift select` runs alone."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from steps.data.ingest import content_id
from steps.selection.evidence import caution
from tests.conftest import ALLOW_REPO_ASSETS, MODEL_DIR, write_jsonl

runner = CliRunner()


def test_run_rejects_an_unknown_key_before_doing_anything(tmp_path: Path):
    result = runner.invoke(app, ["run", "--project-dir", str(tmp_path), "--set", "select.budgt=3"])
    assert result.exit_code == 2
    assert "select.budgt" in result.output
    assert not (tmp_path / ".sift").exists()


@pytest.mark.slow
def test_run_with_an_unknown_prior_stops_with_one_line_naming_it(
    prefect_harness, project: Path, empty_store
):
    store = empty_store(project / "mlflow.db")  # a store of its own, not the one under test
    args = ["run", "--project-dir", str(project), "--set", f"tracking.tracking_uri={store}"]
    sources = [f"data.source={project / 'raw' / 'train.jsonl'}", f"model.name={MODEL_DIR}",
               ALLOW_REPO_ASSETS]  # fmt: skip
    for override in [*sources, "select.prior=0123abcd", "select.budget_tokens=2000"]:
        args += ["--set", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "sift run stopped: select.prior='0123abcd': no such MLflow run" in result.output
    # The flow's own printed note (log_prints) reaches the console without --verbose, once.
    line = caution("fisher-label", "tokens")
    assert line is not None and result.stderr.count(line) == 1, result.stderr
    assert not (project / "data").exists() and not (project / "data.dvc").exists()


def test_a_deleted_store_whose_runs_left_artifacts_stops_run_until_new_store(tmp_path: Path):
    """Deleting mlflow/mlflow.db used to start an empty registry silently (versions and alias
    history gone, v1 promoted again): `sift run` now stops before tracking anything."""
    from steps import tracking

    store = tmp_path / "mlflow" / "mlflow.db"
    # The first run names the file another way: MLflow keeps an engine per URI in this
    # process, open on the file deleted below (each `sift run` is a process of its own).
    first = tracking.TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow/./mlflow.db")
    (tmp_path / "note.txt").write_text("an artifact of the first run\n")
    with tracking.tracked_run(tmp_path, first, "first", {}, {}) as run_id:
        tracking.log_artifact(run_id, str(tmp_path / "note.txt"))
    store.unlink()

    config = tracking.TrackingConfig(tracking_uri=f"sqlite:///{store}")
    setting = f"tracking.tracking_uri={config.tracking_uri}"
    overrides = ["--set", setting, "--set", ALLOW_REPO_ASSETS]  # the checkout's model
    result = runner.invoke(app, ["run", "--project-dir", str(tmp_path), *overrides])
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()  # rich may wrap: one line unwrapped
    assert line.startswith(f"no MLflow store at {store}, but {tmp_path / 'mlflow' / 'artifacts'}")
    assert line.endswith("or pass --new-store to start an empty one")
    assert not store.exists()
    second = tracking.tracked_run(tmp_path, config, "second", {}, {})
    with pytest.raises(tracking.MissingStoreError), second:  # the flow checks too
        pass

    with tracking.tracked_run(tmp_path, config, "new", {}, {}, new_store=True) as run_id:
        pass
    assert store.is_file() and tracking.MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_show_config_prints_the_resolved_value():
    result = runner.invoke(app, ["show-config", "--set", "select.selector=uniform"])
    assert result.exit_code == 0 and "selector: uniform" in result.output


def test_a_selector_typo_fails_show_config_with_one_line_listing_the_choices():
    result = runner.invoke(app, ["show-config", "--set", "select.selector=fisherr"])
    assert result.exit_code == 2
    problem = next(line for line in result.output.splitlines() if "select.selector" in line)
    assert "'fisherr'" in problem and "fisher-per-token" in problem and "uniform" in problem


def test_run_with_a_selector_typo_stops_before_ingest(tmp_path: Path):
    args = ["run", "--project-dir", str(tmp_path), "--set", "select.selector=fisherr"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "select.selector" in result.output
    assert not (tmp_path / ".sift").exists() and not (tmp_path / "data.dvc").exists()


def _select_args(data: Path, out: Path, budget: int, *extra: str) -> list[str]:
    """`sift select` on the tiny model, CPU; gsm8k's question/answer are the config defaults."""
    return [
        "select",
        "--data",
        str(data),
        "--out",
        str(out),
        "--set",
        f"model.name={MODEL_DIR}",
        "--set",
        "model.device=cpu",
        "--set",
        f"select.budget={budget}",
        *extra,
    ]


@pytest.mark.slow
def test_select_alone_writes_ordered_ids_gains_and_objective(project: Path, tmp_path: Path):
    out = tmp_path / "picked.json"
    args = _select_args(project / "raw" / "train.jsonl", out, 8)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    picked = json.loads(out.read_text())
    assert len(picked["ids"]) == len(set(picked["rows"])) == 8
    assert picked["final_objective"] == pytest.approx(picked["objective"][-1])
    assert all(a >= b - 1e-9 for a, b in zip(picked["gains"], picked["gains"][1:], strict=False))

    too_many = runner.invoke(app, _select_args(project / "raw" / "train.jsonl", out, 500))
    assert too_many.exit_code == 2 and "need 1..80" in too_many.output


@pytest.mark.slow
def test_select_with_prior_excludes_and_keeps_the_earlier_picks(project: Path, tmp_path: Path):
    first_out, warm_out = tmp_path / "first" / "picked.json", tmp_path / "warm" / "picked.json"
    first = runner.invoke(app, _select_args(project / "raw" / "train.jsonl", first_out, 8))
    assert first.exit_code == 0, first.output
    assert (first_out.parent / "design.npy").exists()
    warm = runner.invoke(
        app, _select_args(project / "raw" / "train.jsonl", warm_out, 5, "--prior", str(first_out))
    )
    assert warm.exit_code == 0, warm.output
    before, after = json.loads(first_out.read_text()), json.loads(warm_out.read_text())
    assert len(after["ids"]) == 5 and not set(after["ids"]) & set(before["ids"])
    assert after["train_ids"] == before["ids"] + after["ids"]
    assert after["feature_space"] == before["feature_space"]
    assert after["prior"]["source"] == str(first_out) and after["prior"]["in_pool"] == 8
    assert after["objective"][0] - after["gains"][0] == pytest.approx(after["prior"]["objective"])


def test_select_with_a_missing_prior_exits_2_naming_it(project: Path, tmp_path: Path):
    missing = tmp_path / "nowhere" / "selection.json"
    result = runner.invoke(
        app,
        _select_args(
            project / "raw" / "train.jsonl", tmp_path / "o.json", 8, "--prior", str(missing)
        ),
    )
    assert result.exit_code == 2 and "--prior" in result.output
    assert not (tmp_path / "o.json").exists()


@pytest.mark.slow
def test_select_reads_a_plain_text_file_through_data_text_field(tmp_path: Path, gsm8k_train):
    texts = [f"{row['question']} {row['answer']}" for row in gsm8k_train[:30]]
    data = write_jsonl(
        tmp_path / "plain.jsonl", [{"id": f"doc-{i}", "text": t} for i, t in enumerate(texts)]
    )
    out = tmp_path / "picked.json"
    refused = runner.invoke(app, _select_args(data, out, 6))  # the defaults want question/answer
    assert refused.exit_code == 2 and "data.prompt_field" in refused.output
    result = runner.invoke(app, _select_args(data, out, 6, "--set", "data.text_field=text"))
    assert result.exit_code == 0, result.output
    picked = json.loads(out.read_text())
    hashes = [content_id("", texts[row]) for row in picked["rows"]]
    own_ids = [f"doc-{row}" for row in picked["rows"]]  # once data.id_field names the id column
    assert picked["ids"] in (hashes, own_ids)
    assert len(set(picked["rows"])) == 6


@pytest.mark.slow
def test_select_takes_data_model_and_select_sections_from_the_config_file(tmp_path, gsm8k_train):
    rows = [{"q": r["question"], "a": r["answer"]} for r in gsm8k_train[:30]]
    data = write_jsonl(tmp_path / "pool.jsonl", rows)
    config = tmp_path / "select.yaml"
    config.write_text(
        "data:\n  prompt_field: 'Q: {q}'\n  response_field: a\n  limit: 20\n"
        f"model:\n  name: {MODEL_DIR}\n  device: cpu\n"
        "select:\n  budget: 0.25\n  selector: uniform\n  seed: 3\n"
    )
    out = tmp_path / "picked.json"
    result = runner.invoke(
        app, ["select", "--data", str(data), "--out", str(out), "-c", str(config)]
    )
    assert result.exit_code == 0, result.output
    picked = json.loads(out.read_text())
    assert picked["selector"] == "uniform" and picked["budget"] == 5  # 0.25 of data.limit's 20
    assert max(picked["rows"]) < 20
    expected = [content_id(f"Q: {rows[r]['q']}", rows[r]["a"]) for r in picked["rows"]]
    assert picked["ids"] == expected


def test_select_refuses_select_prior_which_names_an_mlflow_run(project: Path, tmp_path: Path):
    args = _select_args(project / "raw" / "train.jsonl", tmp_path / "o.json", 8)
    result = runner.invoke(app, [*args, "--set", "select.prior=champion"])
    assert result.exit_code == 2 and "select.prior='champion'" in result.output
    assert not (tmp_path / "o.json").exists()


def test_select_no_longer_takes_flags_that_repeat_config_fields(project: Path, tmp_path: Path):
    args = _select_args(project / "raw" / "train.jsonl", tmp_path / "o.json", 8)
    result = runner.invoke(app, [*args, "--budget", "8"])
    assert result.exit_code == 2 and "--budget" in result.output


def test_a_run_failing_on_an_unreachable_server_names_it():
    import httpx
    import mlflow

    from flows.cli.main import unreachable_server

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    try:
        named = unreachable_server(mlflow.exceptions.MlflowException("API request failed"))
    finally:
        mlflow.set_tracking_uri(before)
    assert named == "the MLflow tracking server http://127.0.0.1:9"
    assert "Prefect API" in str(unreachable_server(httpx.ConnectError("refused")))
    assert unreachable_server(RuntimeError("a bug")) is None
