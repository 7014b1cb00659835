"""Prefect flows over the DVC stages: pipeline (orchestration), train (on the gpu pool), evaluate-champion."""
