"""Serving benchmark: export, quantization parity and size, latency, throughput, large tables.

Sections (``--only`` picks some of them; the others keep their figures in the JSON):

- ``export``: ``lmrec export RUN/best`` as fp32 and int8; the serving-path test metrics measured
  during export against the training evaluator's (RUN/metrics.json), and the size on disk.
- ``latency``: ``Recommender.recommend`` for one history of 200 real item IDs, k = 10, in this
  process on 1 torch thread; p50/p99 over ``--seconds``, int8 and fp32.
- ``http``: ``lmrec serve ARTIFACT --threads 1`` and a separate client process (httpx, keep-alive,
  one connection per client thread) posting /v1/recommend at concurrency 1, 8 and 32.
- ``topk``: exact ``Recommender.top_k`` over a synthetic 10 M x 64 item table, int8 and fp32, 2
  threads, beside both bounds measured in the same run: a streaming read of the bytes a pass reads
  (batch 1) and the multiplying kernel's peak on in-cache data (batch 32).
- ``index``: top-10 through an approximate item index (``--index-spec``, built as ``lmrec export
  --index`` builds it) of 10 M x 64 clustered int8 items: recall against exact, latency at batch 1,
  build time and size, and the recall/latency trade-off around the chosen setting.
- ``score``: ``lmrec score`` of every user of the shards (k = 100) with 2 and 1 worker processes.
- ``export100m``: ``lmrec export`` of a synthetic consolidated model with a 100 M x 32 fp32 table
  into int8, with the export's peak memory (``--skip-100m`` leaves it out; needs ~25 GB of disk).

Writes benchmarks/results/serve.json.

    python benchmarks/serve.py --run runs/ml-1m/train --shards runs/ml-1m/shards [--seconds 10]
        [--work DIR] [--skip-100m] [--only export,latency,http,topk,index,score,export100m]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

SECTIONS = ("export", "latency", "http", "topk", "index", "score", "fuzz", "export100m")
GOALS = {
    "fp32_abs_diff_max": 1e-9,  # identical ranks; NDCG means may differ in the last bits (summation order)
    "int8_ndcg10_rel_diff_max": 0.01,
    "int8_size_ratio_max": 0.30,
    "model_p50_ms_max": 2.0,
    "session_p50_ms_max": 0.5,
    "http_c1_p50_ms_max": 3.0,
    "http_c1_p99_ms_max": 8.0,
    "http_session_c1_p50_ms_max": 1.5,
    "http_c32_requests_per_s_min": 500,
    "http_c32_p99_ms_max": 100,
    "score_steady_users_per_s_min": 1500,
    "fuzz_requests_min": 10_000,
    "export100m_peak_rss_gib_max": 2.0,
    "topk_int8_batch1_vs_stream_max": 1.5,  # time / streaming read of the same bytes
    "topk_int8_batch32_vs_kernel_max": 1.5,  # time / the int8 kernel's in-cache peak
    "index_recall10_min": 0.95,
    "index_p50_ms_max": 5.0,
}
HISTORY_LEN = 200
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
LMREC = [sys.executable, "-m", "launch.cli"]


# -- helpers ----------------------------------------------------------------------------------------


def _run(cmd: list, timeout: float, what: str) -> tuple[float, subprocess.CompletedProcess]:
    """Runs a command in the repository root; (wall seconds, result); raises with its output's tail."""
    started = time.perf_counter()
    try:
        done = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: no result within {timeout:.0f} s") from None
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{what}: exit code {done.returncode}\n{(done.stdout + done.stderr)[-3000:]}")
    return seconds, done


def _percentiles(ms: list[float]) -> dict:
    import numpy as np

    values = np.asarray(ms, dtype=np.float64)
    return {
        "n": int(len(values)),
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p90_ms": round(float(np.percentile(values, 90)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "mean_ms": round(float(values.mean()), 3),
        "max_ms": round(float(values.max()), 3),
    }


def _size(*paths: Path) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _histories(artifact: Path, n: int, seed: int = 0) -> list[list]:
    """``n`` histories of HISTORY_LEN distinct real raw item IDs of the artifact's vocabulary."""
    import numpy as np
    import pyarrow.parquet as pq

    raw = pq.read_table(artifact / "vocab.parquet", columns=["raw_id"])["raw_id"].to_numpy()
    rng = np.random.default_rng(seed)
    return [rng.choice(raw, size=min(HISTORY_LEN, len(raw)), replace=False).tolist() for _ in range(n)]


def _export(run: Path, shards: Path, out: Path, quant: str) -> float:
    seconds, _ = _run(
        [*LMREC, "export", run / "best", "--out", out, "--quant", quant, "--shards", shards, "--overwrite"],
        timeout=1200,
        what=f"lmrec export --quant {quant}",
    )
    return seconds


def _ensure_artifacts(args, work: Path) -> None:
    """Sections after ``export`` need WORK/int8 and WORK/fp32; export them when --only skipped it."""
    for quant in ("fp32", "int8"):
        if not (work / quant / "manifest.json").exists():
            print(f"exporting the {quant} artifact for the later sections", flush=True)
            _export(args.run, args.shards, work / quant, quant)


# -- 1. export, parity, size -----------------------------------------------------------------------


def section_export(args, work: Path) -> dict:
    training = json.loads((args.run / "metrics.json").read_text())["test"]["model"]
    result: dict = {"training_test": {k: v for k, v in training.items() if "@10" in k}}
    for quant in ("fp32", "int8"):
        seconds = _export(args.run, args.shards, work / quant, quant)
        manifest = json.loads((work / quant / "manifest.json").read_text())
        test = manifest["metrics"]["test"]
        files = manifest["files"]
        result[quant] = {
            "export_seconds": round(seconds, 2),
            "test": {k: v for k, v in test.items() if "@10" in k or k == "users"},
            "abs_diff": {k: test[k] - training[k] for k in ("NDCG@10", "HR@10")},
            "max_abs_diff_all_cutoffs": max(abs(test[k] - training[k]) for k in test if "@" in k and k in training),
            "rel_diff": {k: (test[k] - training[k]) / training[k] for k in ("NDCG@10", "HR@10")},
            "model_bytes": files["model.safetensors"]["bytes"],
            "items_bytes": files["items.safetensors"]["bytes"],
            "weights_bytes": files["model.safetensors"]["bytes"] + files["items.safetensors"]["bytes"],
            "artifact_bytes": sum(f["bytes"] for f in files.values()),
        }
    result["int8_to_fp32_weights_ratio"] = result["int8"]["weights_bytes"] / result["fp32"]["weights_bytes"]
    result["int8_to_fp32_items_ratio"] = result["int8"]["items_bytes"] / result["fp32"]["items_bytes"]
    result["source_bytes"] = _size(args.run / "best" / "model.safetensors", args.run / "best" / "items.safetensors")
    return result


# -- 2. model-only latency -------------------------------------------------------------------------


