"""Sift's pipeline steps: plain, typed functions that run without an orchestrator."""
