"""Data stage: ingest files or hub datasets, validate them (Great Expectations), version them (DVC)."""
