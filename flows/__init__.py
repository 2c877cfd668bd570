"""Sift's Prefect flows and CLI: wiring only, the work is in steps/."""
