"""Artifacts: declared Arrow schemas, the run-directory store, prompt sources, built-in data."""
