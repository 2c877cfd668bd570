from pathlib import Path

import pytest

from flows.config import ConfigError, load_config, parse_override, resolve_paths
from steps.packaged_model import PACKAGED_MODELS
from steps.selection.select import resolve_budget
from steps.selection.selectors import SELECTORS
from tests.conftest import REPO


def test_defaults_name_the_documented_keys():
    config = load_config()
    assert config.data.source.endswith("gsm8k/train.jsonl")
    assert config.model.name.endswith("stories260K")
    assert config.select.selector == "fisher-label"
    assert config.embed.token_weight == "label"  # what the default selector reads
    assert config.select.budget == 0.1


def test_yaml_and_set_override_in_order(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("select:\n  budget: 0.2\nfinetune:\n  epochs: 1\n")
    config = load_config(path, ["select.budget=50", "model.device=cpu"])
    assert config.select.budget == 50
    assert config.finetune.epochs == 1
    assert config.model.device == "cpu"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("select.budgt=3", "select.budgt"),
        ("finetune.epochs=abc", "finetune.epochs"),
        ("nosuch.key=1", "nosuch"),
        ("model.device=tpu", "model.device"),
    ],
)
def test_bad_keys_and_types_name_the_key(override: str, named: str):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_an_unknown_selector_fails_at_load_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"select\.selector: unknown selector 'fisherr'") as error:
        load_config(None, ["select.selector=fisherr"])
    assert all(name in str(error.value) for name in SELECTORS)


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("select.budget")


def test_missing_config_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_relative_local_paths_resolve_against_the_project(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    config = resolve_paths(load_config(None, ["data.source=d.jsonl"]), tmp_path)
    assert config.data.source == str(tmp_path / "d.jsonl")
    assert config.model.name == "assets/models/stories260K"  # not in tmp_path: left as given


@pytest.mark.parametrize(("budget", "count"), [(0.1, 10), (1, 1), (100, 100), (0.004, 0)])
def test_budget_is_a_fraction_or_a_count(budget: float, count: int):
    if count == 0:
        with pytest.raises(ValueError, match="select.budget"):
            resolve_budget(budget, 100)
    else:
        assert resolve_budget(budget, 100) == count


def test_budget_above_pool_is_an_error():
    with pytest.raises(ValueError, match="1..100"):
        resolve_budget(101, 100)


def test_an_unknown_lr_scheduler_fails_at_load_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"finetune\.lr_scheduler") as raised:
        load_config(None, ["finetune.lr_scheduler=cosine_wrong"])
    assert "'cosine_wrong'" in str(raised.value)
    assert "cosine_with_restarts" in str(raised.value)  # the choices are listed
    assert load_config(None, ["finetune.lr_scheduler=linear"]).finetune.lr_scheduler == "linear"


def test_a_data_chat_template_with_the_chat_prompt_format_is_an_error_naming_both():
    with pytest.raises(ConfigError, match=r"data\.chat_template .* model\.prompt_format=chat"):
        load_config(None, ["data.chat_template=assets/models/stories260K",
                           "model.prompt_format=chat"])  # fmt: skip


def test_the_smollm2_config_names_the_file_make_smollm2_fetches():
    config = load_config(REPO / "configs" / "smollm2.yaml")
    smollm2 = PACKAGED_MODELS["smollm2"]
    assert config.model.name == f"{smollm2.out_dir}/{Path(smollm2.member).name}"
    assert config.model.prompt_format == "chat"
    assert config.eval.suite == "real"