def _time_calls(fn, seconds: float, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    ms = []
    deadline = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        fn()
        now = time.perf_counter()
        ms.append((now - started) * 1e3)
        if now >= deadline:
            return ms


def section_latency(args, work: Path) -> dict:
    """The Python API without HTTP, one thread: a 200-event history recomputed in full (lean
    forward, and the training forward as the peer), and a stored session taking 1 new event."""
    import torch

    from serve.recommender import Query, Recommender
    from serve.sessions import SessionStore

    torch.set_num_threads(1)
    result: dict = {"threads": 1, "history_len": HISTORY_LEN, "k": 10}
    for quant in ("int8", "fp32"):
        rec = Recommender.load(work / quant)
        rec.warm_up()
        history = _histories(work / quant, 1, seed=0)[0]
        answer = rec.recommend([history], k=10)[0]
        if len(answer.items) != 10 or answer.unknown_items:
            raise RuntimeError(f"{quant}: unexpected answer {answer}")
        ms = _time_calls(lambda rec=rec, history=history: rec.recommend([history], k=10), args.seconds)
        result[quant] = {**_percentiles(ms), "items": int(rec.items.rows), "truncated": answer.truncated}
        # The peer: the same answer through the training forward (every position, every layer).
        lean, rec.lean = rec.lean, None
        peer = _time_calls(lambda rec=rec, history=history: rec.recommend([history], k=10), args.seconds / 2)
        rec.lean = lean
        result[quant]["training_forward"] = _percentiles(peer)
        result[quant]["lean_speedup"] = round(result[quant]["training_forward"]["p50_ms"] / result[quant]["p50_ms"], 2)
        # A stored session of the first 199 events, extended by the 200th: restored before each call.
        store = SessionStore()
        rec.answer([Query(history[:-1], user="u", seq=0)], store)
        stored = store.get("u")
        session_ms: list[float] = []
        deadline = time.perf_counter() + args.seconds
        while time.perf_counter() < deadline or len(session_ms) < 100:
            store.put("u", stored)
            started = time.perf_counter()
            got = rec.answer([Query(history[-1:], user="u", seq=len(history) - 1)], store)[0]
            session_ms.append((time.perf_counter() - started) * 1e3)
        if got.items != answer.items:
            raise RuntimeError(f"{quant}: the session's answer {got.items} differs from recomputation {answer.items}")
        result[quant]["session_1_new_event"] = _percentiles(session_ms[20:])
        del rec
    return result


# -- 3. HTTP end to end ------------------------------------------------------------------------------


WRK_SCRIPT = """
bodies = {%s}
counter = 0
request = function()
  if #bodies == 0 then return wrk.format("GET", "/healthz") end
  counter = counter + 1
  local body = bodies[(counter - 1) %% #bodies + 1]
  return wrk.format("POST", "/v1/recommend", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "duration_us": %%d, "errors": %%d, "non2xx": %%d, "p50_us": %%d, ' ..
    '"p90_us": %%d, "p99_us": %%d, "max_us": %%d, "mean_us": %%.1f}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


def _wrk(url: str, script: Path, concurrency: int, seconds: float) -> dict:
    """wrk (a C load generator, its own process) at ``concurrency`` open connections."""
    _, done = _run(
        ["wrk", "-t", min(2, concurrency), "-c", concurrency, "-d", f"{seconds:.0f}s", "--timeout", "10s",
         "-s", script, url],
        timeout=seconds + 120,
        what=f"wrk at concurrency {concurrency}",
    )  # fmt: skip
    level = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "n": level["requests"],
        "p50_ms": level["p50_us"] / 1e3,
        "p90_ms": level["p90_us"] / 1e3,
        "p99_ms": level["p99_us"] / 1e3,
        "mean_ms": round(level["mean_us"] / 1e3, 3),
        "max_ms": level["max_us"] / 1e3,
        "requests_per_s": round(level["requests"] / (level["duration_us"] / 1e6), 1),
        "errors": level["errors"] + level["non2xx"],
        "elapsed_s": round(level["duration_us"] / 1e6, 2),
    }


def _session_bodies(histories: list[list]) -> list[dict]:
    """Requests of users with stored sessions, in the order one connection sends them: each user
    first sends its first 100 events (seq 0), then one new event per request up to 200."""
    bodies = []
    for u, history in enumerate(histories):
        bodies.append({"user": u, "seq": 0, "history": history[:100], "k": 10})
        bodies += [
            {"user": u, "seq": seq, "history": history[seq : seq + 1], "k": 10} for seq in range(100, len(history))
        ]
    return bodies


def section_http(args, work: Path) -> dict:
    import httpx
    import psutil

    if shutil.which("wrk") is None:
        raise RuntimeError("the HTTP section needs wrk (a C load generator): apt-get install wrk")
    artifact = work / "int8"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    histories = _histories(artifact, 64, seed=1)
    scripts = {}
    # wrk builds one request before it starts sending (and drops it): the first body is a spare.
    sessions = [{"history": histories[0], "k": 10}, *_session_bodies(_histories(artifact, 200, seed=2))]
    for name, bodies in (("healthz", []), ("recommend", [{"history": h, "k": 10} for h in histories]),
                         ("sessions", sessions)):  # fmt: skip
        scripts[name] = work / f"wrk_{name}.lua"
        scripts[name].write_text(WRK_SCRIPT % ", ".join(f"[==[{json.dumps(b)}]==]" for b in bodies))
    result: dict = {"artifact": "int8", "server": "1 worker, 1 torch thread", "history_len": HISTORY_LEN, "k": 10}
    result |= {"load_generator": "wrk", "baseline": {}, "levels": {}}  # baseline: GET /healthz, the framework's floor
    server, result["ready_seconds"] = _start_server(artifact, port, work / "server.log", "--threads", "1")
    try:
        check = httpx.post(f"{url}/v1/recommend", json={"history": histories[0], "k": 10}, timeout=30).json()
        if len(check.get("items", [])) != 10 or check.get("unknown_items"):
            raise RuntimeError(f"unexpected answer from the server: {str(check)[:500]}")
        result["baseline"]["healthz"] = _wrk(url, scripts["healthz"], 1, min(5.0, args.seconds))
        for concurrency in (1, 8, 32):
            result["levels"][str(concurrency)] = _wrk(url, scripts["recommend"], concurrency, args.seconds)
            print(f"  concurrency {concurrency}: {result['levels'][str(concurrency)]}", flush=True)
        # One connection sends the session requests in order; 1 in 101 is a user's first (100 events).
        result["session_c1"] = {**_wrk(url, scripts["sessions"], 1, args.seconds), "requests_prepared": len(sessions)}
        if result["session_c1"]["n"] > len(sessions):
            raise RuntimeError(f"{result['session_c1']['n']} session requests sent, only {len(sessions)} prepared")
        print(f"  sessions at concurrency 1: {result['session_c1']}", flush=True)
        result["saturation_c32"] = _wrk(url, scripts["recommend"], 32, args.saturation_seconds)
        print(f"  saturation: {result['saturation_c32']}", flush=True)
        metrics = httpx.get(f"{url}/metrics").text
        batches = [line for line in metrics.splitlines() if line.startswith("lmrec_serve_model_batch_users_")]
        totals = {line.split()[0]: float(line.split()[1]) for line in batches if "_bucket" not in line}
        result["mean_model_batch_users"] = round(
            totals["lmrec_serve_model_batch_users_sum"] / totals["lmrec_serve_model_batch_users_count"], 2
        )
        result["server_rss_bytes"] = psutil.Process(server.pid).memory_info().rss
        started = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
            result["sigterm"] = {"exited": True, "exit_code": code, "seconds": round(time.perf_counter() - started, 2)}
        except subprocess.TimeoutExpired:
            result["sigterm"] = {"exited": False, "exit_code": None, "seconds": None}
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    # Throughput with a process per core (stored sessions would then need a user routed to one worker).
    port = _free_port()
    server, _ = _start_server(artifact, port, work / "server2.log", "--workers", "2", "--threads", "1")
    try:
        result["workers2_c32"] = _wrk(f"http://127.0.0.1:{port}", scripts["recommend"], 32, args.seconds)
        print(f"  2 workers, concurrency 32: {result['workers2_c32']}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return result


def _start_server(artifact: Path, port: int, log_path: Path, *options) -> tuple[subprocess.Popen, float]:
    """``lmrec serve`` in its own process; (process, seconds until /readyz answered)."""
    import httpx

    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [*LMREC, "serve", str(artifact), "--port", str(port), *options],
            cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    started = time.perf_counter()
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).status_code == 200:
                return server, round(time.perf_counter() - started, 2)
        except httpx.HTTPError:
            pass
        if time.perf_counter() - started > 120:
            server.kill()
            raise RuntimeError("the server was not ready within 120 s")
        time.sleep(0.1)


# -- 4. top-K over 10 M synthetic items, exact and through the item index -----------------------------


def _synthetic_artifacts(
    run: Path, paths: dict[str, Path], rows: int, dim: int, vectors=None, index_spec: str | None = None
) -> float:
    """Artifacts of one ``rows`` x ``dim`` table, one per quantization, written block-wise:
    ``vectors(generator, n)`` rows (i.i.d. normal by default); with ``index_spec`` each also gets
    an item index, built as ``lmrec export --index`` builds it."""
    import contextlib
    import dataclasses

    import numpy as np
    import pyarrow as pa

    from model.config import RecommenderConfig
    from model.modeling import SequenceRecommender
    from serve import index as item_index
    from serve.artifact import ArtifactWriter
    from serve.recommender import Recommender
    from train.saved_model import read_saved_model

    cfg = dataclasses.replace(read_saved_model(run / "best").config.architecture, hidden_size=dim)
    vocab = {"items": rows, "actions": 0, "gaps": 0}
    dense = {k: v.numpy() for k, v in SequenceRecommender(RecommenderConfig.build(cfg, vocab)).state_dict().items()}
    config = {"model": cfg.to_dict(), "vocab": vocab}
    vectors = vectors or (lambda generator, n: generator.standard_normal((n, dim), dtype=np.float32))
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(ArtifactWriter(path, quant, config, rows, dim, overwrite=True))
            for quant, path in paths.items()
        ]
        for writer in writers:
            writer.write_dense(dense)
        generator = np.random.default_rng(0)
        block = 1 << 18
        for start in range(0, rows, block):
            values = vectors(generator, min(rows, start + block) - start)
            for writer in writers:
                writer.write_items(start, values)
        ids = np.arange(2, rows, dtype=np.int64)
        vocab = pa.table({"index": ids, "raw_id": ids * 10, "count": np.ones(rows - 2, dtype=np.int64)})
        for writer in writers:
            writer.write_vocab(vocab)
        for writer in writers if index_spec is not None else []:
            staged = writer.seal()
            table = Recommender.load(staged, verify=False, search="exact").items
            spec = item_index.IndexSpec.parse(index_spec)
            writer.config["index"] = item_index.build(table, spec, staged, log=lambda line: print(f"  {line}"))
            del table
            writer.seal()
    os.sync()  # written back now: the timings after it do not share the disk and the cores with writeback
    return time.perf_counter() - started


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _stream_seconds(tensors: list, repeats: int = 5) -> float:
    """The memory-bandwidth bound of one pass over ``tensors``: the best time of a streaming
    reduction (bytewise max, torch's threads) over the same bytes."""
    import torch

    flat = [t.reshape(-1).view(torch.uint8) for t in tensors]
    return _best_seconds(lambda: [t.max() for t in flat], repeats)


def _int8_kernel_seconds(rec, batch: int, rows: int) -> float:
    """The arithmetic bound of the int8 kernel for ``rows`` rows and ``batch`` queries: its rate on
    a table that stays in cache (64 K rows of width 64: 4 MiB per thread), on every thread at once,
    less the cost of calls that score no row (argument passing). k = 1: as in a pass over a long
    table, almost no row passes the filter, so the time is the kernel's arithmetic."""
    import threading

    import numpy as np
    import torch

    from serve.topk import Int8Candidates, KernelCall

    table = rec.items.candidates
    cached_rows, calls = 1 << 16, 50 if batch == 1 else 5
    threads = torch.get_num_threads()
    codes = table.codes[:cached_rows]
    norms = np.linalg.norm(codes.astype(np.float32), axis=1)
    copies = [
        Int8Candidates(table.function, codes.copy(), table.alpha[:cached_rows].copy(),
                       table.beta[:cached_rows].copy(), norms, 2)
        for _ in range(threads)
    ]  # fmt: skip
    query = torch.randn(batch, table.dim, generator=torch.Generator().manual_seed(1))
    none = [np.zeros(0, dtype=np.int64)] * batch
    prepared = [KernelCall(copy, query, 1, none) for copy in copies]

    def on_every_thread(stop: int):
        def run(call):
            for _ in range(calls):
                call.run(2, stop)

        workers = [threading.Thread(target=run, args=(call,)) for call in prepared]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    seconds = _best_seconds(lambda: on_every_thread(cached_rows), 3) - _best_seconds(lambda: on_every_thread(2), 3)
    return seconds * rows / ((cached_rows - 2) * calls * threads)


def _sgemm_seconds(rec, batch: int, rows: int) -> float:
    """The arithmetic bound of the float block path (a float matmul per block) for ``rows`` rows:
    its rate on one block of in-cache data."""
    import torch

    block = torch.randn(rec.items.block_rows, rec.items.dim)
    query = torch.randn(batch, rec.items.dim)
    return _best_seconds(lambda: [query @ block.T for _ in range(10)], 3) / 10 * rows / rec.items.block_rows


def _time_top_k(rec, rows: int, dim: int, repeats: int) -> dict:
    import statistics

    import torch

    out = {}
    generator = torch.Generator().manual_seed(0)
    for batch, n in ((1, repeats), (32, max(2, repeats // 2))):
        hidden = torch.randn(batch, dim, generator=generator)
        rec.top_k(hidden, 10)  # warm-up: pages in the memory-mapped table
        seconds = []
        for _ in range(n):
            started = time.perf_counter()
            rec.top_k(hidden, 10)
            seconds.append(time.perf_counter() - started)
        median = statistics.median(seconds)
        out[f"batch{batch}"] = {
            "repeats": n,
            "median_ms_per_call": round(median * 1e3, 2),
            "ms_per_query": round(median * 1e3 / batch, 3),
            "items_per_s": round(rows * batch / median),
        }
    return out


def _bounds(rec, rows: int) -> dict:
    """Both bounds of this table's ranking, measured now: the streaming read of the bytes a pass
    reads, and the peak of the kernel that multiplies (per 32-query batch)."""
    items = rec.items
    read = [items.codes] + ([items.alpha, items.beta] if items.alpha is not None else [])
    out = {"bytes_read": sum(t.numel() * t.element_size() for t in read), "stream_ms": _stream_seconds(read) * 1e3}
    if items.candidates is not None:
        out |= {"kernel": "int8 dot products (serve/topk.c)", "kernel_ms_batch1": _int8_kernel_seconds(rec, 1, rows) * 1e3,
                "kernel_ms_batch32": _int8_kernel_seconds(rec, 32, rows) * 1e3}  # fmt: skip
    else:
        out |= {"kernel": "float matmul per block", "kernel_ms_batch1": _sgemm_seconds(rec, 1, rows) * 1e3,
                "kernel_ms_batch32": _sgemm_seconds(rec, 32, rows) * 1e3}  # fmt: skip
    out = {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}
    out["stream_gb_per_s"] = round(out["bytes_read"] / out["stream_ms"] / 1e6, 1)
    return out


def _ratios(timed: dict, bounds: dict) -> None:
    """Batch 1 against the streaming read, batch 32 against the kernel's peak (per call)."""
    timed["batch1"]["vs_stream"] = round(timed["batch1"]["median_ms_per_call"] / bounds["stream_ms"], 2)
    timed["batch1"]["vs_kernel"] = round(timed["batch1"]["median_ms_per_call"] / bounds["kernel_ms_batch1"], 2)
    timed["batch32"]["vs_kernel"] = round(timed["batch32"]["median_ms_per_call"] / bounds["kernel_ms_batch32"], 2)
    timed["batch32"]["vs_stream"] = round(timed["batch32"]["median_ms_per_call"] / bounds["stream_ms"], 2)


def section_topk(args, work: Path) -> dict:
    """Exact top-10 over a 10 M x 64 table, int8 (the compiled kernel) and fp32 (float blocks).
    The first of --topk-threads is the headline figure; the others go under threads_N. Every time
    comes with the bounds measured in the same run at the same thread count."""
    import torch

    from serve.recommender import Recommender

    rows, dim = args.topk_rows, 64
    threads = [int(t) for t in str(args.topk_threads).split(",")]
    need = rows * (dim * 4 + dim + 8) * 1.2 + 2e9
    free = shutil.disk_usage(work).free
    if free < need:
        return {"skipped": f"needs ~{need / 1e9:.0f} GB free in --work, {free / 1e9:.0f} GB there"}
    paths = {"int8": work / "topk_int8", "fp32": work / "topk_fp32"}
    result: dict = {"rows": rows, "dim": dim, "threads": threads[0], "k": 10}
    try:
        result["write_seconds"] = round(_synthetic_artifacts(args.run, paths, rows, dim), 1)
        for quant, path in paths.items():
            torch.set_num_threads(threads[0])
            started = time.perf_counter()
            rec = Recommender.load(path, verify=False)
            entry = {
                "load_seconds": round(time.perf_counter() - started, 2),
                "items_bytes": (path / "items.safetensors").stat().st_size,
            }
            for i, n in enumerate(threads):
                torch.set_num_threads(n)
                timed = _time_top_k(rec, rows, dim, args.topk_repeats)
                timed["bounds"] = _bounds(rec, rows)
                _ratios(timed, timed["bounds"])
                if i == 0:
                    entry |= timed
                else:
                    entry[f"threads_{n}"] = timed
            result[quant] = entry
            print(f"  {quant}: {entry}", flush=True)
            del rec
        result["int8_speedup_batch1"] = round(
            result["fp32"]["batch1"]["ms_per_query"] / result["int8"]["batch1"]["ms_per_query"], 2
        )
    finally:
        for path in paths.values():
            shutil.rmtree(path, ignore_errors=True)
    return result


def _clustered(clusters: int, dim: int, spread: float, seed: int):
    """``vectors(generator, n)`` drawing around ``clusters`` fixed centres of uneven popularity."""
    import numpy as np

    centres = np.random.default_rng(seed).standard_normal((clusters, dim), dtype=np.float32)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5
    weights /= weights.sum()

    def vectors(generator, n: int):
        near = generator.choice(clusters, size=n, p=weights)
        return centres[near] + spread * generator.standard_normal((n, dim), dtype=np.float32)

    return vectors


def section_index(args, work: Path) -> dict:
    """Top-10 through the approximate item index of a 10 M x 64 int8 table of clustered items:
    recall against the exact top-10 and per-query latency at batch 1, beside the exact path's."""
    import numpy as np
    import torch

    from serve.recommender import Recommender

    rows, dim, k = args.topk_rows, 64, 10
    need = rows * (dim + 8) * 2.5 + 2e9
    free = shutil.disk_usage(work).free
    if free < need:
        return {"skipped": f"needs ~{need / 1e9:.0f} GB free in --work, {free / 1e9:.0f} GB there"}
    torch.set_num_threads(int(str(args.topk_threads).split(",")[0]))
    clusters, spread = max(10, rows // 1000), 0.6
    vectors = _clustered(clusters, dim, spread, seed=0)
    path = work / "index_int8"
    result: dict = {"rows": rows, "dim": dim, "k": k, "spec": args.index_spec, "threads": torch.get_num_threads(),
                    "data": f"{clusters} clusters (Zipf 0.5 sizes), N(centre, {spread}^2) per dimension"}  # fmt: skip
    try:
        result["write_and_build_seconds"] = round(
            _synthetic_artifacts(args.run, {"int8": path}, rows, dim, vectors, args.index_spec), 1
        )
        config = json.loads((path / "config.json").read_text())["index"]
        result["index"] = config
        result["index_bytes"] = (path / config["file"]).stat().st_size
        result["items_bytes"] = (path / "items.safetensors").stat().st_size
        started = time.perf_counter()
        rec = Recommender.load(path, search="index")
        result["load_seconds_verified"] = round(time.perf_counter() - started, 2)
        exact = Recommender.load(path, verify=False, search="exact")
        queries = torch.from_numpy(vectors(np.random.default_rng(1), args.index_queries))
        truth = torch.cat([exact.top_k(queries[i : i + 32], k)[1] for i in range(0, len(queries), 32)])

        def measured(recommender, n: int) -> tuple[list[float], torch.Tensor]:
            recommender.top_k(queries[:1], k)
            ms, found = [], []
            for i in range(n):
                started = time.perf_counter()
                found.append(recommender.top_k(queries[i : i + 1], k)[1])
                ms.append((time.perf_counter() - started) * 1e3)
            return ms, torch.cat(found)

        def recall(found: torch.Tensor) -> float:
            hits = [len(set(found[b].tolist()) & set(truth[b].tolist())) for b in range(len(found))]
            return round(sum(hits) / (k * len(found)), 4)

        ms, found = measured(rec, len(queries))
        result["search"] = {**_percentiles(ms), "recall_at_10": recall(found)}
        # Of which FAISS's own search (the rest: the filter and the exact rescoring of the neighbours).
        searched = np.ascontiguousarray(rec.items._query(queries).numpy())
        faiss_ms = []
        for i in range(len(queries)):
            started = time.perf_counter()
            rec.index.index.search(searched[i : i + 1], rec.index.rerank * k)
            faiss_ms.append((time.perf_counter() - started) * 1e3)
        result["search"]["faiss_p50_ms"] = _percentiles(faiss_ms)["p50_ms"]
        exact_ms, _ = measured(exact, 20)
        result["exact_batch1"] = _percentiles(exact_ms)
        result["p50_vs_exact"] = round(result["search"]["p50_ms"] / result["exact_batch1"]["p50_ms"], 3)
        # The trade-off around the chosen setting: lists searched (IVF) or the graph's breadth (HNSW).
        sweep = {}
        knob = "nprobe" if config["kind"].startswith("ivf") else "efSearch"
        target = rec.index.index if knob == "nprobe" else rec.index.index.hnsw
        chosen = getattr(target, knob)
        for value in sorted({max(1, chosen // 4), max(1, chosen // 2), chosen, chosen * 2}):
            setattr(target, knob, value)
            ms, found = measured(rec, min(100, len(queries)))
            sweep[str(value)] = {"p50_ms": _percentiles(ms)["p50_ms"], "recall_at_10": recall(found)}
        setattr(target, knob, chosen)
        result["sweep_" + knob] = sweep
        print(f"  {result}", flush=True)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return result


# -- 5. offline scoring ----------------------------------------------------------------------------------


def section_score(args, work: Path) -> dict:
    import pyarrow.parquet as pq

    startup, _ = _run(
        [sys.executable, "-c", "import torch, pyarrow, serve.recommender, serve.offline"],
        timeout=300,
        what="python startup",
    )
    result: dict = {"k": 100, "python_startup_seconds": round(startup, 2)}
    for workers in (2, 1):
        out = work / "scores"
        seconds, _ = _run(
            [*LMREC, "score", "--artifact", work / "int8", "--input", args.shards, "--out", out,
             "--k", "100", "--workers", workers, "--quiet", "--overwrite"],
            timeout=1800,
            what=f"lmrec score --workers {workers}",
        )  # fmt: skip
        users = sum(pq.read_metadata(p).num_rows for p in sorted(out.glob("part-*.parquet")))
        first = pq.read_table(sorted(out.glob("part-*.parquet"))[0]).slice(0, 1).to_pylist()[0]
        if len(first["items"]) != 100:
            raise RuntimeError(f"lmrec score: {len(first['items'])} items for a user, expected 100")
        result[f"workers{workers}"] = {
            "seconds": round(seconds, 2),
            "users": users,
            "users_per_s": round(users / seconds, 1),
            "users_per_s_excluding_startup": round(users / max(1e-9, seconds - startup), 1),
        }
        shutil.rmtree(out, ignore_errors=True)
    result["steady"] = _score_steady(args, work)
    return result


def _matmul_peak(threads: int, m: int, k: int, n: int, seconds: float = 2.0) -> float:
    """FLOP/s of torch's fp32 matmul for (m, k) @ (k, n), the serving forward's own shapes."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        calls += 1
    return 2.0 * m * k * n * calls / (time.perf_counter() - started)


def _score_steady(args, work: Path) -> dict:
    """Offline scoring in steady state, in one process on both cores: ML-1M's users scored
    ``passes`` times by the code ``lmrec score`` runs per part (history read, lean forward, top-100,
    Parquet written), against the FLOP bound of that work at the measured matmul peak."""
    import numpy as np
    import torch

    from serve import offline
    from serve.recommender import Recommender

    threads, passes = os.cpu_count() or 2, 10
    rec = Recommender.load(work / "int8")
    rec.warm_up()
    parts, _, _ = offline._shard_parts(args.shards, rec, 100_000)
    torch.set_num_threads(threads)
    offline._worker_rec = rec
    out = work / "scores_steady"
    out.mkdir(exist_ok=True)
    lengths = np.concatenate([[len(h[0]) for h in offline._histories(p, rec)[1]] for p in parts])
    users, started = 0, time.perf_counter()
    for _ in range(passes):
        for part in parts:
            users += offline._score_part((part, str(out), 100, True, 256))[1]
    seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    # FLOPs of the lean forward and scoring per user (multiply-adds count 2): layers before the
    # last over every position (projections, feed-forward, causal attention); the last layer's
    # keys and values over every position, the rest for the last one; the catalog's scores.
    cfg = rec.model.cfg
    d, inner, layers = cfg.hidden_size, cfg.intermediate_size or 4 * cfg.hidden_size, cfg.num_layers
    n = np.minimum(lengths, rec.max_len).astype(np.float64)
    per_position = 2 * (4 * d * d + 3 * d * inner)
    flops = (layers - 1) * (n * per_position + 2 * d * n * n)  # attention: n^2/2 pairs, QK and AV
    flops += n * 2 * 2 * d * d + 2 * (2 * d * d + 3 * d * inner) + 4 * d * n
    flops += 2 * d * (rec.items.rows - 2)
    flops_per_pass = float(flops.sum())
    peak = _matmul_peak(threads, 256 * 128, d, inner)
    achieved = flops_per_pass * passes / seconds
    return {
        "threads": threads,
        "passes": passes,
        "users": users,
        "seconds": round(seconds, 2),
        "users_per_s": round(users / seconds, 1),
        "gflop_per_user": round(flops_per_pass / len(lengths) / 1e9, 5),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "achieved_gflops": round(achieved / 1e9, 2),
        "fraction_of_flop_bound": round(achieved / peak, 3),
        "flop_bound_users_per_s": round(peak / (flops_per_pass / len(lengths)), 0),
    }


# -- 6. fuzzing the HTTP API from its schema -------------------------------------------------------------------


def section_fuzz(args, work: Path) -> dict:
    """schemathesis (its own process) against a server with a bearer token; requests and their
    statuses counted by the server's own metrics."""
    import httpx

    schemathesis = Path(sys.executable).with_name("schemathesis")
    token_file = work / "fuzz_token"
    token_file.write_text("fuzz-token\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server, _ = _start_server(
        work / "int8", port, work / "fuzz_server.log", "--threads", "1", "--token-file", token_file
    )
    try:
        started = time.perf_counter()
        run = subprocess.run(
            [str(schemathesis), "run", f"{url}/openapi.json", "--header", "Authorization: Bearer fuzz-token",
             "--checks", "not_a_server_error", "--exclude-path", "/v1/admin/reload",
             "--max-examples", str(args.fuzz_examples), "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        statuses: dict[str, float] = {}
        for line in httpx.get(f"{url}/metrics").text.splitlines():
            if line.startswith("lmrec_serve_requests_total{"):
                status = line.split('status="')[1].split('"')[0]
                statuses[status] = statuses.get(status, 0) + float(line.split()[-1])
        summary = [line.strip() for line in run.stdout.splitlines() if "generated" in line or "issues" in line.lower()]
        return {
            "tool": "schemathesis "
            + subprocess.run([str(schemathesis), "--version"], capture_output=True, text=True).stdout.strip(),
            "examples_per_operation": args.fuzz_examples,
            "excluded": ["/v1/admin/reload"],
            "exit_code": run.returncode,
            "summary": summary,
            "seconds": round(seconds, 1),
            "requests": int(sum(statuses.values())),
            "statuses": {k: int(v) for k, v in sorted(statuses.items())},
            "server_errors": int(sum(v for k, v in statuses.items() if k.startswith("5"))),
            "server_alive": server.poll() is None,
        }
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


# -- 7. export of a 100 M-row table ----------------------------------------------------------------------


def _synthetic_model(run: Path, model_dir: Path, shards_dir: Path, rows: int, dim: int) -> dict:
    """A saved model with a random ``rows`` x ``dim`` fp32 table (written by the saved-model
    writer, a block at a time), and a shards-like directory holding only items.parquet."""
    import dataclasses

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from model.config import RecommenderConfig
    from model.modeling import SequenceRecommender
    from train.saved_model import read_saved_model, write_saved_model

    source = read_saved_model(run / "best")
    cfg = dataclasses.replace(source.config.architecture, hidden_size=dim)
    config = RecommenderConfig.build(cfg, {**source.config.vocab, "items": rows})
    training = dict(source.training)
    training.pop("test", None)
    training["config"] = {**training["config"], "model": cfg.to_dict()}
    training["config"]["data"] = {**training["config"]["data"], "shards": str(shards_dir)}
    training.update({"step": 0, "best_valid_ndcg10": None, "source_checkpoint": "synthetic"})
    shards_dir.mkdir(parents=True)
    timings = {}
    started = time.perf_counter()
    dense = SequenceRecommender(config).state_dict()
    generator = np.random.default_rng(0)

    def rows_of(start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(generator.standard_normal((stop - start, dim), dtype=np.float32))

    block = 1 << 20
    write_saved_model(model_dir, config, dense, rows_of, None, training, block_rows=block)
    timings["write_model_seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    schema = pa.schema([("index", pa.int64()), ("raw_id", pa.int64()), ("count", pa.int64())])
    with pq.ParquetWriter(shards_dir / "items.parquet", schema) as writer:
        for start in range(2, rows, block):
            index = np.arange(start, min(rows, start + block), dtype=np.int64)
            count = generator.integers(1, 100, size=len(index), dtype=np.int64)
            writer.write_table(pa.table({"index": index, "raw_id": index * 3 + 1, "count": count}, schema=schema))
    timings["write_vocab_seconds"] = round(time.perf_counter() - started, 1)
    timings["model_bytes"] = _tree_size(model_dir)
    timings["vocab_bytes"] = _tree_size(shards_dir)
    return timings


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, bytes (empty when it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _measured_run(cmd: list, timeout: float, phase=lambda: "", hide: str = "") -> dict:
    """Runs ``cmd`` (under /usr/bin/time -v when there is one), polling the python process's
    /proc status for peak resident memory split into anonymous and file-backed pages, with a
    timeline (every ~2 s: seconds, RssAnon MiB, RssFile MiB, ``phase()``). ``hide`` is replaced
    by WORK in the output lines kept."""
    import psutil

    gnu_time = Path("/usr/bin/time")
    full = [str(gnu_time), "-v", *map(str, cmd)] if gnu_time.exists() else [str(c) for c in cmd]
    peaks: dict[str, int] = {}
    timeline: list = []
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(full, cwd=ROOT, env=ENV, stdout=output, stderr=subprocess.STDOUT, text=True)
        try:
            while proc.poll() is None:
                if time.perf_counter() - started > timeout:
                    raise RuntimeError(f"no result within {timeout:.0f} s")
                try:
                    pids = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
                except psutil.Error:
                    pids = [proc.pid]
                for pid in pids[1:] if len(pids) > 1 and gnu_time.exists() else pids:
                    status = _proc_status(pid)
                    for key, value in status.items():
                        peaks[key] = max(peaks.get(key, 0), value)
                    now = time.perf_counter() - started
                    if status and (not timeline or now - timeline[-1][0] >= 2.0):
                        mib = [round(status.get(k, 0) / 2**20) for k in ("RssAnon", "RssFile")]
                        timeline.append([round(now, 1), *mib, phase()])
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
        wall = time.perf_counter() - started
        output.seek(0)
        text = output.read()
    if proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}\n{text[-3000:]}")
    result = {"wall_seconds": round(wall, 1), "polled_peak_bytes": peaks}
    result["timeline_s_anon_mib_file_mib_phase"] = timeline
    for line in text.splitlines():
        if "Maximum resident set size (kbytes)" in line:
            result["peak_rss_bytes"] = int(line.rsplit(":", 1)[1]) * 1024
        elif "Elapsed (wall clock) time" in line:
            result["time_elapsed"] = line.rsplit(": ", 1)[1].strip()
    result.setdefault("peak_rss_bytes", peaks.get("VmHWM", 0))
    kept = [line for line in text.splitlines() if line.startswith(("exported", "lmrec"))][-3:]
    result["log_tail"] = [line.replace(hide, "WORK") if hide else line for line in kept]
    return result


def section_export100m(args, work: Path) -> dict:
    rows, dim = args.big_rows, 32
    need = rows * (dim * 4 + dim + 8 + 24 * 2) + 3e9
    free = shutil.disk_usage(work).free
    result: dict = {"rows": rows, "dim": dim, "quant": "int8", "disk_free_bytes_before": free}
    if free < need:
        result["skipped"] = f"needs ~{need / 1e9:.0f} GB free in --work, {free / 1e9:.0f} GB there"
        return result
    model_dir, shards_dir, out = work / "big_model", work / "big_shards", work / "a100m"
    try:
        result |= _synthetic_model(args.run, model_dir, shards_dir, rows, dim)
        print(f"  synthetic model written: {result}", flush=True)
        cmd = [*LMREC, "export", model_dir, "--out", out, "--quant", "int8", "--shards", shards_dir, "--no-eval"]

        def phase() -> str:
            """What the export is doing, from the files in its staging directory."""
            staged = next(iter(work.glob(".a100m.tmp-*")), None)
            if staged is None:
                return "start" if not out.exists() else "done"
            names = {p.name for p in staged.iterdir()}
            if "manifest.json" in names or "config.json" in names:
                return "seal"
            if "vocab.parquet" in names:
                return "vocab"
            return "items" if "items.safetensors" in names else "dense"

        result["export"] = _measured_run(cmd, timeout=args.big_timeout, phase=phase, hide=str(work))
        manifest = json.loads((out / "manifest.json").read_text())
        result["artifact_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
        result["artifact_files"] = {name: f["bytes"] for name, f in manifest["files"].items()}
    finally:
        for path in (model_dir, shards_dir, out):
            shutil.rmtree(path, ignore_errors=True)
    return result


# -- report ------------------------------------------------------------------------------------------------


def _table(results: dict) -> list[tuple[str, str, str, str]]:
    """(what, value, goal, ok) rows for the figures that have goals, then a few others."""
    rows = []

    def add(what, value, goal="", ok=None):
        rows.append((what, value, goal, "" if ok is None else ("ok" if ok else "MISSED")))

    e = results.get("export")
    if e and "error" not in e:
        d32 = e["fp32"]["abs_diff"]["NDCG@10"]
        add("fp32 NDCG@10 - training", f"{d32:+.2e}", "0 (< 1e-9)", abs(d32) <= GOALS["fp32_abs_diff_max"])
        worst = e["fp32"].get("max_abs_diff_all_cutoffs", abs(d32))
        add("fp32 max |diff|, all HR/NDCG@k", f"{worst:.2e}", "0 (< 1e-9)", worst <= GOALS["fp32_abs_diff_max"])
        r8 = e["int8"]["rel_diff"]["NDCG@10"]
        add("int8 NDCG@10 rel. diff", f"{r8:+.2%}", "<= 1 %", abs(r8) <= GOALS["int8_ndcg10_rel_diff_max"])
        add("int8 NDCG@10 / HR@10", f"{e['int8']['test']['NDCG@10']:.4f} / {e['int8']['test']['HR@10']:.4f}")
        ratio = e["int8_to_fp32_weights_ratio"]
        add("int8 / fp32 weights bytes", f"{ratio:.1%}", "<= 30 %", ratio <= GOALS["int8_size_ratio_max"])
        add("int8 / fp32 item table bytes", f"{e['int8_to_fp32_items_ratio']:.1%}")
    lat = results.get("latency")
    if lat and "error" not in lat:
        for quant in ("int8", "fp32"):
            p50 = lat[quant]["p50_ms"]
            ok = p50 <= GOALS["model_p50_ms_max"] if quant == "int8" else None
            add(
                f"model {quant} p50 / p99 ms, 200 events",
                f"{p50:.2f} / {lat[quant]['p99_ms']:.2f} ({lat[quant]['lean_speedup']:.2f}x faster than the "
                f"training forward's {lat[quant]['training_forward']['p50_ms']:.2f})",
                "p50 <= 2" if ok is not None else "",
                ok,
            )
            session = lat[quant]["session_1_new_event"]
            ok = session["p50_ms"] <= GOALS["session_p50_ms_max"] if quant == "int8" else None
            add(
                f"model {quant} stored session + 1 event",
                f"{session['p50_ms']:.2f} / {session['p99_ms']:.2f} ms ({p50 / session['p50_ms']:.1f}x faster)",
                "p50 <= 0.5" if ok is not None else "",
                ok,
            )
    http = results.get("http")
    if http and "error" not in http:
        for c, level in http["levels"].items():
            if not level.get("n"):
                add(f"http c={c}", "no successful requests", "", False)
                continue
            goal, ok = "", None
            if c == "1":
                goal = "p50 <= 3, p99 <= 8"
                ok = level["p50_ms"] <= GOALS["http_c1_p50_ms_max"] and level["p99_ms"] <= GOALS["http_c1_p99_ms_max"]
            if c == "32":
                goal = ">= 500/s, p99 <= 100"
                ok = (
                    level["requests_per_s"] >= GOALS["http_c32_requests_per_s_min"]
                    and level["p99_ms"] <= GOALS["http_c32_p99_ms_max"]
                )
            value = f"{level['p50_ms']:.2f} / {level['p99_ms']:.2f} ms, {level['requests_per_s']:.0f} req/s"
            add(
                f"http c={c} p50 / p99, rate",
                value + (f", {level['errors']} errors" if level["errors"] else ""),
                goal,
                ok,
            )
        for name, level in http.get("baseline", {}).items():
            if level.get("n"):
                add(f"http GET /{name} c=1 p50 / p99", f"{level['p50_ms']:.2f} / {level['p99_ms']:.2f} ms")
        session = http["session_c1"]
        add(
            "http c=1 stored session + 1 event",
            f"{session['p50_ms']:.2f} / {session['p99_ms']:.2f} ms p50 / p99",
            "p50 <= 1.5",
            session["p50_ms"] <= GOALS["http_session_c1_p50_ms_max"] and not session["errors"],
        )
        sat = http["saturation_c32"]
        w2 = http["workers2_c32"]
        add("http c=32, 2 workers", f"{w2['p50_ms']:.1f} / {w2['p99_ms']:.1f} ms, {w2['requests_per_s']:.0f} req/s")
        add(
            f"http c=32 for {sat['elapsed_s']:.0f} s",
            f"{sat['requests_per_s']:.0f} req/s, p99 {sat['p99_ms']:.1f} ms, {sat['errors']} errors; "
            f"{http['mean_model_batch_users']:.1f} users per model batch",
            "0 errors",
            sat["errors"] == 0,
        )
        term = http.get("sigterm", {})
        add(
            "http SIGTERM exit",
            f"code {term.get('exit_code')} in {term.get('seconds')} s",
            "exits",
            bool(term.get("exited")),
        )
    topk = results.get("topk")
    if topk and "error" not in topk and "skipped" not in topk:
        for quant in ("int8", "fp32"):
            q = topk[quant]
            for label, t in [(str(topk["threads"]), q)] + [
                (key.split("_")[1], value) for key, value in q.items() if key.startswith("threads_")
            ]:
                b1, b32, bounds = t["batch1"], t["batch32"], t["bounds"]
                headline = quant == "int8" and label == str(topk["threads"])
                add(
                    f"top-10 of {topk['rows'] / 1e6:.0f}M, {quant}, {label} thr., B=1",
                    f"{b1['ms_per_query']:.1f} ms/query = {b1['vs_stream']:.2f}x the streaming read "
                    f"({bounds['stream_ms']:.1f} ms, {bounds['stream_gb_per_s']:.0f} GB/s)",
                    "<= 1.5x" if headline else "",
                    b1["vs_stream"] <= GOALS["topk_int8_batch1_vs_stream_max"] if headline else None,
                )
                add(
                    f"top-10 of {topk['rows'] / 1e6:.0f}M, {quant}, {label} thr., B=32",
                    f"{b32['ms_per_query']:.2f} ms/query = {b32['vs_kernel']:.2f}x the {bounds['kernel']} peak "
                    f"({bounds['kernel_ms_batch32'] / 32:.2f} ms/query)",
                    "<= 1.5x" if headline else "",
                    b32["vs_kernel"] <= GOALS["topk_int8_batch32_vs_kernel_max"] if headline else None,
                )
        add(
            "top-K item table bytes int8 / fp32",
            f"{topk['int8']['items_bytes'] / 1e9:.2f} / {topk['fp32']['items_bytes'] / 1e9:.2f} GB",
        )
    ix = results.get("index")
    if ix and "error" not in ix and "skipped" not in ix:
        search = ix["search"]
        add(
            f"index {ix['index']['kind']} top-10 of {ix['rows'] / 1e6:.0f}M clustered, B=1",
            f"recall@10 {search['recall_at_10']:.3f}, p50 {search['p50_ms']:.2f} ms / p99 {search['p99_ms']:.2f} "
            f"({ix['p50_vs_exact']:.3f}x exact's p50 {ix['exact_batch1']['p50_ms']:.1f} ms)",
            ">= 0.95, p50 <= 5",
            search["recall_at_10"] >= GOALS["index_recall10_min"] and search["p50_ms"] <= GOALS["index_p50_ms_max"],
        )
        add(
            f"index {ix['index']['kind']} build, size",
            f"{ix['index']['build_seconds']:.0f} s, {ix['index_bytes'] / 1e9:.2f} GB "
            f"({ix['index_bytes'] / ix['items_bytes']:.2f}x the int8 table)",
        )
    sc = results.get("score")
    if sc and "error" not in sc:
        for w in (2, 1):
            s = sc[f"workers{w}"]
            add(
                f"lmrec score users/s, {w} worker(s), one pass",
                f"{s['users_per_s']:.0f} ({s['users']} in {s['seconds']:.1f} s; {s['users_per_s_excluding_startup']:.0f} w/o startup)",
            )
        st = sc["steady"]
        add(
            f"scoring, steady state ({st['users']:,} users, k=100)",
            f"{st['users_per_s']:.0f} users/s = {st['fraction_of_flop_bound']:.1%} of the FLOP bound "
            f"({st['flop_bound_users_per_s']:.0f}/s at {st['matmul_peak_gflops']:.0f} GFLOP/s)",
            ">= 1500",
            st["users_per_s"] >= GOALS["score_steady_users_per_s_min"],
        )
    fz = results.get("fuzz")
    if fz and "error" not in fz:
        add(
            "HTTP fuzz (schemathesis)",
            f"{fz['requests']:,} requests, {fz['server_errors']} >= 500, exit {fz['exit_code']}",
            ">= 10,000, 0 >= 500",
            fz["requests"] >= GOALS["fuzz_requests_min"] and fz["server_errors"] == 0 and fz["exit_code"] == 0,
        )
    big = results.get("export100m")
    if big and "error" not in big and "skipped" not in big:
        peak = big["export"]["peak_rss_bytes"] / 2**30
        anon = big["export"]["polled_peak_bytes"].get("RssAnon", 0) / 2**30
        add(
            f"export {big['rows'] / 1e6:.0f}M x {big['dim']} peak RSS",
            f"{peak:.2f} GiB (anon {anon:.2f})",
            "<= 2 GiB",
            peak <= GOALS["export100m_peak_rss_gib_max"],
        )
        add(f"export {big['rows'] / 1e6:.0f}M x {big['dim']} wall", f"{big['export']['wall_seconds']:.0f} s")
    for name in SECTIONS:
        section = results.get(name) or {}
        if "error" in section:
            add(f"{name}: ERROR", section["error"].splitlines()[0][:90])
        elif "skipped" in section:
            add(f"{name}: skipped", section["skipped"][:90])
    return rows


def _print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else [0] * 4
    for r in [("figure", "value", "goal", ""), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "ml-1m" / "train", help="a finished training run")
    parser.add_argument("--shards", type=Path, default=ROOT / "runs" / "ml-1m" / "shards", help="its prepared shards")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a new temporary one, removed after)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each latency measurement")
    parser.add_argument("--skip-100m", action="store_true", help="leave out the 100 M-row export")
    parser.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}; the JSON keeps the others")
    parser.add_argument("--topk-rows", type=int, default=10_000_000, help=argparse.SUPPRESS)
    parser.add_argument("--topk-repeats", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--topk-threads", default="2,1", help=argparse.SUPPRESS)
    parser.add_argument("--index-spec", default="ivf-sq8", help="the item index of the index section")
    parser.add_argument("--index-queries", type=int, default=300, help=argparse.SUPPRESS)
    parser.add_argument("--big-rows", type=int, default=100_000_000, help=argparse.SUPPRESS)
    parser.add_argument("--big-timeout", type=float, default=3600, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json", help=argparse.SUPPRESS)
    parser.add_argument("--saturation-seconds", type=float, default=60.0, help="the HTTP run at concurrency 32")
    parser.add_argument("--fuzz-examples", type=int, default=11000, help="schemathesis examples per operation")
    args = parser.parse_args()

    sections = list(SECTIONS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.skip_100m and "export100m" in sections:
        sections.remove("export100m")
    for path, what in ((args.run / "best" / "items.safetensors", "--run"), (args.shards / "manifest.json", "--shards")):
        if not path.exists():
            raise SystemExit(f"{what}: {path} not found")

    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="lmrec-bench-serve-")) if temporary else args.work
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    if args.only and args.out.exists():
        results = json.loads(args.out.read_text())  # keep the sections not run this time
    import torch

    results["date"] = time.strftime("%Y-%m-%d")
    results["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}"
    results["goals"] = GOALS
    results["commands"] = {
        "export": "lmrec export RUN/best --out WORK/{fp32,int8} --quant {fp32,int8} --shards SHARDS",
        "http": "lmrec serve WORK/int8 --port P --threads 1; wrk -t2 -c{1,8,32} -d10s -s WORK/wrk_recommend.lua URL",
        "fuzz": "schemathesis run URL/openapi.json --header 'Authorization: Bearer T' --checks not_a_server_error "
        "--exclude-path /v1/admin/reload --max-examples 11000 --seed 1",
        "score": "lmrec score --artifact WORK/int8 --input SHARDS --out WORK/scores --k 100 --workers {2,1}",
        "export100m": "lmrec export SYNTH_MODEL --out WORK/a100m --quant int8 --shards SYNTH_SHARDS --no-eval",
    }
    functions = {
        "export": section_export,
        "latency": section_latency,
        "http": section_http,
        "topk": section_topk,
        "index": section_index,
        "score": section_score,
        "fuzz": section_fuzz,
        "export100m": section_export100m,
    }
    try:
        for name in sections:
            print(f"== {name}", flush=True)
            started, load = time.perf_counter(), os.getloadavg()
            try:
                if name in ("latency", "http", "score", "fuzz"):
                    _ensure_artifacts(args, work)
                results[name] = functions[name](args, work)
            except Exception as e:  # one failed section must not lose the others' figures
                import traceback

                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}"}
            results[name]["section_seconds"] = round(time.perf_counter() - started, 1)
            results[name]["load_average_before"] = [round(x, 2) for x in load]  # other work on the machine
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for name in ("topk_int8", "topk_fp32", "index_int8", "big_model", "big_shards", "a100m", "scores"):
                shutil.rmtree(work / name, ignore_errors=True)
    print()
    try:
        _print_table(_table(results))
    except (KeyError, TypeError, ValueError) as e:  # figures of an older layout in the JSON
        print(f"(no table: {type(e).__name__} {e}); the figures:\n{json.dumps(results, indent=1)}")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
