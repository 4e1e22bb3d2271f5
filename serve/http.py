"""HTTP recommendations: FastAPI on uvicorn, in front of one ``Recommender``.

- ``POST /v1/recommend``: one user (``{"history": [...], "k": 10}``) or a batch
  (``{"users": [{"history": [...]}, ...], "k": 10}``); raw item IDs in and out. With ``"user"``
  and ``"seq"`` (the position of ``history[0]`` in the user's event stream; 0: the whole history)
  the server keeps the user's session and computes only the new events (serve.sessions); a user
  it does not hold is a 409 that asks for the full history. Concurrent requests are scored as one
  batch (serve.batching).
- ``GET /v1/model``: the served artifact's metadata and the answering worker's pid.
  ``POST /v1/admin/reload``: load an artifact (by default the same path again); a new artifact
  that fails verification leaves the old one serving. SIGHUP does the same. With ``--workers W``
  a reload reaches every worker or none (``WorkerGroup``).
- ``GET /healthz`` (the process is up), ``GET /readyz`` (a model is loaded and warmed up),
  ``GET /metrics``, ``GET /openapi.json`` (the API's schema).

With ``--token-file`` every ``/v1`` endpoint and the schema want ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import gc
import hmac
import json
import os
import signal
import sys
import threading
import time
from collections import Counter as Tally
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator
from uvicorn.supervisors import Multiprocess

from serve.artifact import ArtifactError
from serve.batching import DEFAULT_MAX_USERS, DEFAULT_WINDOW_S, Batcher, Job
from serve.recommender import Query, Recommender
from serve.sessions import DEFAULT_CAPACITY_BYTES, SessionMiss, SessionStore

MAX_K = 1000
MAX_USERS = 1024
MAX_BODY_BYTES = 1 << 20
SCHEMA_PATH = "/openapi.json"
KNOWN_PATHS = {"/v1/recommend", "/v1/model", "/v1/admin/reload", "/healthz", "/readyz", "/metrics", SCHEMA_PATH}
RELOAD_TIMEOUT_S = 300.0  # for every worker to load and verify a new artifact (checksums of GBs take a while)
POLL_S = 0.1  # how often workers look for a reload, and a reload for the workers' answers
ItemID = StrictInt | StrictStr


@dataclass(frozen=True)
class ServeOptions:
    max_body: int = MAX_BODY_BYTES
    threads: int | None = None  # torch threads per worker (None: default_threads)
    batch_window: float = DEFAULT_WINDOW_S  # seconds a batch under load waits for more requests
    max_batch_users: int = DEFAULT_MAX_USERS
    session_bytes: int = DEFAULT_CAPACITY_BYTES  # per worker process
    search: str = "auto"  # Recommender.load's: the artifact's item index when it has one, or "exact" / "index"
    beam_width: int | None = None  # Recommender.load's: for a semantic-ID model, instead of the artifact's


class UserQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: ItemID | None = None  # echoed back; with seq, the key of the user's stored session
    seq: int | None = Field(None, ge=0)  # position of history[0] in the user's event stream
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
        if self.seq is not None and self.user is None:
            raise ValueError("seq needs a user (the session it continues)")
        return self

    def query(self, k: int, exclude_seen: bool) -> Query:
        return Query(
            self.history, k, exclude_seen, self.allow, self.deny, self.actions, self.timestamps, self.user, self.seq
        )


class RecommendRequest(UserQuery):
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True
    users: list[UserQuery] | None = Field(None, min_length=1, max_length=MAX_USERS)

    @model_validator(mode="after")
    def _one_or_many(self):
        single = self.model_fields_set & set(UserQuery.model_fields)
        if self.users is not None and single:
            raise ValueError(f"give either 'users' or one user's fields, not both (got {sorted(single)} too)")
        sessions = [u.user for u in self.users or () if u.seq is not None]
        if len(set(sessions)) != len(sessions):
            raise ValueError("a user with a seq appears more than once")
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
        self.model_batch = Histogram(
            "lmrec_serve_model_batch_users",
            "Users per model batch (concurrent requests scored together)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=registry,
        )
        self.queue_wait = Histogram(
            "lmrec_serve_queue_wait_seconds",
            "Time a request waited for the model thread",
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=registry,
        )
        self.sessions = Gauge(
            "lmrec_serve_sessions", "Stored user sessions", registry=registry, multiprocess_mode="livesum"
        )
        self.session_bytes = Gauge(
            "lmrec_serve_session_bytes", "Bytes of stored user sessions", registry=registry, multiprocess_mode="livesum"
        )
        self.session_lookups = Counter(
            "lmrec_serve_session_lookups", "Session lookups of requests with a seq, by result", ["result"],
            registry=registry,
        )  # fmt: skip
        self.session_evictions = Counter(
            "lmrec_serve_session_evictions", "Sessions evicted to stay within the store's bytes", registry=registry
        )
        for result in ("hit", "miss"):
            self.session_lookups.labels(result=result)
        self._counted = {"hit": 0, "miss": 0, "evicted": 0}
        self.model = Gauge(
            "lmrec_serve_model_info",
            "The served artifact (value 1; 0 for the one served before)",
            ["version", "quant"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.reloads = Counter("lmrec_serve_reloads", "Artifact reloads by result", ["result"], registry=registry)
        for result in ("ok", "failed"):
            self.reloads.labels(result=result)  # exported as 0 from the start, so rates and alerts work
        self._served: dict | None = None

    def observe_batch(self, users: int, waits: list[float]) -> None:
        self.model_batch.observe(users)
        for wait in waits:
            self.queue_wait.observe(wait)

    def observe_sessions(self, store: SessionStore) -> None:
        # The store counts in plain integers (it runs in the model thread); exported as deltas.
        self.sessions.set(len(store))
        self.session_bytes.set(store.bytes)
        for name, total, counter in (
            ("hit", store.hits, self.session_lookups.labels(result="hit")),
            ("miss", store.misses, self.session_lookups.labels(result="miss")),
            ("evicted", store.evictions, self.session_evictions),
        ):
            if total > self._counted[name]:
                counter.inc(total - self._counted[name])
            self._counted[name] = total

    def new_store(self) -> None:
        self._counted = {"hit": 0, "miss": 0, "evicted": 0}

    def serving(self, rec: Recommender) -> None:
        # Set to 0 rather than cleared: with several workers the exposition reads every worker's
        # values from files that clear() does not touch, so the old version would stay at 1.
        if self._served is not None:
            self.model.labels(**self._served).set(0)
        self._served = {"version": rec.version, "quant": rec.quant}
        self.model.labels(**self._served).set(1)


class WorkersDisagree(RuntimeError):
    """A reload that every worker had verified but that not every worker took up."""


class Service:
    """The served model and its reload: a failed load never replaces a working model. In one of
    several workers, ``group`` makes a reload reach every worker."""

    def __init__(
        self,
        artifact: Path,
        token: str | None,
        metrics: ServeMetrics,
        group: WorkerGroup | None = None,
        options: ServeOptions = ServeOptions(),
    ):
        self.artifact, self.token, self.metrics, self.group = Path(artifact), token, metrics, group
        self.options = options
        rec = Recommender.load(self.artifact, search=options.search, beam_width=options.beam_width)
        rec.warm_up()
        # The model and its sessions change together: a session's cache belongs to one model.
        self.current = (rec, SessionStore(options.session_bytes))
        self.metrics.serving(rec)
        _settle()
        self._lock = threading.Lock()
        self.batcher = Batcher(self.run_batch, options.batch_window, options.max_batch_users, metrics.observe_batch)

    @property
    def rec(self) -> Recommender:
        return self.current[0]

    def load(self, path: Path) -> Recommender:
        """The artifact at ``path``, verified and warmed up; ArtifactError (and a failed reload
        counted) otherwise."""
        try:
            rec = Recommender.load(path, search=self.options.search, beam_width=self.options.beam_width)
        except (ArtifactError, OSError, ValueError) as e:
            self.metrics.reloads.labels(result="failed").inc()
            raise ArtifactError(str(e)) from None
        rec.warm_up()
        return rec

    def serve(self, rec: Recommender, path: Path) -> None:
        self.current, self.artifact = (rec, SessionStore(self.options.session_bytes)), Path(path)
        self.metrics.new_store()
        self.metrics.serving(rec)
        self.metrics.reloads.labels(result="ok").inc()
        _settle()

    def run_batch(self, jobs: list[Job]) -> None:
        """The model thread's work: every job's queries in one ``answer`` call, except that a
        user's session is continued by one request at a time (later ones go in a next round).
        Each job gets (the answering model's version, its answers)."""
        rec, store = self.current
        pending = jobs
        while pending:
            now, later, users = [], [], set()
            for job in pending:
                mine = {q.user for q in job.payload if q.seq is not None}
                if mine & users:
                    later.append(job)
                else:
                    now.append(job)
                    users |= mine
            try:
                answers = iter(rec.answer([q for job in now for q in job.payload], store))
                for job in now:
                    job.future.set_result((rec.version, [next(answers) for _ in job.payload]))
            except Exception:  # one request's bad input must not fail the others batched with it
                for job in now:
                    if job.future.done():
                        continue
                    try:
                        job.future.set_result((rec.version, rec.answer(job.payload, store)))
                    except Exception as e:  # noqa: BLE001 - reported to that request
                        job.future.set_exception(e)
            pending = later
        self.metrics.observe_sessions(store)

    def reload(self, path: Path | None = None) -> dict:
        """Loads ``path`` (default: the served path again) and serves it: {"version", "path",
        "workers": {version: number of workers serving it}}."""
        if self.group is not None:
            return self.group.reload(path)
        with self._lock:
            path = Path(path or self.artifact)
            try:
                rec = self.load(path)
            except ArtifactError as e:
                raise ArtifactError(f"reload failed, still serving {self.rec.version}: {e}") from None
            self.serve(rec, path)
            return {"version": rec.version, "path": str(path), "workers": {rec.version: 1}}


class WorkerGroup:
    """The uvicorn workers of one server (``--workers W``) and their reloads, through files in a
    directory they share: ``reload.json``, the artifact the workers serve and the reload under
    way, and ``worker-PID.json``, what each worker serves and its answer to that reload.

    A reload has two phases, so that the workers never end up on different models: first every
    worker loads and verifies the new artifact next to the model it serves; only when all of them
    have it do they switch to it (a reference swap, which cannot fail); if any worker fails, all
    of them drop it and keep the old one. Any worker answering ``POST /v1/admin/reload``, or the
    supervisor on SIGHUP, runs the reload; a worker started later (uvicorn replaces dead ones)
    loads what ``reload.json`` says is served.
    """

    LOAD, SWITCH, ABORT = "load", "switch", "abort"

    def __init__(self, directory: Path, timeout: float = RELOAD_TIMEOUT_S):
        self.directory, self.timeout = Path(directory), timeout
        self._state = self.directory / "reload.json"

    def start(self, artifact: Path) -> None:
        """Called once by the supervisor, before the workers start."""
        self.directory.mkdir(parents=True, exist_ok=True)
        served = {"generation": 0, "path": str(artifact)}
        self._write(self._state, {**served, "phase": self.SWITCH, "served": served})

    def served(self) -> tuple[str, int]:
        """(path, generation) of the artifact the workers serve, for a worker that starts."""
        served = self._read(self._state)["served"]
        return served["path"], served["generation"]

    def follow(self, service: Service, generation: int) -> None:
        """Takes part in the group's reloads from now on (a worker serving ``generation``)."""
        status = self.directory / f"worker-{os.getpid()}.json"
        atexit.register(status.unlink, missing_ok=True)
        threading.Thread(
            target=self._follow, args=(service, generation, status), name="lmrec-reload", daemon=True
        ).start()

    def _follow(self, service: Service, generation: int, status: Path) -> None:
        answered = error = None  # the [generation, phase] of reload.json acted on last, and how it failed
        pending = None  # (generation, Recommender): the new artifact, loaded and verified, not served yet
        while True:
            self._write(status, {"pid": os.getpid(), "version": service.rec.version, "generation": generation,
                                 "answered": answered, "loaded": pending[1].version if pending else None,
                                 "error": error})  # fmt: skip
            state = self._read(self._state)
            while [state["generation"], state["phase"]] == answered:
                time.sleep(POLL_S)
                state = self._read(self._state)
            g, phase, path = state["generation"], state["phase"], Path(state["path"])
            answered, error = [g, phase], None
            if phase == self.ABORT and pending and pending[0] == g:
                service.metrics.reloads.labels(result="failed").inc()  # one count per worker and reload
            if phase == self.SWITCH and generation != g:
                try:  # a worker that started during the load phase has nothing loaded yet
                    service.serve(pending[1] if pending and pending[0] == g else service.load(path), path)
                    generation = g
                except ArtifactError as e:
                    error = str(e)
            pending = None
            if phase == self.LOAD:
                try:
                    pending = (g, service.load(path))
                except ArtifactError as e:
                    error = str(e)

    def reload(self, path: Path | None = None) -> dict:
        """Every worker onto the artifact at ``path`` (default: the served path again), or none:
        {"version", "path", "workers": {version: workers}}. ArtifactError when a worker cannot
        load it (every worker keeps its model then); WorkersDisagree when not every worker took it up."""
        with self._exclusive():
            state = self._read(self._state)
            g, path = state["generation"] + 1, str(path or state["served"]["path"])
            proposal = {"generation": g, "path": path, "served": state["served"]}
            self._write(self._state, {**proposal, "phase": self.LOAD})
            workers = self._answers(lambda w: w["answered"] == [g, self.LOAD])
            if not workers:
                raise ArtifactError("reload failed: no worker is running")
            failed = [w for w in workers if w["answered"] != [g, self.LOAD] or w["loaded"] is None]
            versions = {w["loaded"] for w in workers}
            if failed or len(versions) > 1:
                self._write(self._state, {**proposal, "phase": self.ABORT})
                serving = _describe(Tally(w["version"] for w in workers))
                if not failed:
                    raise ArtifactError(f"reload failed, still serving {serving}: {path} changed while workers read it")
                reason = failed[0]["error"] or f"did not load it within {self.timeout:.0f} s"
                raise ArtifactError(
                    f"reload failed, still serving {serving}: {len(failed)} of {len(workers)} workers could not "
                    f"load it; worker {failed[0]['pid']}: {reason}"
                )
            served = {"generation": g, "path": path}
            self._write(self._state, {**served, "phase": self.SWITCH, "served": served})
            workers = self._answers(lambda w: w["generation"] == g or w["answered"] == [g, self.SWITCH])
            [version], serving = versions, Tally(w["version"] for w in workers)
            if set(serving) != {version}:
                raise WorkersDisagree(f"reload of {version} incomplete: serving {_describe(serving)}")
            return {"version": version, "path": path, "workers": dict(serving)}

    def _answers(self, answered) -> list[dict]:
        """The running workers' statuses once every one has ``answered`` (or the time is up)."""
        deadline = time.monotonic() + self.timeout
        while True:
            workers = self._workers()
            if all(answered(w) for w in workers) or time.monotonic() > deadline:
                return workers
            time.sleep(POLL_S)

    def _workers(self) -> list[dict]:
        workers = []
        for path in self.directory.glob("worker-*.json"):
            try:
                status = self._read(path)
                os.kill(status["pid"], 0)
            except FileNotFoundError:  # a worker that has just exited
                continue
            except ProcessLookupError:  # one that died without cleaning up; uvicorn starts a replacement
                path.unlink(missing_ok=True)
                continue
            workers.append(status)
        return workers

    @contextmanager
    def _exclusive(self):
        """One reload at a time, whichever process runs it."""
        with open(self.directory / "reload.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @staticmethod
    def _write(path: Path, value: dict) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)  # readers see the old file or the new one, never half of it

    @staticmethod
    def _read(path: Path) -> dict:
        return json.loads(path.read_text())


class Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, except for SIGHUP: uvicorn restarts every worker
    with the artifact it started with, unverified; this reloads the served path in every worker
    or none."""

    def __init__(self, config, sockets, group: WorkerGroup):
        super().__init__(config, sockets)
        self.group = group

    def handle_hup(self) -> None:
        # In a thread: the supervisor's loop must go on checking (and reaping) workers meanwhile.
        threading.Thread(target=_reload_and_report, args=(self.group.reload,), name="lmrec-reload", daemon=True).start()


def _describe(serving: dict) -> str:
    """``{version: workers}`` in words: "abc on 2 workers", "abc on 1 worker and def on 1 worker"."""
    return " and ".join(f"{v} on {n} worker{'s' * (n != 1)}" for v, n in sorted(serving.items())) or "nothing"


def _reload_and_report(reload) -> None:
    """SIGHUP's reload; its outcome goes to the server's output."""
    try:
        result = reload()
    except (ArtifactError, WorkersDisagree) as e:
        print(f"lmrec serve: {e}", flush=True)
        return
    print(f"lmrec serve: reloaded {result['path']}, serving {_describe(result['workers'])}", flush=True)


def _settle() -> None:
    """Moves what a loaded model allocated out of the cyclic garbage collector's reach: its full
    collections otherwise walk every module and tensor of the stack and stall requests (at
    concurrency 32 on the ML-1M model, p99 204 ms with them, 78 ms without). Refcounting still
    frees a replaced model."""
    gc.collect()
    gc.freeze()


class Observe:
    """Counts and times every request and checks the bearer token, as plain ASGI middleware
    (Starlette's ``@app.middleware("http")`` costs about as much as a whole /healthz answer)."""

    def __init__(self, app, service: Service, metrics: ServeMetrics):
        self.app, self.service, self.metrics = app, service, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"  # bounded label values, whatever clients send
        token = self.service.token
        if token is not None and (path.startswith("/v1/") or path == SCHEMA_PATH):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, f"Bearer {token}".encode()):
                refused = JSONResponse(
                    {"error": "missing or wrong bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
                self.metrics.requests.labels(endpoint=endpoint, status="401").inc()
                return await refused(scope, receive, send)
        status = 500  # what the client sees when the app fails before answering

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)


def _json(value) -> Response:
    # json.dumps directly: FastAPI's encoder walks every value of a returned dict first.
    return Response(json.dumps(value), media_type="application/json")


def _body_schema(model: type[BaseModel]) -> dict:
    """The request body of an endpoint that reads its JSON itself (to bound its size and word its
    errors), for the OpenAPI schema; its models go to components by ``_schema``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _schema(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path in schema["paths"].values():
            for operation in path.values():
                body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
                components.update(body.get("schema", {}).pop("$defs", {}))
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        where = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def create_app(
    artifact: str | Path,
    token: str | None = None,
    options: ServeOptions = ServeOptions(),
    handle_sighup: bool = True,
    group: WorkerGroup | None = None,
) -> FastAPI:
    registry = CollectorRegistry()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # several uvicorn workers: one exposition for all
        from prometheus_client import multiprocess

        exposed = CollectorRegistry()
        multiprocess.MultiProcessCollector(exposed)
    else:
        exposed = registry
    metrics = ServeMetrics(registry)
    service = Service(Path(artifact), token, metrics, group, options)
    max_body = options.max_body
    app = FastAPI(title="lmrec", docs_url=None, redoc_url=None, openapi_url=SCHEMA_PATH)
    app.state.service = service
    app.openapi = lambda: _schema(app)

    if handle_sighup and threading.current_thread() is threading.main_thread():

        def on_sighup(signum, frame):
            threading.Thread(
                target=_reload_and_report, args=(service.reload,), name="lmrec-reload", daemon=True
            ).start()

        signal.signal(signal.SIGHUP, on_sighup)

    app.add_middleware(Observe, service=service, metrics=metrics)

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

    @app.post("/v1/recommend", openapi_extra=_body_schema(RecommendRequest))
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
        future = service.batcher.submit([u.query(query.k, query.exclude_seen) for u in users], len(users))
        try:
            version, results = await asyncio.wrap_future(future)
        except ValueError as e:
            return _error(422, str(e))
        missed = {}
        for result in results:
            if isinstance(result, SessionMiss):
                missed.update(result.missing)
        if missed:
            return JSONResponse(
                {
                    "error": str(SessionMiss(missed)),
                    "missing": [{"user": user, "events": held} for user, held in missed.items()],
                },
                status_code=409,
            )
        answers = []
        for user, result in zip(users, results, strict=True):
            answer = result.to_dict()
            if user.user is not None:
                answer = {"user": user.user, **answer}
            answers.append(answer)
        if query.users is None:
            return _json({"model_version": version, **answers[0]})
        return _json({"model_version": version, "results": answers})

    @app.get("/v1/model")
    def model_info():
        return {**service.rec.info(), "pid": os.getpid()}  # which worker answered, with --workers W

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
            result = await run_in_threadpool(service.reload, payload.get("path"))
        except ArtifactError as e:
            return _error(409, str(e))
        except WorkersDisagree as e:
            return _error(500, str(e))
        return {"reloaded": True, **result}

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


def default_threads(workers: int) -> int:
    """Torch threads per worker: the worker's share of the cores, less one for its HTTP thread
    (the event loop parses and answers requests while the model thread runs a batch)."""
    return max(1, (os.cpu_count() or 1) // workers - 1)


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
    import torch

    torch.set_num_threads(json.loads(os.environ["LMREC_SERVE_OPTIONS"])["threads"])
    # SIGHUP is the supervisor's to handle; a hangup of the whole process group must not end workers.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    token = os.environ.get("LMREC_SERVE_TOKEN_FILE")
    group = WorkerGroup(Path(os.environ["LMREC_SERVE_GROUP"]))
    artifact, generation = group.served()
    app = create_app(
        artifact,
        read_token(Path(token) if token else None),
        ServeOptions(**json.loads(os.environ["LMREC_SERVE_OPTIONS"])),
        handle_sighup=False,
        group=group,
    )
    group.follow(app.state.service, generation)
    return app


def run(
    artifact: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    token_file: Path | None = None,
    options: ServeOptions = ServeOptions(),
) -> None:
    import shutil
    import tempfile

    import torch
    import uvicorn

    options = replace(options, threads=options.threads or default_threads(workers))
    torch.set_num_threads(options.threads)
    token = read_token(token_file)
    server_options = {"host": host, "port": port, "log_level": "warning", "timeout_graceful_shutdown": 10}
    if workers == 1:
        app = create_app(artifact, token, options)

        # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal to the
        # handler that was there before it: make that one a clean exit instead of a kill.
        def stopped(signum, frame):
            print("lmrec serve: stopped", flush=True)
            sys.exit(0)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stopped)
        print(f"lmrec serve: {artifact} (version {app.state.service.rec.version}) on http://{host}:{port}", flush=True)
        uvicorn.run(app, **server_options)
        return
    # Fail here, with one clear message, not in every worker.
    Recommender.load(artifact, search=options.search, beam_width=options.beam_width)
    shared = Path(tempfile.mkdtemp(prefix="lmrec-serve-"))
    (shared / "metrics").mkdir()
    group = WorkerGroup(shared / "workers")
    group.start(artifact)
    os.environ.update(
        {
            "PROMETHEUS_MULTIPROC_DIR": str(shared / "metrics"),
            "LMREC_SERVE_GROUP": str(group.directory),
            "LMREC_SERVE_OPTIONS": json.dumps(asdict(options)),
            **({"LMREC_SERVE_TOKEN_FILE": str(token_file)} if token_file else {}),
        }
    )
    print(f"lmrec serve: {artifact} on http://{host}:{port} with {workers} workers", flush=True)
    # uvicorn.run(..., workers=W) would do the same with uvicorn's own supervisor.
    config = uvicorn.Config("serve.http:app_from_environment", factory=True, workers=workers, **server_options)
    try:
        Supervisor(config, [config.bind_socket()], group).run()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
