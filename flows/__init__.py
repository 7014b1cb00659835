"""Prefect flows over the DVC stages: pipeline (orchestration), train (on the gpu pool), evaluate-champion."""

from seq2seq.redact import redact_all_logs

redact_all_logs()  # every flow process imports this package: no log line it sends to Prefect carries credentials
