"""Pipeline stages: each `stages/<name>.py` is run by DVC as `python -m stages.<name>`."""
