"""`sift models`, `sift promote`, `sift rollback` on a real registry of real model versions.

One module fixture registers three versions of the bundled tiny model (distinct weights)
and lets the automatic gate decide on them: v1 first champion, v2 beats it on eval data
"eval-a", v3 loses on "eval-b". Each test gets its own copy of that SQLite store.
"""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli.main import app
from steps.evaluation.results import Scored
from steps.registry.aliases import history
from steps.registry.register import RegisterConfig, promote, register_model
from tests.conftest import REPO, shifted_model_copy

pytestmark = pytest.mark.slow
runner = CliRunner()
NAME = "sift-cli"


@pytest.fixture(scope="module")
def built_store(tmp_path_factory) -> Path:
    """The registry every test copies: three versions, two automatic moves, one kept-out."""
    root = tmp_path_factory.mktemp("registry")
    db = root / "mlflow.db"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    mlflow.set_registry_uri(f"sqlite:///{db}")
    try:
        client = MlflowClient()
        experiment = client.create_experiment("t", artifact_location=(root / "a").as_uri())
        run_id = client.create_run(experiment).info.run_id
        config = RegisterConfig(model_name=NAME)
        never = lambda uri: pytest.fail("the champion should not be re-scored")  # noqa: E731
        refs = [
            register_model(
                shifted_model_copy(root / f"m{i}", 0.01 * i),
                run_id,
                config,
                {"dvc.md5": f"data-{i}"},
            )
            for i in (1, 2, 3)
        ]
        assert [ref.version for ref in refs] == ["1", "2", "3"]
        assert promote(refs[0], Scored(2.5, "eval-a"), never).promoted
        assert promote(refs[1], Scored(2.4, "eval-a"), never).promoted
        # other eval data: the champion is re-scored (2.45) and v3's 2.6 loses
        rescored = Scored(2.45, "eval-b")
        assert not promote(refs[2], Scored(2.6, "eval-b"), lambda uri: rescored).promoted
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    return db


