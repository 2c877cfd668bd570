"""The model card MLflow stores with each registered version, written from what the run knows.

Given none, mlflow.transformers looks the fine-tuned model's local folder up on the Hugging
Face hub as a repo id and warns that the id is malformed: false for every model Sift trains.
The card names the base model, data and code, and declares the base model's licence where the
base model declares one (its README.md front matter, or a LICENSE file whose first line names
a common licence). Where none is found, Sift warns once that the licence is unknown: that
warning is true, and MLflow would not give it once a card exists.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import ModelCard

logger = logging.getLogger(__name__)

# The first line of a LICENSE file → its SPDX-style id on the hub (the common ones only).
LICENSE_HEADINGS = {
    "MIT License": "mit",
    "Apache License": "apache-2.0",
    "BSD 3-Clause License": "bsd-3-clause",
    "BSD 2-Clause License": "bsd-2-clause",
}


def declared_license(base_model: str) -> str | None:
    """The licence a local base model folder declares, or None (hub ids are not looked up:
    the registry step must work offline)."""
    folder = Path(base_model)
    if not folder.is_dir():
        return None
    readme = folder / "README.md"
    if readme.is_file():
        license_id = ModelCard.load(readme).data.license
        if isinstance(license_id, str) and license_id:
            return license_id
    license_file = folder / "LICENSE"
    if license_file.is_file():
        first_line = license_file.read_text(errors="replace").strip().splitlines()[:1]
        for heading, license_id in LICENSE_HEADINGS.items():
            if first_line and first_line[0].strip().startswith(heading):
                return license_id
    return None


def model_card(model_name: str, tags: dict[str, str]) -> ModelCard:
    """The card of a version of model_name registered with these lineage tags."""
    base_model = tags.get("model.base", "")
    license_id = declared_license(base_model) if base_model else None
    if license_id is None:
        logger.warning(
            "%s: the base model %r declares no licence Sift can read (README.md front matter "
            "or LICENSE); check its terms before sharing the model",
            model_name,
            base_model or "(unknown)",
        )
    front = {"license": license_id, "tags": ["sift"]}
    header = "\n".join(f"{key}: {value}" for key, value in front.items() if value)
    lines = [
        f"# {model_name}",
        "",
        f"Fine-tuned by Sift from `{base_model or 'unknown'}`.",
        "",
        *(
            f"- {key}: `{tags[key]}`"
            for key in ("dvc.md5", "git.sha", "select.selector", "mlflow.source_run")
            if key in tags
        ),
    ]
    return ModelCard(f"---\n{header}\n---\n" + "\n".join(lines) + "\n")
