"""Register the three deployments with the Prefect server at $PREFECT_API_URL.

    python -m flows.deploy                       # pipeline (weekly), train (gpu pool), evaluate-champion (daily)
    python -m flows.deploy --param remote=s3 --param 'overrides={"data.tgt_lang": "de"}'

Every deployment runs its flow from the worker's own clone of this repository, named by the worker's
$NMT_WORKDIR (the pull step below is resolved on the worker, at run time); nothing is uploaded.
Re-running this script updates the deployments in place.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ObjectAlreadyExists

from flows.evaluate_champion import evaluate_champion
from flows.pipeline import pipeline
from flows.train import train

# `{{ $NMT_WORKDIR }}` is filled in on the worker, at run time, from its environment (this script stores it verbatim).
PULL_STEPS = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $NMT_WORKDIR }}"}}]


@dataclass
class Spec:
    flow: Flow
    entrypoint: str
    pool: str
    cron: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def specs(default_pool: str, gpu_pool: str, pipeline_cron: str, champion_cron: str) -> list[Spec]:
    return [
        Spec(pipeline, "flows/pipeline.py:pipeline", default_pool, pipeline_cron, description="weekly retrain"),
        Spec(train, "flows/train.py:train", gpu_pool, description="the train stage, dispatched by `pipeline`"),
        Spec(
            evaluate_champion,
            "flows/evaluate_champion.py:evaluate_champion",
            default_pool,
            champion_cron,
            description="re-score models:/<name>@champion on the test sets",
        ),
    ]


async def deploy(
    items: list[Spec], timezone: str = "UTC", schedules_active: bool = True, create_pools: bool = False
) -> dict[str, str]:
    """Create or update each deployment; returns {"flow/deployment": id}."""
    ids = {}
    async with get_client() as client:
        if create_pools:
            for pool in sorted({s.pool for s in items}):
                with contextlib.suppress(ObjectAlreadyExists):
                    await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        for s in items:
            flow_id = await client.create_flow_from_name(s.flow.name)
            schedules = (
                [
                    DeploymentScheduleCreate(
                        schedule=CronSchedule(cron=s.cron, timezone=timezone), active=schedules_active
                    )
                ]
                if s.cron
                else []
            )
            deployment_id = await client.create_deployment(
                flow_id=flow_id,
                name=s.flow.name,
                entrypoint=s.entrypoint,
                work_pool_name=s.pool,
                pull_steps=PULL_STEPS,
                parameters=s.parameters,
                parameter_openapi_schema=s.flow.parameters.model_dump_for_openapi(),
                schedules=schedules,
                description=s.description,
                enforce_parameter_schema=True,
            )
            ids[f"{s.flow.name}/{s.flow.name}"] = str(deployment_id)
    return ids


def parse_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected name=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--default-pool", default="default", help="work pool of pipeline and evaluate-champion")
    parser.add_argument("--gpu-pool", default="gpu", help="work pool of the train deployment")
    parser.add_argument("--pipeline-cron", default="0 3 * * 1", help="default: Mondays 03:00")
    parser.add_argument("--champion-cron", default="0 6 * * *", help="default: daily 06:00")
    parser.add_argument("--timezone", default="UTC", help="time zone of the cron schedules (default: UTC)")
    parser.add_argument("--param", type=parse_param, action="append", default=[], help="pipeline parameter name=JSON")
    parser.add_argument("--paused", action="store_true", help="register the schedules inactive")
    parser.add_argument("--create-pools", action="store_true", help="create missing pools as `process` pools")
    args = parser.parse_args()
    items = specs(args.default_pool, args.gpu_pool, args.pipeline_cron, args.champion_cron)
    items[0].parameters = dict(args.param)
    ids = asyncio.run(deploy(items, args.timezone, not args.paused, args.create_pools))
    for name, deployment_id in ids.items():
        print(f"deployed {name} ({deployment_id})")


if __name__ == "__main__":
    main()
