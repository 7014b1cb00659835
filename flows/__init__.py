"""Prefect flows over the DVC stages (built in a later issue)."""