@pytest.fixture
def store(built_store: Path, tmp_path: Path):
    """This test's own copy of the store, and the `sift` arguments that point at it."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(built_store, db)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield ["--set", f"tracking.tracking_uri=sqlite:///{db}", "--project-dir", str(tmp_path)]
    # the CLI points MLflow at the store process-wide: later tests get theirs back
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _sift(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def _json(*args: str):
    code, output = _sift(*args, "--json")
    assert code == 0, output
    return json.loads(output)


def _champion(store: list[str]) -> str:
    models = _json("models", *store)
    return next(row["champion"] for row in models if row["model"] == NAME)


def _version_tags(store: list[str], version: str) -> dict[str, str]:
    uri = store[1].removeprefix("tracking.tracking_uri=")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return client.get_model_version(NAME, version).tags


def test_models_table_shows_aliases_loss_md5s_and_source_run(store):
    versions = {row["version"]: row for row in _json("models", NAME, *store)}
    assert list(versions) == ["3", "2", "1"]  # newest first
    assert versions["2"]["aliases"] == "champion" and versions["3"]["aliases"] == "challenger"
    assert versions["2"]["eval_loss"] == 2.4 and versions["2"]["eval_md5"] == "eval-a"
    assert versions["3"]["eval_md5"] == "eval-b" and versions["1"]["data_md5"] == "data-1"
    assert versions["1"]["source_run"] and versions["1"]["age"]
    code, table = _sift("models", NAME, *store)
    assert code == 0 and "champion" in table and "data-2" in table
    (model,) = _json("models", *store)
    assert (model["model"], model["versions"], model["champion"]) == (NAME, 3, "2")
    assert model["champion_eval_loss"] == 2.4 and model["challenger"] == "3"


def test_promote_moves_champion_and_records_who_when_why_and_previous(store):
    code, output = _sift("promote", NAME, "1", "--reason", "v2 regressed on long prompts", *store)
    assert code == 0, output
    assert "version 2 → 1" in output and _champion(store) == "1"
    tags = _version_tags(store, "1")
    assert tags["sift.promoted_by"] == getpass.getuser()
    assert tags["sift.promote_reason"] == "v2 regressed on long prompts"
    assert tags["sift.previous_champion"] == "2" and tags["sift.promoted_at"].endswith("+00:00")
    code, output = _sift("promote", NAME, "1", "--reason", "again", *store)
    assert code == 0 and "already version 1: nothing changed" in output


def test_promote_without_a_reason_is_refused_and_moves_nothing(store):
    code, output = _sift("promote", NAME, "1", *store)
    assert code == 2 and "--reason" in output
    code, output = _sift("promote", NAME, "1", "--reason", "  ", *store)
    assert code == 2 and "--reason" in output
    assert _champion(store) == "2"


def test_promote_on_other_eval_data_needs_force(store):
    code, output = _sift("promote", NAME, "3", "--reason", "try it", *store)
    assert code == 1 and "--force" in output and "eval-b" in output and "eval-a" in output
    assert _champion(store) == "2"
    code, output = _sift("promote", NAME, "3", "--reason", "try it", "--force", *store)
    assert code == 0, output
    assert _champion(store) == "3"
    assert "--force" in _version_tags(store, "3")["sift.promote_reason"]


def test_unknown_model_or_version_exits_1_naming_it(store):
    code, output = _sift("promote", "no-such-model", "1", "--reason", "x", *store)
    assert code == 1 and "'no-such-model'" in output
    code, output = _sift("promote", NAME, "9", "--reason", "x", *store)
    assert code == 1 and f"{NAME} has no version 9" in output
    code, output = _sift("rollback", NAME, "--to", "9", *store)
    assert code == 1 and "no version 9" in output
    code, output = _sift("models", "no-such-model", *store)
    assert code == 1 and "'no-such-model'" in output
    assert _champion(store) == "2"


def test_rollback_round_trip_walks_back_one_champion_each_time(store):
    assert _sift("promote", NAME, "1", "--reason", "manual pick", *store)[0] == 0
    code, output = _sift("rollback", NAME, *store)  # undoes the manual pick
    assert code == 0 and "version 1 → 2" in output and _champion(store) == "2"
    code, output = _sift("rollback", NAME, *store)  # and then v2's automatic promotion
    assert code == 0 and "version 2 → 1" in output and _champion(store) == "1"
    assert _version_tags(store, "1")["sift.promote_kind"] == "rollback"
    code, output = _sift("rollback", NAME, "--to", "2", *store)
    assert code == 0 and _champion(store) == "2"
    code, output = _sift("rollback", NAME, "--to", "2", *store)
    assert code == 1 and "already version 2" in output


def test_rollback_past_the_first_champion_fails_clearly(store):
    assert _sift("rollback", NAME, *store)[0] == 0  # 2 → 1, the first champion
    code, output = _sift("rollback", NAME, *store)
    assert code == 1 and "no earlier champion" in output and "--to" in output
    assert _champion(store) == "1"


def test_history_lists_every_decision_in_order_with_the_automatic_ones(store):
    _sift("promote", NAME, "1", "--reason", "manual pick", *store)
    _sift("rollback", NAME, *store)
    events = _json("models", NAME, "--history", *store)
    moves = [(e["kind"], e["from_version"], e["to_version"], e["moved"]) for e in events]
    assert moves == [
        ("auto", None, "1", True),
        ("auto", "1", "2", True),
        ("auto", "2", "3", False),  # the gate kept v3 out
        ("manual", "2", "1", True),
        ("rollback", "1", "2", True),
    ]
    # the gate's numbers: both losses, the improvement, the margin and the combined stderr
    assert events[1]["numbers"] == {"eval_loss": 2.4, "previous_eval_loss": 2.5,
                                    "improvement": pytest.approx(0.1), "min_margin": 0.0,
                                    "combined_stderr": 0.0}  # fmt: skip
    assert events[2]["numbers"]["previous_eval_loss"] == 2.45
    assert events[2]["numbers"]["improvement"] == pytest.approx(-0.15)
    assert events[3]["reason"] == "manual pick" and events[3]["who"] == getpass.getuser()
    code, table = _sift("models", NAME, "--history", *store)
    assert code == 0 and "rollback" in table and "manual" in table


def test_models_on_a_missing_store_fails_without_creating_one(tmp_path: Path):
    db = tmp_path / "none.db"
    args = ["--set", f"tracking.tracking_uri=sqlite:///{db}", "--project-dir", str(tmp_path)]
    code, output = _sift("models", *args)
    assert code == 1 and "tracking.tracking_uri" in output and not db.exists()


APPENDER = """
import sys, time
from pathlib import Path
import mlflow
from mlflow.tracking import MlflowClient
from steps.registry.aliases import AliasEvent, append_event
from datetime import UTC, datetime
uri, start, who = sys.argv[1:]
mlflow.set_tracking_uri(uri)
mlflow.set_registry_uri(uri)
client = MlflowClient()
client.get_registered_model("shared")  # connected: tell the test, then wait for the other
Path(start + "." + who).touch()
while not Path(start).exists():  # both processes begin appending at the same moment
    time.sleep(0.01)
for i in range(25):
    at = datetime.now(UTC).isoformat(timespec="microseconds")
    append_event(client, "shared", AliasEvent(at, who, "manual", "champion", None, str(i), "x"))
"""


def test_concurrent_appends_from_two_processes_lose_no_event(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("shared")
    start = tmp_path / "start"
    writers = [
        subprocess.Popen([sys.executable, "-c", APPENDER, uri, str(start), who], cwd=REPO)
        for who in ("a", "b")
    ]
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{start}.{who}").exists() for who in ("a", "b")):
            assert time.monotonic() < deadline and all(w.poll() is None for w in writers)
            time.sleep(0.05)
        start.touch()
        assert [writer.wait(timeout=120) for writer in writers] == [0, 0]
    finally:
        for writer in writers:
            writer.kill()
    events = history(client, "shared")
    assert len(events) == 50
    for who in ("a", "b"):  # and each process's events are in its own order
        assert [e.to_version for e in events if e.who == who] == [str(i) for i in range(25)]
