"""Set up the MLflow users of the team stack: run once, as the admin, after the server is up.

    MLFLOW_TRACKING_URI=https://mlflow.example.org MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \
    NMT_MLFLOW_TRAINER_PASSWORD=... NMT_MLFLOW_READER_PASSWORD=... \
    python infra/mlflow_users.py --experiment nmt --experiment nmt-champion --model nmt-en-fr

The server runs the basic-auth app with `default_permission = NO_PERMISSIONS` (infra/mlflow-basic-auth.ini):
a user sees nothing it was not granted. This script creates

- `trainer` (NMT_MLFLOW_TRAINER_USERNAME, default "trainer"), the account every worker uses: EDIT on the
  experiments and registered models named here (log runs, register versions, set tags and aliases), never
  MANAGE (it cannot delete them or change anyone's permissions);
- `reader` (NMT_MLFLOW_READER_USERNAME, default "reader"): READ on the same (dashboards, people).

The admin creates the experiments and registered models itself: in MLflow the creator of a resource gets
MANAGE on it, which the trainer must not have. Running it again changes nothing (passwords are only set
when a user is created). docker-compose.yml runs it as the one-shot service `mlflow-init`.
"""

from __future__ import annotations

import argparse
import os
import sys

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient

ROLES = {"trainer": "EDIT", "reader": "READ"}  # account -> permission on each experiment and model


def ensure_user(auth: AuthServiceClient, username: str, password: str) -> None:
    try:
        auth.get_user(username)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(username, password)
        print(f"mlflow_users: created user {username}")


def ensure_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def ensure_model(client: MlflowClient, name: str) -> str:
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name)
    return name


def ensure_permission(auth: AuthServiceClient, username: str, kind: str, resource_id: str, permission: str) -> None:
    """Grant `permission`, replacing another one the user already has on the resource."""
    try:
        auth.grant_user_permission(username, kind, resource_id, permission)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, kind, resource_id)
        auth.grant_user_permission(username, kind, resource_id, permission)


def setup(tracking_uri: str, experiments: list[str], models: list[str], passwords: dict[str, str]) -> None:
    """Create the accounts in `passwords` (role -> password) and grant each its permission on every resource."""
    auth, client = AuthServiceClient(tracking_uri), MlflowClient(tracking_uri)
    names = {role: os.environ.get(f"NMT_MLFLOW_{role.upper()}_USERNAME", role) for role in ROLES}
    for role, password in passwords.items():
        ensure_user(auth, names[role], password)
    resources = [("experiment", ensure_experiment(client, e)) for e in experiments]
    resources += [("registered_model", ensure_model(client, m)) for m in models]
    for role in passwords:
        for kind, resource_id in resources:
            ensure_permission(auth, names[role], kind, resource_id, ROLES[role])
        print(f"mlflow_users: {names[role]} has {ROLES[role]} on {len(resources)} experiments and models")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlflow_users", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", action="append", default=[], help="an experiment the workers log to")
    parser.add_argument("--model", action="append", default=[], help="a registered model the workers export to")
    args = parser.parse_args(argv)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    missing = [
        v
        for v in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        if not os.environ.get(v)
    ]
    missing += [
        f"NMT_MLFLOW_{role.upper()}_PASSWORD"
        for role in ROLES
        if not os.environ.get(f"NMT_MLFLOW_{role.upper()}_PASSWORD")
    ]
    if missing or tracking_uri is None:
        sys.exit(
            f"mlflow_users: error: set {', '.join(missing)} (the admin's credentials, and the new accounts' passwords)"
        )
    passwords = {role: os.environ[f"NMT_MLFLOW_{role.upper()}_PASSWORD"] for role in ROLES}
    try:
        setup(tracking_uri, args.experiment, args.model, passwords)
    except MlflowException as err:
        sys.exit(f"mlflow_users: error: {err.message}")


if __name__ == "__main__":
    main()
