"""SelectConfig: the `select` section (which selector, its budget, warm start and backend),
checked when the config loads; the selection step is steps/selection/select.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from steps.selection.selectors import DEFAULT_RIDGE, SELECTORS
from steps.selection.target_sample import target_mismatch

DEFAULT_BUDGET = 0.1  # of the pool's examples, when neither budget key is set


class SelectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    selector: str = Field(
        default="fisher-label",
        description="A name from the selector registry (reference/selectors.md); fisher-label "
        "needs embed.token_weight=label, fisher-target needs select.target.",
    )
    # null means DEFAULT_BUDGET unless budget_tokens is set (_one_budget). With a prior a
    # fraction is of the candidates left.
    budget: float | None = Field(
        default=None,
        gt=0,
        description="Examples to pick: a count (>= 1) or a fraction of the pool (< 1); loss "
        "tokens for fisher-per-token; with a prior, new picks only. Unset: 0.1 unless "
        "budget_tokens is set.",
    )
    budget_tokens: float | None = Field(
        default=None,
        gt=0,
        description="Instead of budget: loss tokens to fill, a count or a fraction of the pool's; "
        "equal tokens compare selectors at equal training cost.",
    )
    ridge: float = Field(
        default=DEFAULT_RIDGE,
        gt=0,
        description="λ in log det(λI + V_S): keeps the objective finite before d tokens are "
        "picked; small against hidden-state norms, so it barely moves the picks.",
    )
    seed: int = Field(
        default=0, description="Seed of the randomised selectors (uniform, k-center)."
    )
    # Its examples are not picked again and are trained on again next to the new picks:
    # fine-tuning always starts from the base model, so the new model must see them too. Fewer
    # new examples reach the same objective; the training set grows with every run. "champion"
    # is a cold start while there is none yet. Its statistics must come from the same model,
    # width and sketch seed (selection.json's feature_space).
    prior: str = Field(
        default="",
        description='Warm start: "" none; "champion": the run behind registry.model_name\'s '
        "@champion; else an MLflow run id. Its picks join the objective and the training set.",
    )
    backend: Literal["auto", "numpy", "torch"] = Field(
        default="auto",
        description="Where the fisher selectors compute: numpy (CPU), torch (the run's device) or "
        "auto (torch on CUDA, else numpy); same picks, only the time differs.",
    )
    device_memory_mb: int = Field(
        default=4096,
        gt=0,
        description="MiB of device memory the torch backend may use: the factors stay on the "
        "device when they fit in half of it, else stream from the pool per batch.",
    )
    # A few hundred prompts pin a 64-dim design (d states suffice).
    target: str = Field(
        default="",
        description="fisher-target only (and required by it): a JSONL/JSON/CSV/Parquet file of "
        "prompts the model should serve, read with data.prompt_field; never the eval split.",
    )

    @model_validator(mode="after")
    def _target_for_selector(self) -> SelectConfig:
        # Both ways: a target that no selector reads would be ignored silently.
        if message := target_mismatch(self.selector, self.target):
            raise PydanticCustomError("target_for_selector", "{message}", {"message": message})
        return self

    @model_validator(mode="before")
    @classmethod
    def _one_budget(cls, data: Any) -> Any:
        # Before the fields: the default example budget applies only when neither is set.
        if not isinstance(data, dict):
            return data
        budget, tokens = data.get("budget"), data.get("budget_tokens")
        if budget is not None and tokens is not None:
            raise PydanticCustomError(
                "two_budgets",
                "select.budget={budget} and select.budget_tokens={tokens} are exclusive: set "
                "one, the other to null",
                {"budget": budget, "tokens": tokens},
            )
        return {**data, "budget": DEFAULT_BUDGET} if budget is None and tokens is None else data

    @property
    def counts_tokens(self) -> bool:
        """Whether the budget is of loss tokens: budget_tokens, or fisher-per-token's budget."""
        return self.budget_tokens is not None or self.selector == "fisher-per-token"

    @property
    def budget_setting(self) -> tuple[str, float]:
        """The budget key in use and its value, for resolving and for errors."""
        if self.budget_tokens is not None:
            return "select.budget_tokens", self.budget_tokens
        return "select.budget", self.budget or DEFAULT_BUDGET  # set by _one_budget

    @field_validator("selector")
    @classmethod
    def _known_selector(cls, selector: str) -> str:
        # Checked when the config loads, so a typo stops `sift run` before ingest and the DVC
        # push, not at the select step. A custom error: no "Value error, " prefix on the line.
        if selector not in SELECTORS:
            raise PydanticCustomError(
                "unknown_selector",
                "unknown selector '{selector}'; choose one of: {choices}",
                {"selector": selector, "choices": ", ".join(SELECTORS)},
            )
        return selector
