"""Data stage: ingest files or hub datasets, validate (Great Expectations), version (DVC)."""
