"""The MLflow webhook receiver (flows/mlflow_webhook.py): signatures made with MLflow's own signing code, and
what it refuses. The events go to a list here; tests/test_promotion_ui.py runs it between a real MLflow server
(which signs and sends the deliveries) and a real Prefect server (which takes the events)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from mlflow.webhooks.constants import (
    WEBHOOK_DELIVERY_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_TIMESTAMP_HEADER,
)
from mlflow.webhooks.delivery import _generate_hmac_signature
from starlette.testclient import TestClient

from flows.mlflow_webhook import EVENT, MAX_BODY, create_app, main

SECRET = "s3cret-0123456789abcdef"
ALIAS = {
    "entity": "model_version_alias",
    "action": "created",
    "data": {"name": "nmt-en-fr", "alias": "champion", "version": "7"},
}


def delivery(
    payload: Any, secret: str | None = SECRET, timestamp: float | None = None, delivery_id: str | None = None
) -> tuple[bytes, dict[str, str]]:
    """A delivery as MLflow's webhook code sends it (mlflow/webhooks/delivery.py): body and headers."""
    body = json.dumps(payload)
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(time.time() if timestamp is None else timestamp))
    headers = {
        "Content-Type": "application/json",
        WEBHOOK_DELIVERY_ID_HEADER: delivery_id,
        WEBHOOK_TIMESTAMP_HEADER: stamp,
    }
    if secret is not None:
        headers[WEBHOOK_SIGNATURE_HEADER] = _generate_hmac_signature(secret, delivery_id, stamp, body)
    return body.encode(), headers


class Receiver:
    def __init__(self, fail: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail = fail
        self.client = TestClient(create_app(SECRET, tolerance_s=300, emit=self.emit))

    async def emit(self, event: dict[str, Any]) -> None:
        if self.fail:
            raise ConnectionError("Prefect is down")
        self.events.append(event)

    def post(self, body: bytes, headers: dict[str, str]):
        return self.client.post("/mlflow", content=body, headers=headers)


def test_a_signed_alias_delivery_becomes_one_prefect_event() -> None:
    r = Receiver()
    reply = r.post(*delivery(ALIAS))
    assert reply.status_code == 204, reply.text
    [event] = r.events
    assert event["event"] == EVENT
    assert event["resource"] == {
        "prefect.resource.id": "mlflow.model-version.nmt-en-fr.7",
        "prefect.resource.name": "nmt-en-fr version 7",
        "mlflow.model-name": "nmt-en-fr",
        "mlflow.model-version": "7",
        "mlflow.alias": "champion",
    }


def test_unsigned_and_wrongly_signed_deliveries_are_refused_with_401() -> None:
    r = Receiver()
    for secret in (None, "another-secret-0123456789"):
        reply = r.post(*delivery(ALIAS, secret=secret))
        assert reply.status_code == 401 and "signature" in reply.json()["error"].lower()
    # a body changed after signing
    body, headers = delivery(ALIAS)
    assert r.post(body.replace(b'"7"', b'"8"'), headers).status_code == 401
    assert r.events == []


def test_stale_and_future_timestamps_are_refused_with_400() -> None:
    r = Receiver()
    for offset in (-301, 3600):
        reply = r.post(*delivery(ALIAS, timestamp=time.time() + offset))
        assert reply.status_code == 400 and "stale delivery" in reply.json()["error"]
    # the timestamp is part of what is signed: moving it without the secret breaks the signature
    body, headers = delivery(ALIAS, timestamp=time.time() - 1000)
    headers[WEBHOOK_TIMESTAMP_HEADER] = str(int(time.time()))
    assert r.post(body, headers).status_code == 401
    assert r.events == []


def test_a_replayed_delivery_is_refused_with_400() -> None:
    r = Receiver()
    body, headers = delivery(ALIAS)
    assert r.post(body, headers).status_code == 204
    reply = r.post(body, headers)
    assert reply.status_code == 400 and "replayed delivery" in reply.json()["error"]
    assert len(r.events) == 1


def test_a_delivery_prefect_did_not_take_gets_502_and_its_retry_goes_through() -> None:
    r = Receiver(fail=True)
    body, headers = delivery(ALIAS)
    assert r.post(body, headers).status_code == 502  # MLflow retries on 5xx
    r.fail = False
    assert r.post(body, headers).status_code == 204 and len(r.events) == 1


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({**ALIAS, "data": {**ALIAS["data"], "name": "x; rm -rf /"}}, "data.name"),
        ({**ALIAS, "data": {**ALIAS["data"], "version": "7 OR 1=1"}}, "data.version"),
        ({**ALIAS, "data": {**ALIAS["data"], "alias": ""}}, "data.alias"),
        ({**ALIAS, "data": "champion"}, "`data` object"),
        ([1, 2], "`data` object"),
    ],
)
def test_a_signed_but_malformed_payload_gets_one_clear_error(payload: Any, error: str) -> None:
    r = Receiver()
    reply = r.post(*delivery(payload))
    assert reply.status_code == 400 and error in reply.json()["error"]
    assert "\n" not in reply.json()["error"] and r.events == []


def test_other_registry_events_are_acknowledged_and_ignored_and_huge_bodies_refused() -> None:
    r = Receiver()
    created = {"entity": "model_version", "action": "created", "data": {"name": "nmt-en-fr", "version": "7"}}
    assert r.post(*delivery(created)).status_code == 202 and r.events == []
    body, headers = delivery({**ALIAS, "pad": "x" * MAX_BODY})
    assert r.post(body, headers).status_code == 413
    assert r.client.get("/health").json() == {"status": "ok"}


def test_the_commands_need_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NMT_WEBHOOK_SECRET", "short")
    with pytest.raises(SystemExit) as stop:
        main(["register", "--tracking-uri", "http://127.0.0.1:9", "--url", "https://receiver/mlflow"])
    assert "NMT_WEBHOOK_SECRET" in str(stop.value) and "\n" not in str(stop.value)
