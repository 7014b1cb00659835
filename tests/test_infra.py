"""infra/ checked as far as this machine allows: YAML/JSON structure, secrets only from env or ignored files.

Docker is not available here; `docker compose config` runs only where the compose plugin is installed.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prefect.utilities.templating import apply_values, find_placeholders

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
