"""Great Expectations checkpoints for validation (steps/data/validate.py): a suite run on a
frame in the file context, and the validation's Data Docs built once at its end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

SUITE_NAME = "sift_sft_data"


@dataclass
class Suites:
    """The file context the checkpoints run in, and what they validated: Data Docs are built
    once for all of a validation's results (build_docs), not once per checkpoint run, which
    rebuilt the site's index every time (GX's UpdateDataDocsAction; 0.6 s a suite here)."""

    context: Any
    built: list = field(default_factory=list)


def run_suite(suites: Suites, name: str, frame: pd.DataFrame, expectations: list) -> list:
    """One checkpoint run; returns the per-expectation outcomes."""
    context = suites.context
    source = context.data_sources.add_or_update_pandas(name="sift")
    asset = source.add_dataframe_asset(name=name)
    batch = asset.add_batch_definition_whole_dataframe(f"{name}_all")
    suite = context.suites.add_or_update(
        gx.ExpectationSuite(name=f"{SUITE_NAME}_{name}", expectations=expectations)
    )
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"{SUITE_NAME}_{name}", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"{SUITE_NAME}_{name}",
            validation_definitions=[definition],
            # COMPLETE gives the index of every offending row, which quarantine needs.
            result_format={"result_format": "COMPLETE"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    for identifier, run in result.run_results.items():
        suites.built += [identifier, ExpectationSuiteIdentifier(name=run.suite_name)]
    return [outcome for run in result.run_results.values() for outcome in run.results]


def build_docs(suites: Suites) -> None:
    """The pages of this validation's results and suites, and the site's index, in one build:
    what UpdateDataDocsAction builds after each checkpoint run, built once."""
    # A suite run on several chunks (or again after quarantine) is named once: one page each.
    built = list(dict.fromkeys(suites.built))
    suites.context.build_data_docs(resource_identifiers=built, build_index=True)
