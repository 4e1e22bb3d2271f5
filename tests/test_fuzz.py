"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): no answer is a server error.

A short run here; benchmarks/serve.py (section ``fuzz``) sends 10,000+ requests."""

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.test_http import TOKEN, _auth, _metrics, _secured_server

pytestmark = pytest.mark.multiprocess


def fuzz(url: str, token: str, examples: int, seed: int) -> subprocess.CompletedProcess:
    """schemathesis against the server's /openapi.json with the bearer token; the admin reload is
    left out (each call reloads and verifies the artifact)."""
    schemathesis = Path(sys.executable).with_name("schemathesis")
    return subprocess.run(
        [str(schemathesis), "run", f"{url}/openapi.json", "--header", f"Authorization: Bearer {token}",
         "--checks", "not_a_server_error", "--exclude-path", "/v1/admin/reload", "--max-examples", str(examples),
         "--seed", str(seed), "--no-color"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_fuzzing_the_schema_finds_no_server_error(artifacts, tmp_path):
    assert shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    server, _ = _secured_server(artifacts["int8"], tmp_path)
    try:
        run = fuzz(server.url, TOKEN, examples=60, seed=7)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
        counts = {}
        for (name, labels), value in _metrics(server).items():
            if name == "lmrec_serve_requests_total":
                status = dict(labels)["status"]
                counts[status] = counts.get(status, 0) + value
        assert sum(counts.values()) >= 150, counts  # the fuzzer's requests reached the server
        assert not any(status.startswith("5") for status in counts), counts
        assert counts.get("200", 0) > 0 and counts.get("422", 0) > 0, counts  # valid and invalid bodies
        assert httpx.get(f"{server.url}/readyz", headers=_auth()).status_code == 200
    finally:
        assert server.stop() == 0
