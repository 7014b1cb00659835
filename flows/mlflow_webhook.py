"""MLflow registry webhooks in, Prefect events out: the bridge from a promotion in the MLflow UI to delivery.

    export NMT_WEBHOOK_SECRET=$(openssl rand -hex 32)     # the same secret for both commands
    python -m flows.mlflow_webhook serve --host 0.0.0.0 --port 8900 --ssl-keyfile key.pem --ssl-certfile cert.pem
    python -m flows.mlflow_webhook register --tracking-uri https://mlflow:5000 --url https://receiver:8900/mlflow

`serve` runs the receiver (Starlette under uvicorn, both already installed with MLflow and Prefect). Each
POST must carry MLflow's signature headers: X-MLflow-Signature = "v1," + base64(HMAC-SHA256(secret,
"<delivery id>.<timestamp>.<body>")), X-MLflow-Timestamp (Unix seconds) and X-MLflow-Delivery-Id. An
unsigned or wrongly signed delivery gets 401; a timestamp more than --tolerance-s away from now, or a
delivery id already accepted, gets 400. A valid `model_version_alias.created` becomes the Prefect event
`mlflow.model-version.alias.created` on the resource `mlflow.model-version.<name>.<version>`, with the
labels `mlflow.model-name`, `mlflow.model-version` and `mlflow.alias` (what the deliver-champion trigger in
prefect.yaml matches); the receiver answers 204 once the Prefect server has it, and 502 if it could not
be sent (MLflow then retries the same delivery). Other registry events are acknowledged and ignored.

`register` creates (or updates, by name) the MLflow webhook that calls the receiver on every alias change.
MLflow delivers only to https:// URLs on public addresses unless its server is started with
MLFLOW_WEBHOOK_ALLOWED_SCHEMES and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS (see infra/README.md), and caches its
webhook list for MLFLOW_WEBHOOK_CACHE_TTL seconds (60 by default) before a new one takes effect.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SECRET_ENV = "NMT_WEBHOOK_SECRET"
WEBHOOK_NAME = "nmt-deliver-champion"
EVENT = "mlflow.model-version.alias.created"
MAX_BODY = 64 * 1024  # an alias payload is ~200 bytes
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")  # what our registered model names look like
log = logging.getLogger("flows.mlflow_webhook")


class Rejected(Exception):
    """A delivery refused: `status` is the HTTP answer, the message the one line that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's webhook signature (mlflow/webhooks/delivery.py): "v1," + base64 HMAC-SHA256 of id.timestamp.body."""
    signed = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


@dataclass
class SeenDeliveries:
    """Delivery ids accepted within the timestamp tolerance: an older one is refused by its timestamp anyway."""

    tolerance_s: float
    seen: dict[str, float] = field(default_factory=dict)  # delivery id -> when it stops mattering
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __contains__(self, delivery_id: str) -> bool:
        with self.lock:
            now = time.time()
            self.seen = {d: until for d, until in self.seen.items() if until > now}
            return delivery_id in self.seen

    def add(self, delivery_id: str) -> None:
        with self.lock:
            self.seen[delivery_id] = time.time() + 2 * self.tolerance_s


def verify(headers: dict[str, str], body: bytes, secret: str, tolerance_s: float, seen: SeenDeliveries) -> str:
    """The delivery id of a correctly signed, fresh, new delivery; raises Rejected otherwise."""
    given = headers.get("x-mlflow-signature")
    delivery_id = headers.get("x-mlflow-delivery-id", "")
    timestamp = headers.get("x-mlflow-timestamp", "")
    if not given:
        raise Rejected(401, "unsigned delivery: no X-MLflow-Signature header")
    if not delivery_id or not timestamp.isdigit():
        raise Rejected(400, "X-MLflow-Delivery-Id and a numeric X-MLflow-Timestamp are required")
    if not hmac.compare_digest(given.encode(), signature(secret, delivery_id, timestamp, body).encode()):
        raise Rejected(401, "bad signature: not signed with this receiver's secret")
    age = time.time() - int(timestamp)
    if abs(age) > tolerance_s:
        raise Rejected(
            400, f"stale delivery: timestamp {timestamp} is {age:.0f}s from now (tolerance {tolerance_s:.0f}s)"
        )
    if delivery_id in seen:
        raise Rejected(400, f"replayed delivery: {delivery_id[:64]} was accepted already")
    return delivery_id


