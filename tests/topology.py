"""The team's servers on 127.0.0.1, locked down as infra/ runs them, for the rehearsal and fault tests.

- PostgreSQL for the servers' databases (`start_postgres`; Debian's server binaries, run as the `postgres`
  user when the tests run as root, since initdb refuses root);
- an S3 object store: `moto_server` (`start_moto`), holding MLflow's artifacts and the DVC remote;
- `mlflow server --app-name basic-auth` with infra's auth config (default NO_PERMISSIONS), its artifacts
  proxied to S3 (`start_locked_mlflow`), and the `trainer`/`reader` accounts made by infra/mlflow_users.py
  (`create_mlflow_users`);
- Prefect's server is tests/prefect_fixtures.py's `start_server`, given `prefect_auth_env` (and a database).

Processes and the readiness deadline come from tests/servers.py; each test module stops what it started.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from tests.servers import SERVER_DEADLINE, Processes, free_port, mlflow_server_cmd, tail

INFRA = Path(__file__).resolve().parents[1] / "infra"
BIN = Path(sys.executable).parent
PASSWORDS = {"admin": "admin-password-1", "trainer": "trainer-password-2", "reader": "reader-password-3"}  # >= 12 chars
PREFECT_AUTH_STRING = "nmt:prefect-auth-password-4"
# moto takes any key; these are distinctive so that a test can look for them where they must not be
S3_KEYS = {"AWS_ACCESS_KEY_ID": "rehearsal-key-id", "AWS_SECRET_ACCESS_KEY": "rehearsal-s3-secret-5"}
SECRETS = (*PASSWORDS.values(), PREFECT_AUTH_STRING.split(":", 1)[1], S3_KEYS["AWS_SECRET_ACCESS_KEY"])


def credentials(user: str) -> dict[str, str]:
    """The environment with which an MLflow client logs in as `user`."""
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": PASSWORDS[user]}


def refused(call: Callable[[], object]) -> int:
    """The HTTP status with which MLflow refuses `call` (it must refuse it)."""
    with pytest.raises(MlflowException) as err:
        call()
    return err.value.get_http_status_code()


def prefect_auth_env(server: bool) -> dict[str, str]:
    """The auth string as the Prefect server reads it (`server`), or as clients and workers send it."""
    return {("PREFECT_SERVER_API_AUTH_STRING" if server else "PREFECT_API_AUTH_STRING"): PREFECT_AUTH_STRING}


# --- S3 --------------------------------------------------------------------------------------------


def start_moto(procs: Processes, root: Path, env: dict[str, str], buckets: tuple[str, ...] = ()) -> str:
    """`moto_server` on a free port, ready, with `buckets` created; returns its endpoint URL."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    port = endpoint.rsplit(":", 1)[1]
    proc = procs.start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", port], root, env)
    procs.wait_ready("moto", proc, f"{endpoint}/moto-api/")
    s3 = s3_client(endpoint)
    for bucket in buckets:
        s3.create_bucket(Bucket=bucket)
    return endpoint


def s3_client(endpoint: str):  # -> botocore's S3 client (its type is generated at run time)
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", **{k.lower(): v for k, v in S3_KEYS.items()}
    )


def s3_objects(endpoint: str, bucket: str) -> dict[str, int]:
    """Every key in `bucket` with its size."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


# --- PostgreSQL ------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The directory of Debian's PostgreSQL server binaries (off PATH), if installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@dataclass
class Postgres:
    """A throw-away cluster: user `postgres`, trust auth on 127.0.0.1 only."""

    port: int
    data: Path  # outside pytest's 0700 tmp directories when the server runs as another user

    def create_database(self, name: str, driver: str) -> str:
        """Create database `name`; its SQLAlchemy URL for `driver` (psycopg2 for MLflow, asyncpg for Prefect)."""
        import psycopg2

        with contextlib.closing(psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres")) as conn:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{name}"

    def remove(self) -> None:
        shutil.rmtree(self.data, ignore_errors=True)


def start_postgres(procs: Processes, pg_bin: Path) -> Postgres:
    """A throw-away PostgreSQL cluster on a free port, ready; as user `postgres` when we are root."""
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix="nmt-postgres-"))
    if as_user:
        shutil.chown(data, "postgres")
    initdb = [*as_user, str(pg_bin / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    subprocess.run(initdb, check=True, capture_output=True, timeout=120)
    port = free_port()
    cmd = [*as_user, str(pg_bin / "postgres"), "-D", str(data / "db"), "-p", str(port), "-k", str(data)]
    proc = procs.start("postgres", [*cmd, "-c", "listen_addresses=127.0.0.1"], data, dict(os.environ))
    ready = [str(pg_bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
    deadline = time.monotonic() + SERVER_DEADLINE
    while subprocess.run(ready).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not start:\n{tail(procs.log_path('postgres'))}")
        time.sleep(0.3)
    return Postgres(port, data)


# --- MLflow with basic auth ------------------------------------------------------------------------


def locked_mlflow_env(root: Path, env: dict[str, str]) -> dict[str, str]:
    """The server's environment: infra's auth config (its user database under `root`) and the admin account."""
    auth = configparser.ConfigParser()
    auth.read(INFRA / "mlflow-basic-auth.ini")
    auth["mlflow"]["database_uri"] = f"sqlite:///{root}/basic_auth.db"
    root.mkdir(parents=True, exist_ok=True)
    with (root / "basic_auth.ini").open("w") as f:
        auth.write(f)
    return {
        **env,
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-the-test",  # the auth app refuses to start without one
    }


def start_locked_mlflow(
    procs: Processes,
    root: Path,
    env: dict[str, str],
    port: int | None = None,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
) -> tuple[str, subprocess.Popen]:
    """`mlflow server --app-name basic-auth` (not waited for: see `wait_mlflow`); returns its URL and process.
    Stores default to SQLite and a directory under `root`; `env` carries what an S3 destination needs."""
    port = port or free_port()
    cmd = mlflow_server_cmd(str(BIN / "mlflow"), root, port, backend_store_uri, artifacts_destination)
    proc = procs.start("mlflow", [*cmd, "--app-name", "basic-auth"], root, locked_mlflow_env(root, env))
    return f"http://127.0.0.1:{port}", proc


def wait_mlflow(procs: Processes, uri: str, proc: subprocess.Popen) -> None:
    procs.wait_ready("mlflow", proc, f"{uri}/health")


def create_mlflow_users(uri: str, env: dict[str, str], experiments: list[str], models: list[str]) -> None:
    """Run infra/mlflow_users.py as the admin: `trainer` gets EDIT, `reader` READ on the experiments and models."""
    setup_env = {**env, "MLFLOW_TRACKING_URI": uri, **credentials("admin")}
    setup_env.update(NMT_MLFLOW_TRAINER_PASSWORD=PASSWORDS["trainer"], NMT_MLFLOW_READER_PASSWORD=PASSWORDS["reader"])
    cmd = [sys.executable, str(INFRA / "mlflow_users.py")]
    cmd += [f"--experiment={e}" for e in experiments] + [f"--model={m}" for m in models]
    done = subprocess.run(cmd, env=setup_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
