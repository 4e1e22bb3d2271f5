"""HTTP recommendations: FastAPI on uvicorn, in front of one ``Recommender``.

- ``POST /v1/recommend``: one user (``{"history": [...], "k": 10}``) or a batch
  (``{"users": [{"history": [...]}, ...], "k": 10}``); raw item IDs in and out.
- ``GET /v1/model``: the served artifact's metadata. ``POST /v1/admin/reload``: load an artifact
  (by default the same path again); a new artifact that fails verification leaves the old one
  serving. SIGHUP does the same.
- ``GET /healthz`` (the process is up), ``GET /readyz`` (a model is loaded), ``GET /metrics``.

With ``--token-file`` every ``/v1`` endpoint wants ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

from serve.artifact import ArtifactError
from serve.recommender import Recommender

MAX_K = 1000
MAX_USERS = 1024
MAX_BODY_BYTES = 1 << 20
KNOWN_PATHS = {"/v1/recommend", "/v1/model", "/v1/admin/reload", "/healthz", "/readyz", "/metrics"}
ItemID = StrictInt | StrictStr


class UserQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: ItemID | None = None  # echoed back, never interpreted
    history: list[ItemID] = Field(default_factory=list)
    actions: list[ItemID | float] | None = None
    timestamps: list[float] | None = None  # seconds
    allow: list[ItemID] | None = None
    deny: list[ItemID] | None = None

    @model_validator(mode="after")
    def _aligned(self):
        for name in ("actions", "timestamps"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.history):
                raise ValueError(f"{name} has {len(values)} entries for {len(self.history)} history items")
        return self


class RecommendRequest(UserQuery):
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True
    users: list[UserQuery] | None = Field(None, min_length=1, max_length=MAX_USERS)

    @model_validator(mode="after")
    def _one_or_many(self):
        single = self.model_fields_set & set(UserQuery.model_fields)
        if self.users is not None and single:
            raise ValueError(f"give either 'users' or one user's fields, not both (got {sorted(single)} too)")
        return self


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "lmrec_serve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=registry
        )
        self.latency = Histogram(
            "lmrec_serve_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.batch = Histogram(
            "lmrec_serve_batch_users",
            "Users per recommend request",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=registry,
        )
        self.model = Gauge(
            "lmrec_serve_model_info",
            "The served artifact (value 1)",
            ["version", "quant"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.reloads = Counter("lmrec_serve_reloads", "Artifact reloads by result", ["result"], registry=registry)
        for result in ("ok", "failed"):
            self.reloads.labels(result=result)  # exported as 0 from the start, so rates and alerts work

    def serving(self, rec: Recommender) -> None:
        self.model.clear()
        self.model.labels(version=rec.version, quant=rec.quant).set(1)


class Service:
    """The served model and its reload: a failed load never replaces a working model."""

    def __init__(self, artifact: Path, token: str | None, metrics: ServeMetrics):
        self.artifact, self.token, self.metrics = Path(artifact), token, metrics
        self.rec = Recommender.load(self.artifact)
        self.metrics.serving(self.rec)
        self._lock = threading.Lock()

    def reload(self, path: Path | None = None) -> Recommender:
        with self._lock:
            path = Path(path or self.artifact)
            try:
                rec = Recommender.load(path)
            except (ArtifactError, OSError, ValueError) as e:
                self.metrics.reloads.labels(result="failed").inc()
                raise ArtifactError(f"reload failed, still serving {self.rec.version}: {e}") from None
            self.rec, self.artifact = rec, path
            self.metrics.serving(rec)
            self.metrics.reloads.labels(result="ok").inc()
            return rec


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def create_app(
    artifact: str | Path, token: str | None = None, max_body: int = MAX_BODY_BYTES, handle_sighup: bool = True
) -> FastAPI:
    registry = CollectorRegistry()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # several uvicorn workers: one exposition for all
        from prometheus_client import multiprocess

        exposed = CollectorRegistry()
        multiprocess.MultiProcessCollector(exposed)
    else:
        exposed = registry
    metrics = ServeMetrics(registry)
    service = Service(Path(artifact), token, metrics)
    app = FastAPI(title="lmrec", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    if handle_sighup and threading.current_thread() is threading.main_thread():

        def on_sighup(signum, frame):
            def run():
                try:
                    rec = service.reload()
                    print(f"lmrec serve: reloaded {service.artifact} (version {rec.version})", flush=True)
                except ArtifactError as e:
                    print(f"lmrec serve: {e}", flush=True)

            threading.Thread(target=run, name="lmrec-reload", daemon=True).start()

        signal.signal(signal.SIGHUP, on_sighup)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        endpoint = path if path in KNOWN_PATHS else "other"  # bounded label values, whatever clients send
        if path.startswith("/v1/") and service.token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {service.token}".encode()):
                response = JSONResponse(
                    {"error": "missing or wrong bearer token"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                metrics.requests.labels(endpoint=endpoint, status="401").inc()
                return response
        response = await call_next(request)
        metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
        return response

    async def read_json(request: Request, empty=None):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            return None, _error(413, f"request body of {declared} bytes is larger than the limit of {max_body}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return None, _error(413, f"request body is larger than the limit of {max_body} bytes")
        if not body.strip() and empty is not None:
            return empty, None
        try:
            return json.loads(body), None
        except (ValueError, UnicodeDecodeError) as e:
            return None, _error(400, f"malformed JSON: {e}")

    @app.post("/v1/recommend")
    async def recommend(request: Request):
        payload, error = await read_json(request)
        if error is not None:
            return error
        if not isinstance(payload, dict):
            return _error(422, "body: expected a JSON object")
        try:
            query = RecommendRequest.model_validate(payload)
        except ValidationError as e:
            return _error(422, _validation_message(e))
        users = query.users if query.users is not None else [query]
        metrics.batch.observe(len(users))
        rec = service.rec
        results = await run_in_threadpool(
            rec.recommend,
            [u.history for u in users],
            query.k,
            query.exclude_seen,
            [u.allow for u in users],
            [u.deny for u in users],
            [u.actions for u in users] if any(u.actions is not None for u in users) else None,
            [u.timestamps for u in users] if any(u.timestamps is not None for u in users) else None,
        )
        answers = []
        for user, result in zip(users, results, strict=True):
            answer = result.to_dict()
            if user.user is not None:
                answer = {"user": user.user, **answer}
            answers.append(answer)
        if query.users is None:
            return {"model_version": rec.version, **answers[0]}
        return {"model_version": rec.version, "results": answers}

    @app.get("/v1/model")
    def model_info():
        return service.rec.info()

    @app.post("/v1/admin/reload")
    async def reload(request: Request):
        if service.token is None:
            return _error(403, "reloading over HTTP needs a server started with --token-file (or send SIGHUP)")
        payload, error = await read_json(request, empty={})
        if error is not None:
            return error
        if not isinstance(payload, dict) or not isinstance(payload.get("path", ""), str):
            return _error(422, 'body: expected {"path": "ARTIFACT"} or nothing')
        try:
            rec = await run_in_threadpool(service.reload, payload.get("path"))
        except ArtifactError as e:
            return _error(409, str(e))
        return {"reloaded": True, "version": rec.version, "path": str(service.artifact)}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        return {"status": "ready", "version": service.rec.version}

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(exposed), media_type=CONTENT_TYPE_LATEST)

    return app


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"--token-file {path}: cannot be read ({e.strerror})") from None
    if not token:
        raise ValueError(f"--token-file {path}: the file is empty")
    return token


def app_from_environment() -> FastAPI:
    """The app of one of several uvicorn worker processes (``--workers W``)."""
    if "LMREC_SERVE_THREADS" in os.environ:
        import torch

        torch.set_num_threads(int(os.environ["LMREC_SERVE_THREADS"]))
    token = os.environ.get("LMREC_SERVE_TOKEN_FILE")
    return create_app(
        os.environ["LMREC_SERVE_ARTIFACT"],
        read_token(Path(token) if token else None),
        int(os.environ.get("LMREC_SERVE_MAX_BODY", MAX_BODY_BYTES)),
    )


def run(
    artifact: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    token_file: Path | None = None,
    max_body: int = MAX_BODY_BYTES,
    threads: int | None = None,
) -> None:
    import tempfile

    import torch
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    token = read_token(token_file)
    options = {"host": host, "port": port, "log_level": "warning", "timeout_graceful_shutdown": 10}
    if workers == 1:
        app = create_app(artifact, token, max_body)

        # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal to the
        # handler that was there before it: make that one a clean exit instead of a kill.
        def stopped(signum, frame):
            print("lmrec serve: stopped", flush=True)
            sys.exit(0)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stopped)
        print(f"lmrec serve: {artifact} (version {app.state.service.rec.version}) on http://{host}:{port}", flush=True)
        uvicorn.run(app, **options)
        return
    Recommender.load(artifact)  # fail here, with one clear message, rather than in every worker
    metrics_dir = tempfile.mkdtemp(prefix="lmrec-serve-metrics-")
    os.environ.update(
        {
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            "LMREC_SERVE_ARTIFACT": str(artifact),
            "LMREC_SERVE_MAX_BODY": str(max_body),
            **({"LMREC_SERVE_TOKEN_FILE": str(token_file)} if token_file else {}),
            **({"LMREC_SERVE_THREADS": str(threads)} if threads else {}),
        }
    )
    print(f"lmrec serve: {artifact} on http://{host}:{port} with {workers} workers", flush=True)
    uvicorn.run("serve.http:app_from_environment", factory=True, workers=workers, **options)