def alias_event(payload: Any, delivery_id: str) -> dict[str, Any] | None:
    """The Prefect event for an alias payload; None for other registry events. Raises Rejected on a bad payload."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        raise Rejected(400, "payload: expected a JSON object with a `data` object")
    if (payload.get("entity"), payload.get("action")) != ("model_version_alias", "created"):
        return None
    data = payload["data"]
    name, version, alias = data.get("name"), data.get("version"), data.get("alias")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise Rejected(400, f"payload: data.name {str(name)[:100]!r} is not a registered model name")
    if not isinstance(version, str | int) or not str(version).isdigit() or len(str(version)) > 9:
        raise Rejected(400, f"payload: data.version {str(version)[:100]!r} is not a version number")
    if not isinstance(alias, str) or not NAME_RE.match(alias):
        raise Rejected(400, f"payload: data.alias {str(alias)[:100]!r} is not an alias")
    return {
        # one delivery, one event id: a delivery MLflow retries after a lost answer is the same event
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"mlflow-webhook-delivery:{delivery_id}")),
        "occurred": datetime.now(UTC).isoformat(),
        "event": EVENT,
        "resource": {
            "prefect.resource.id": f"mlflow.model-version.{name}.{version}",
            "prefect.resource.name": f"{name} version {version}",
            "mlflow.model-name": name,
            "mlflow.model-version": str(version),
            "mlflow.alias": alias,
        },
        "payload": {"delivery_id": delivery_id, "mlflow_timestamp": str(payload.get("timestamp", ""))[:64]},
    }


async def send_to_prefect(event: dict[str, Any]) -> None:
    """POST the event to the Prefect server at $PREFECT_API_URL; raises if it does not take it."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        response = await client.request("POST", "/events", json=[event])
        response.raise_for_status()


def create_app(
    secret: str, tolerance_s: float = 300, emit: Callable[[dict[str, Any]], Awaitable[None]] = send_to_prefect
) -> Starlette:
    """The receiver: POST /mlflow (MLflow's webhook), GET /health. `emit` sends an event on (to Prefect)."""
    seen = SeenDeliveries(tolerance_s)

    async def receive(request: Request) -> Response:
        try:
            body = await read_body(request)
            delivery_id = verify(dict(request.headers), body, secret, tolerance_s, seen)
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise Rejected(400, "payload: not JSON") from None
            event = alias_event(payload, delivery_id)
        except Rejected as err:
            log.warning("refused a delivery from %s: %s", request.client.host if request.client else "?", err)
            return JSONResponse({"error": str(err)}, status_code=err.status)
        if event is None:
            seen.add(delivery_id)
            return JSONResponse({"ignored": f"{payload.get('entity')}.{payload.get('action')}"}, status_code=202)
        try:
            await emit(event)
        except Exception as err:  # the Prefect server is down or refused it: MLflow retries on 502
            log.error("could not send %s for %s to Prefect: %s", EVENT, event["resource"]["prefect.resource.id"], err)
            return JSONResponse({"error": f"Prefect did not take the event: {err}"}, status_code=502)
        seen.add(delivery_id)  # only now: a retry of a delivery that failed above must get through
        log.info("%s -> %s (%s)", delivery_id, EVENT, event["resource"]["prefect.resource.name"])
        return Response(status_code=204)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/mlflow", receive, methods=["POST"]), Route("/health", health, methods=["GET"])])


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise Rejected(413, f"body of {declared} bytes; at most {MAX_BODY}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise Rejected(413, f"body over {MAX_BODY} bytes")
    return body


def secret_from_env() -> str:
    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < 16:
        sys.exit(f"mlflow_webhook: error: set {SECRET_ENV} to the webhook's secret (16 characters or more)")
    return secret


def register(tracking_uri: str, url: str, secret: str) -> str:
    """Create the webhook (or update the one of the same name) for alias changes; returns what was done."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    events = ["model_version_alias.created"]
    for hook in all_webhooks(client):
        if hook.name == WEBHOOK_NAME:
            client.update_webhook(hook.webhook_id, url=url, events=events, secret=secret, status="ACTIVE")
            return f"updated webhook {WEBHOOK_NAME} ({hook.webhook_id}) -> {url}"
    hook = client.create_webhook(name=WEBHOOK_NAME, url=url, events=events, secret=secret, description=__doc__[:900])
    return f"created webhook {WEBHOOK_NAME} ({hook.webhook_id}) -> {url}"


def all_webhooks(client) -> Iterator[Any]:
    token = None
    while True:
        page = client.list_webhooks(page_token=token)
        yield from page
        if not (token := page.token):
            return


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.mlflow_webhook", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the receiver (needs PREFECT_API_URL and NMT_WEBHOOK_SECRET)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8900)
    serve.add_argument("--tolerance-s", type=float, default=300, help="accepted clock skew and replay window")
    serve.add_argument("--ssl-keyfile", help="serve HTTPS with this key (infra: always)")
    serve.add_argument("--ssl-certfile", help="... and this certificate")
    reg = commands.add_parser("register", help="create or update the MLflow webhook that calls the receiver")
    reg.add_argument("--tracking-uri", required=True, help="the MLflow server, e.g. https://mlflow:5000")
    reg.add_argument("--url", required=True, help="the receiver's POST URL as MLflow reaches it, ending in /mlflow")
    args = parser.parse_args(argv)
    secret = secret_from_env()
    if args.command == "register":
        from mlflow.exceptions import MlflowException

        try:
            print(register(args.tracking_uri, args.url, secret))
        except MlflowException as err:
            sys.exit(f"mlflow_webhook: error: {err.message}")
        return
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(secret, args.tolerance_s),
        host=args.host,
        port=args.port,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        log_level="info",
    )


if __name__ == "__main__":
    main()
