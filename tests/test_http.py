"""The HTTP server as users run it: `lmrec serve` in its own process on a free 127.0.0.1 port."""

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.http import create_app
from serve.recommender import Recommender
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.multiprocess
TOKEN = "s3cret-token"


class Server:
    def __init__(self, artifact, tmp_path, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / f"server-{self.port}.log", "w+")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "serve", str(artifact), "--port", str(self.port), *map(str, args)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError(f"server did not become ready:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self.log.close()
        return code


def _secured_server(artifact, tmp, *args):
    """A server with a bearer token, on its own copy of ``artifact``: (server, the copy)."""
    served = tmp / "served"
    shutil.copytree(artifact, served)
    (tmp / "token").write_text(TOKEN + "\n")
    return Server(served, tmp, "--token-file", tmp / "token", *args), served


@pytest.fixture(scope="module")
def secured(artifacts, tmp_path_factory):
    """One server for the tests that leave its state as they found it (the model, the settings)."""
    server, served = _secured_server(artifacts["int8"], tmp_path_factory.mktemp("http"), "--max-body", 20_000)
    yield server, served
    assert server.stop() == 0


def _auth():
    return {"Authorization": f"Bearer {TOKEN}"}


def _metrics(server) -> dict:
    """{(sample name, sorted labels): value} of the server's /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _corrupt_copy(artifact, tmp):
    corrupt = tmp / "corrupt"
    shutil.copytree(artifact, corrupt)
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    return corrupt


def _reload(server, artifact):
    # Every worker loads and verifies the artifact: it may take longer than httpx's default 5 s.
    return httpx.post(f"{server.url}/v1/admin/reload", json={"path": str(artifact)}, headers=_auth(), timeout=60)


def _history(artifact, n=6):
    return pq.read_table(artifact / "vocab.parquet").sort_by("index")["raw_id"].to_pylist()[:n]


def test_recommend_over_http_equals_the_python_api(secured, artifacts):
    server, served = secured
    history = _history(served)
    answer = httpx.post(f"{server.url}/v1/recommend", json={"history": history, "k": 5}, headers=_auth()).json()
    [expected] = Recommender.load(artifacts["int8"]).recommend([history], k=5)
    assert answer["items"] == expected.items
    assert answer["scores"] == pytest.approx(expected.scores, rel=1e-5)
    assert len(answer["titles"]) == 5 and all(answer["titles"])
    batch = httpx.post(
        f"{server.url}/v1/recommend",
        json={"users": [{"user": "a", "history": history}, {"user": "b", "history": [], "deny": [1]}], "k": 5},
        headers=_auth(),
    ).json()
    assert [r["user"] for r in batch["results"]] == ["a", "b"]
    assert batch["results"][0]["items"] == expected.items
    assert batch["results"][1]["fallback"] == "popularity"
    info = httpx.get(f"{server.url}/v1/model", headers=_auth()).json()
    assert info["quant"] == "int8" and info["version"] == answer["model_version"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"history": [1, 2', 400, "malformed JSON"),
        (b"[1, 2]", 422, "expected a JSON object"),
        (b'{"history": "abc"}', 422, "history: Input should be a valid list"),
        (b'{"history": [1.5]}', 422, "history.0"),
        (b'{"history": [1], "k": 0}', 422, "k: Input should be greater than or equal to 1"),
        (b'{"history": [1], "k": 1001}', 422, "k: Input should be less than or equal to 1000"),
        (b'{"history": [1], "timestamps": [1, 2]}', 422, "timestamps has 2 entries for 1 history items"),
        (b'{"history": [1], "users": [{"history": [2]}]}', 422, "either 'users' or one user's fields"),
        (b'{"histroy": [1]}', 422, "histroy: Extra inputs are not permitted"),
        (b'{"history": [' + b"1," * 20_000 + b"1]}", 413, "larger than the limit of 20000"),
    ],
)
def test_bad_requests_get_clear_4xx_answers(secured, body, status, message):
    server, _ = secured
    answer = httpx.post(
        f"{server.url}/v1/recommend", content=body, headers={**_auth(), "Content-Type": "application/json"}
    )
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_bearer_token_is_required_on_v1_only(secured):
    server, served = secured
    body = {"history": _history(served), "k": 3}
    assert httpx.post(f"{server.url}/v1/recommend", json=body).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(f"{server.url}/v1/recommend", json=body, headers=wrong).status_code == 401
    assert httpx.get(f"{server.url}/v1/model").status_code == 401
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_reload_keeps_the_old_model_when_the_new_one_is_corrupt(artifacts, tmp_path):
    server, served = _secured_server(artifacts["int8"], tmp_path)
    try:
        before = httpx.get(f"{server.url}/v1/model", headers=_auth()).json()["version"]
        corrupt = _corrupt_copy(artifacts["fp32"], tmp_path)
        answer = _reload(server, corrupt)
        assert answer.status_code == 409 and "checksum mismatch" in answer.json()["error"]
        assert httpx.get(f"{server.url}/v1/model", headers=_auth()).json()["version"] == before
        history = _history(served)
        assert httpx.post(f"{server.url}/v1/recommend", json={"history": history}, headers=_auth()).status_code == 200
        # SIGHUP reloads the served path: after damaging it in place, the old model stays.
        (served / "vocab.parquet").write_bytes(b"garbage")
        server.process.send_signal(signal.SIGHUP)
        _wait_for(server, "reload failed, still serving")
        assert httpx.get(f"{server.url}/v1/model", headers=_auth()).json()["version"] == before
        # A good artifact replaces it.
        answer = _reload(server, artifacts["fp32"])
        assert answer.status_code == 200, answer.text
        info = httpx.get(f"{server.url}/v1/model", headers=_auth()).json()
        assert info["version"] != before and info["quant"] == "fp32"
        assert answer.json()["workers"] == {info["version"]: 1}
        metrics = _metrics(server)
        assert metrics[("lmrec_serve_reloads_total", (("result", "failed"),))] == 2
        assert metrics[("lmrec_serve_model_info", (("quant", "fp32"), ("version", info["version"])))] == 1
    finally:
        assert server.stop() == 0


def _wait_for(server, text, seconds=30):
    deadline = time.time() + seconds
    while text not in server.output():
        assert time.time() < deadline, server.output()
        time.sleep(0.2)


def test_metrics_count_requests_by_status_and_time_them(secured):
    server, served = secured
    recommend = ("endpoint", "/v1/recommend")
    before = _metrics(server)
    body = {"history": _history(served), "k": 2}
    assert httpx.post(f"{server.url}/v1/recommend", json=body, headers=_auth()).status_code == 200
    assert httpx.post(f"{server.url}/v1/recommend", json=body).status_code == 401
    after = _metrics(server)

    def added(name, *labels):
        key = (name, tuple(sorted(labels)))
        return after.get(key, 0) - before.get(key, 0)

    assert added("lmrec_serve_requests_total", recommend, ("status", "200")) == 1
    assert added("lmrec_serve_requests_total", recommend, ("status", "401")) == 1
    assert added("lmrec_serve_request_seconds_count", recommend) == 1  # refused requests are not timed
    assert ("lmrec_serve_request_seconds_bucket", (recommend, ("le", "0.005"))) in after
    assert added("lmrec_serve_batch_users_count") == 1


def test_sessions_over_http_continue_a_user_and_ask_for_the_full_history_on_a_miss(secured):
    server, served = secured
    history = _history(served, 9)
    url = f"{server.url}/v1/recommend"

    def ask(user, seq, events, status=200):
        answer = httpx.post(url, json={"user": user, "seq": seq, "history": events, "k": 4}, headers=_auth())
        assert answer.status_code == status, answer.text
        return answer.json()

    before = _metrics(server)
    miss = ask("s1", 3, history[3:6], status=409)
    assert "send the full history" in miss["error"] and miss["missing"] == [{"user": "s1", "events": 0}]
    first = ask("s1", 0, history[:6])
    assert first["events"] == 6
    assert ask("s1", 6, history[6:9])["events"] == 9
    full = httpx.post(url, json={"history": history, "k": 4}, headers=_auth()).json()
    again = ask("s1", 6, history[6:9])  # a retried request: applied once
    assert again["items"] == full["items"] and again["events"] == 9
    assert again["scores"] == pytest.approx(full["scores"], rel=1e-4)
    assert "events" not in full
    after = _metrics(server)
    lookups = dict.fromkeys(("hit", "miss"), 0)
    for result in lookups:
        key = ("lmrec_serve_session_lookups_total", (("result", result),))
        lookups[result] = after[key] - before.get(key, 0)
    assert lookups == {"hit": 2, "miss": 2}  # seq 0 of a new user is a miss that needs nothing more
    assert after[("lmrec_serve_sessions", ())] >= 1 and after[("lmrec_serve_session_bytes", ())] > 0
    bad = httpx.post(url, json={"seq": 0, "history": history}, headers=_auth())
    assert bad.status_code == 422 and "seq needs a user" in bad.json()["error"]
    twice = {"users": [{"user": "x", "seq": 0, "history": history}] * 2}
    assert "more than once" in httpx.post(url, json=twice, headers=_auth()).json()["error"]


def test_concurrent_requests_are_scored_in_shared_batches(secured):
    server, served = secured
    before = _metrics(server)
    body = {"history": _history(served, 20), "k": 10}
    requests = 64
    with httpx.Client(headers=_auth(), timeout=30) as client, concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(lambda _: client.post(f"{server.url}/v1/recommend", json=body).status_code, range(requests))
        )
    assert codes == [200] * requests
    after = _metrics(server)
    batches = after[("lmrec_serve_model_batch_users_count", ())] - before.get(
        ("lmrec_serve_model_batch_users_count", ()), 0
    )
    users = after[("lmrec_serve_model_batch_users_sum", ())] - before.get(("lmrec_serve_model_batch_users_sum", ()), 0)
    assert users == requests and batches < requests  # some requests shared a model batch
    waits = after[("lmrec_serve_queue_wait_seconds_count", ())] - before.get(
        ("lmrec_serve_queue_wait_seconds_count", ()), 0
    )
    assert waits == requests


def test_the_openapi_schema_is_published_behind_the_token(secured):
    server, _ = secured
    assert httpx.get(f"{server.url}/openapi.json").status_code == 401
    schema = httpx.get(f"{server.url}/openapi.json", headers=_auth()).json()
    body = schema["paths"]["/v1/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"history", "user", "seq", "users", "k"} <= set(body["properties"])
    assert "UserQuery" in schema["components"]["schemas"]


def test_reload_over_http_needs_a_token(artifacts):
    from fastapi.testclient import TestClient

    answer = TestClient(create_app(artifacts["int8"], handle_sighup=False)).post("/v1/admin/reload")
    assert answer.status_code == 403 and "--token-file" in answer.json()["error"]


def _workers(server, count=2, attempts=300) -> dict:
    """{pid: (version, quant)} of every worker. Each request opens a new connection, which the
    kernel hands to one of the workers, so a few of them reach every worker."""
    seen = {}
    for _ in range(attempts):
        info = httpx.get(f"{server.url}/v1/model", headers=_auth()).json()
        seen[info["pid"]] = (info["version"], info["quant"])
        if len(seen) == count:
            return seen
    raise AssertionError(f"{attempts} requests reached {len(seen)} of {count} workers")


def test_several_workers_serve_reload_together_and_shut_down_gracefully(artifacts, tmp_path):
    server, served = _secured_server(artifacts["int8"], tmp_path, "--workers", 2)
    try:
        body = {"history": _history(served)}
        answers = [httpx.post(f"{server.url}/v1/recommend", json=body, headers=_auth()) for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 6
        counted = _metrics(server)  # one exposition for all workers
        assert counted[("lmrec_serve_requests_total", (("endpoint", "/v1/recommend"), ("status", "200")))] == 6
        first = _workers(server)
        pids, [int8] = set(first), {version for version, _ in first.values()}
        # Over HTTP, the answer says what every worker serves now.
        target = tmp_path / "next"
        shutil.copytree(artifacts["fp32"], target)
        answer = _reload(server, target)
        assert answer.status_code == 200, answer.text
        fp32 = answer.json()["version"]
        assert answer.json()["workers"] == {fp32: 2}
        assert _workers(server) == dict.fromkeys(pids, (fp32, "fp32"))  # in place: the same processes
        # A corrupt artifact is refused by every worker, and every worker keeps its model.
        corrupt = _corrupt_copy(artifacts["int8"], tmp_path)
        answer = _reload(server, corrupt)
        assert answer.status_code == 409, answer.text
        assert "checksum mismatch" in answer.json()["error"] and f"still serving {fp32} on 2 workers" in answer.text
        assert _workers(server) == dict.fromkeys(pids, (fp32, "fp32"))
        # SIGHUP (to the supervisor) reloads the served path in every worker: replaced in place here.
        shutil.rmtree(target)
        shutil.copytree(artifacts["int8"], target)
        server.process.send_signal(signal.SIGHUP)
        _wait_for(server, f"serving {int8} on 2 workers")
        assert _workers(server) == dict.fromkeys(pids, (int8, "int8"))
        metrics = _metrics(server)
        assert metrics[("lmrec_serve_reloads_total", (("result", "ok"),))] == 4  # one per worker and reload
        assert metrics[("lmrec_serve_reloads_total", (("result", "failed"),))] == 2
        assert metrics[("lmrec_serve_model_info", (("quant", "int8"), ("version", int8)))] == 1
        assert metrics[("lmrec_serve_model_info", (("quant", "fp32"), ("version", fp32)))] == 0
    finally:
        output = server.output()
        started = time.time()
        assert server.stop() == 0
        assert time.time() - started < 20
    assert "Traceback" not in output


def test_serve_refuses_a_bad_token_file(artifacts, tmp_path):
    (tmp_path / "empty").write_text("\n")
    done = subprocess.run(
        [sys.executable, "-m", "launch.cli", "serve", str(artifacts["int8"]), "--token-file", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 2 and "the file is empty" in done.stderr, done.stderr
