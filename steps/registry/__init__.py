"""Registry stage: MLflow model versions, aliases and promotion."""
