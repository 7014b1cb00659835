"""infra/ checked as far as this machine allows: YAML/JSON structure, secrets only from env or ignored files,
the lock-down (non-root image, pinned tags, TLS proxy, Prefect auth from a secret, the k8s securityContext),
and MLflow's accounts for real: a basic-auth server with infra's config, set up by infra/mlflow_users.py.

Docker is not available here; `docker compose config` runs only where the compose plugin is installed.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from mlflow import MlflowClient
from mlflow.server.auth.client import AuthServiceClient
from prefect.utilities.templating import apply_values, find_placeholders

from tests.pipeline_fixtures import tool_env
from tests.servers import Processes
from tests.topology import create_mlflow_users, credentials, refused, start_locked_mlflow, wait_mlflow

INFRA = Path(__file__).resolve().parents[1] / "infra"
COMPOSE = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
VAR_RE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def test_compose_has_the_whole_stack() -> None:
    assert {
        "prefect-db",
        "prefect-server",
        "mlflow-db",
        "mlflow",
        "minio",
        "minio-init",
        "worker-cpu",
        "worker-gpu",
    } <= set(SERVICES)
    assert "postgresql+asyncpg://" in SERVICES["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow = " ".join(SERVICES["mlflow"]["command"])
    assert "--app-name=basic-auth" in mlflow and "postgresql://" in mlflow and "s3://" in mlflow
    assert SERVICES["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_registry_webhooks_go_to_the_receiver_over_https_only() -> None:
    env = SERVICES["mlflow"]["environment"]
    assert env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] == "https" and env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] == "true"
    receiver = SERVICES["webhook-receiver"]["command"]
    assert receiver[:4] == ["python", "-m", "flows.mlflow_webhook", "serve"]
    assert any(a.startswith("--ssl-keyfile=") for a in receiver) and any(
        a.startswith("--ssl-certfile=") for a in receiver
    )
    assert env["REQUESTS_CA_BUNDLE"].startswith("/run/secrets/")  # MLflow checks the receiver's certificate
    assert all(COMPOSE["secrets"][s]["file"].startswith("./secrets/") for s in COMPOSE["secrets"])


def test_workers_serve_the_two_pools_and_the_gpu_worker_reserves_nvidia_devices() -> None:
    assert SERVICES["worker-cpu"]["command"][:5] == ["prefect", "worker", "start", "--pool", "default"]
    assert SERVICES["worker-gpu"]["command"][:5] == ["prefect", "worker", "start", "--pool", "gpu"]
    [device] = SERVICES["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "cu" in SERVICES["worker-gpu"]["build"]["args"]["TORCH_INDEX_URL"]
    for name in ("worker-cpu", "worker-gpu"):
        env = SERVICES[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api" and env["NMT_WORKDIR"]
        assert SERVICES[name]["volumes"]  # its own persistent clone + DVC cache


def test_secrets_come_only_from_env_or_ignored_files() -> None:
    text = (INFRA / "docker-compose.yml").read_text()
    used = set(VAR_RE.findall(text))
    example = {line.split("=", 1)[0] for line in (INFRA / ".env.example").read_text().splitlines() if "=" in line}
    assert used <= example, f"not in .env.example: {used - example}"
    for service in SERVICES.values():
        env = service.get("environment") or {}
        for key, value in env.items():
            if re.search("PASSWORD|SECRET|TOKEN", key):
                assert VAR_RE.search(str(value)), f"{key} must come from .env, not be written in the file"
    ignored = (INFRA / ".gitignore").read_text().splitlines()
    assert ".env" in ignored and "secrets/*" in ignored
    assert COMPOSE["secrets"]["git-credentials"]["file"].startswith("./secrets/")
    auth = configparser.ConfigParser()
    auth.read(INFRA / "mlflow-basic-auth.ini")
    assert "admin_password" not in auth["mlflow"]  # MLFLOW_AUTH_ADMIN_PASSWORD, from .env


def test_dockerfile_pins_torch_and_installs_the_s3_remote() -> None:
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"torch==\$\{TORCH_VERSION\}", text) and "ARG TORCH_VERSION=2.13.0" in text
    assert '".[s3]"' in text and "mlflow[auth]" in text and "worker-entrypoint" in text


def test_the_image_runs_as_an_unprivileged_user() -> None:
    lines = [line.split() for line in (INFRA / "Dockerfile").read_text().splitlines() if line.strip()]
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the last USER must not be root"
    entrypoint = next(i for i, words in enumerate(lines) if words[0] == "ENTRYPOINT")
    assert max(i for i, words in enumerate(lines) if words[0] == "USER") < entrypoint


def image_tags() -> dict[str, str]:
    images = {name: service["image"] for name, service in SERVICES.items() if "image" in service}
    images["Dockerfile"] = re.search(r"^FROM (\S+)", (INFRA / "Dockerfile").read_text(), re.M)[1]
    template = json.loads((INFRA / "k8s/gpu-work-pool.json").read_text())
    images["k8s"] = template["variables"]["properties"]["image"]["default"]
    return images


def test_every_image_is_pinned_to_a_version() -> None:
    for where, image in image_tags().items():
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{where}: {image} is not pinned to a version"
        assert not re.fullmatch(r"\d+(-.*)?", tag), f"{where}: {image} names only a major version"


def test_only_the_tls_proxy_publishes_ports_and_it_fronts_prefect_mlflow_and_the_object_store() -> None:
    published = {name for name, service in SERVICES.items() if service.get("ports")}
    assert published == {"proxy"}
    caddy = (INFRA / "Caddyfile").read_text()
    for upstream in ("prefect-server:4200", "mlflow:5000", "minio:9000"):
        assert f"reverse_proxy {upstream}" in caddy
    assert caddy.count("import tls_from_secrets") == 3 and "tls /run/secrets/tls.crt /run/secrets/tls.key" in caddy
    assert {"tls.crt", "tls.key"} <= set(SERVICES["proxy"]["secrets"])
    assert SERVICES["prefect-server"]["environment"]["PREFECT_UI_API_URL"].startswith("https://")


def test_prefect_requires_an_auth_string_read_from_a_secret() -> None:
    server = SERVICES["prefect-server"]
    assert "prefect-auth-string" in server["secrets"]
    assert 'PREFECT_SERVER_API_AUTH_STRING="$$(cat /run/secrets/prefect-auth-string)"' in " ".join(server["command"])
    for name in ("worker-cpu", "worker-gpu"):
        assert "prefect-auth-string" in SERVICES[name]["secrets"]
        assert SERVICES[name]["environment"]["PREFECT_API_AUTH_STRING_FILE"] == "/run/secrets/prefect-auth-string"
    entrypoint = (INFRA / "worker-entrypoint.sh").read_text()
    assert 'PREFECT_API_AUTH_STRING="$(cat "$PREFECT_API_AUTH_STRING_FILE")"' in entrypoint
    assert COMPOSE["secrets"]["prefect-auth-string"]["file"].startswith("./secrets/")


def test_workers_hold_only_the_trainer_account_and_a_dvc_bucket_key() -> None:
    auth = configparser.ConfigParser()
    auth.read(INFRA / "mlflow-basic-auth.ini")
    assert auth["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    admin_password = SERVICES["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"]
    for name in ("worker-cpu", "worker-gpu"):
        env = SERVICES[name]["environment"]
        assert env["MLFLOW_TRACKING_USERNAME"] == "trainer"
        assert env["MLFLOW_TRACKING_PASSWORD"] != admin_password
        assert "MINIO_ROOT" not in json.dumps(env) and "MLFLOW_ADMIN" not in json.dumps(env)
    policy = json.loads((INFRA / "minio-dvc-policy.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {"arn:aws:s3:::dvc", "arn:aws:s3:::dvc/*"}


def test_kubernetes_gpu_pool_template_requests_gpus() -> None:
    template = json.loads((INFRA / "k8s/gpu-work-pool.json").read_text())
    variables = template["variables"]["properties"]
    # every placeholder in the job configuration is a declared variable
    names = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    assert names <= set(variables), names - set(variables)
    defaults = {k: v["default"] for k, v in variables.items() if "default" in v}
    job = apply_values(template["job_configuration"], {**defaults, "name": "train-abc", "command": "x", "labels": {}})
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "nmt-gpu-workspace"
    # locked down: not root, no privilege escalation, read-only root filesystem, its own service account
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/workspace", "/tmp"}
    assert job["env"]["HOME"].startswith("/workspace/")
    assert pod["serviceAccountName"] == "nmt-train" and pod["automountServiceAccountToken"] is False
    accounts = list(yaml.safe_load_all((INFRA / "k8s/service-accounts.yaml").read_text()))
    train = next(a for a in accounts if a["kind"] == "ServiceAccount" and a["metadata"]["name"] == "nmt-train")
    assert train["automountServiceAccountToken"] is False
    assert not any(b["kind"] == "RoleBinding" and b["subjects"][0]["name"] == "nmt-train" for b in accounts)


def compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not compose_available(), reason="the docker compose plugin is not installed here")
def test_docker_compose_config_is_valid(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("".join(f"{k}=x\n" for k in set(VAR_RE.findall((INFRA / "docker-compose.yml").read_text()))))
    proc = subprocess.run(
        ["docker", "compose", "--env-file", str(env), "-f", str(INFRA / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def locked_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server --app-name basic-auth` with infra's auth config (NO_PERMISSIONS), set up by mlflow_users.py."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    procs = Processes(root / "logs")
    try:
        uri, proc = start_locked_mlflow(procs, root, tool_env(root))
        wait_mlflow(procs, uri, proc)
        for _ in range(2):  # running it again changes nothing
            create_mlflow_users(uri, tool_env(root), ["nmt"], ["nmt-en-fr"])
        yield uri
    finally:
        procs.stop_all()


@pytest.mark.integration
def test_mlflow_accounts_trainer_edits_but_cannot_delete_or_grant_reader_only_reads(
    locked_mlflow: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = locked_mlflow
    assert (
        requests.get(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=nmt", timeout=30).status_code == 401
    )
    client, auth = MlflowClient(uri), AuthServiceClient(uri)

    for key, value in credentials("trainer").items():
        monkeypatch.setenv(key, value)
    experiment_id = client.get_experiment_by_name("nmt").experiment_id
    run = client.create_run(experiment_id)  # workers log runs ...
    client.log_metric(run.info.run_id, "loss", 1.0, step=1)
    client.set_registered_model_tag("nmt-en-fr", "checked", "yes")  # ... and edit the registered model
    assert refused(lambda: client.delete_registered_model("nmt-en-fr")) == 403
    assert refused(lambda: client.delete_experiment(experiment_id)) == 403
    assert refused(lambda: auth.grant_user_permission("reader", "registered_model", "nmt-en-fr", "MANAGE")) == 403
    assert refused(lambda: auth.update_user_admin("trainer", True)) == 403

    for key, value in credentials("reader").items():
        monkeypatch.setenv(key, value)
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 1.0}
    assert refused(lambda: client.create_run(experiment_id)) == 403
    assert refused(lambda: client.set_registered_model_tag("nmt-en-fr", "x", "y")) == 403

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    assert refused(lambda: client.get_experiment(experiment_id)) == 401
