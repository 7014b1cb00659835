"""Serve the champion and follow it: MLflow's own scoring server, reloaded when a new champion is delivered.

    MLFLOW_TRACKING_URI=http://mlflow:5000 python -m seq2seq.champion_server --name nmt-en-fr --port 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{"inputs": ["A dog runs."]}'
    curl -s 127.0.0.1:5001/champion        # {"name": ..., "version": ..., "backend": "ctranslate2-int8" | "pytorch"}

Requests go to the app that `mlflow models serve` runs (mlflow.pyfunc.scoring_server), for one pinned
version; every answer names it in the X-Model-Version header. A thread polls the registry every --poll-s
seconds. By default it follows deliveries: the registered model's tag `delivery.champion`, which the
deliver-champion flow sets once a new champion passed its checks (and never to a version it rejected).
With --follow alias it follows `@champion` itself (for a registry without the deliver-champion deployment).
A new version is loaded beside the old one, then swapped in: requests keep being answered by the old
model until the new one is ready, and requests in flight finish on the model they started on. A version
that fails to load is logged and skipped; the old one stays.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seq2seq.promote import CHAMPION, DELIVERED_TAG

log = logging.getLogger("seq2seq.champion_server")


@dataclass(frozen=True)
class Served:
    version: str
    backend: str
    app: Any  # the scoring server's ASGI app for this version
    files: tempfile.TemporaryDirectory  # the version's downloaded files, kept while it is served


def wanted_version(client, name: str, follow: str) -> str | None:
    """The version to serve now: the delivered champion (or `@champion` while none was delivered yet), or with
    follow="alias" whatever `@champion` points at."""
    from seq2seq.promote import current_champion

    if follow == "delivery":
        delivered = client.get_registered_model(name).tags.get(DELIVERED_TAG)
        if delivered:
            return delivered
    return current_champion(client, name)


def load(name: str, version: str) -> Served:
    """Download the version, check its files against the registry's tags (weights, CTranslate2 export), then
    load it as the pyfunc model with this installation's code (which checks the files against those records);
    the code stored with the version is not run."""
    from mlflow.pyfunc import scoring_server

    from seq2seq.registry import load_checked_pyfunc

    files = tempfile.TemporaryDirectory(prefix=f"champion-{version}-")
    _, model = load_checked_pyfunc(f"models:/{name}/{version}", Path(files.name))
    backend = getattr(model.unwrap_python_model(), "backend", "pytorch")
    return Served(version, backend, scoring_server.init(model), files)


class ChampionServer:
    """An ASGI app: GET /champion says what is served; everything else goes to the current version's app."""

    def __init__(self, client, name: str, follow: str, poll_s: float) -> None:
        self.client, self.name, self.follow, self.poll_s = client, name, follow, poll_s
        self.served: Served | None = None
        self.stopped = threading.Event()

    def start(self) -> None:
        """Load the first version (failing if there is none), then follow the registry in a thread."""
        version = wanted_version(self.client, self.name, self.follow)
        if version is None:
            raise SystemExit(f"champion_server: error: {self.name} has no version aliased {CHAMPION!r}")
        self.served = load(self.name, version)
        log.info("serving %s version %s (%s)", self.name, version, self.served.backend)
        threading.Thread(target=self.poll, name="follow-champion", daemon=True).start()

    def poll(self) -> None:
        while not self.stopped.wait(self.poll_s):
            try:
                version = wanted_version(self.client, self.name, self.follow)
                if version is None or self.served is None or version == self.served.version:
                    continue
                t0 = time.monotonic()
                served = load(self.name, version)
            except Exception as err:  # registry down, a broken version: keep serving the one we have
                log.error("%s: could not follow the champion (still serving %s): %s", self.name, self.version, err)
                continue
            old, self.served = self.served, served  # one assignment: the next request sees the new model
            log.info(
                "%s: version %s -> %s (%s), loaded in %.1fs",
                self.name,
                old.version,
                served.version,
                served.backend,
                time.monotonic() - t0,
            )

    @property
    def version(self) -> str | None:
        return self.served.version if self.served else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        served = self.served
        if served is None:
            raise RuntimeError("champion_server: no model loaded")
        if scope["type"] == "http" and scope["path"] == "/champion":
            body = json.dumps({"name": self.name, "version": served.version, "backend": served.backend}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": self.headers(served, body)})
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_version(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers(served)]}
            await send(message)

        await served.app(scope, receive, send_with_version)

    def headers(self, served: Served, body: bytes | None = None) -> list[tuple[bytes, bytes]]:
        headers = [(b"x-model-version", served.version.encode()), (b"x-model-backend", served.backend.encode())]
        if body is not None:
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        return headers

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.stopped.set()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m seq2seq.champion_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", required=True, help="the registered model, e.g. nmt-en-fr")
    parser.add_argument("--follow", choices=["delivery", "alias"], default="delivery", help="(default: delivery)")
    parser.add_argument("--poll-s", type=float, default=10.0, help="seconds between registry checks (default: 10)")
    parser.add_argument("--tracking-uri", help="the MLflow server (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)

    import mlflow
    import uvicorn
    from mlflow.exceptions import MlflowException

    from seq2seq.checkpoint import CheckpointError
    from seq2seq.redact import redact, redact_all_logs

    redact_all_logs()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    server = ChampionServer(mlflow.MlflowClient(), args.name, args.follow, args.poll_s)
    try:
        server.start()
    except MlflowException as err:
        sys.exit(f"champion_server: error: {args.name}: {redact(err.message)}")
    except CheckpointError as err:  # files that do not match the registry's records
        sys.exit(f"champion_server: error: {redact(str(err))}")
    uvicorn.run(server, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
