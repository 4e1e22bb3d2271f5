"""Serving benchmark: export, quantization parity and size, latency, throughput, large tables.

Sections (``--only`` picks some of them; the others keep their figures in the JSON):

- ``export``: ``lmrec export RUN/best`` as fp32 and int8; the serving-path test metrics measured
  during export against the training evaluator's (RUN/metrics.json), and the size on disk.
- ``latency``: ``Recommender.recommend`` for one history of 200 real item IDs, k = 10, in this
  process on 1 torch thread; p50/p99 over ``--seconds``, int8 and fp32.
- ``http``: ``lmrec serve ARTIFACT --threads 1`` and a separate client process (httpx, keep-alive,
  one connection per client thread) posting /v1/recommend at concurrency 1, 8 and 32.
- ``topk``: ``Recommender.top_k`` over a synthetic 10 M x 64 item table, int8 and fp32, 2 threads.
- ``score``: ``lmrec score`` of every user of the shards (k = 100) with 2 and 1 worker processes.
- ``export100m``: ``lmrec export`` of a synthetic consolidated model with a 100 M x 32 fp32 table
  into int8, with the export's peak memory (``--skip-100m`` leaves it out; needs ~25 GB of disk).

Writes benchmarks/results/serve.json.

    python benchmarks/serve.py --run runs/ml-1m/train --shards runs/ml-1m/shards [--seconds 10]
        [--work DIR] [--skip-100m] [--only export,latency,http,topk,score,export100m]
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

SECTIONS = ("export", "latency", "http", "topk", "score", "export100m")
GOALS = {
    "fp32_abs_diff_max": 1e-9,  # identical ranks; NDCG means may differ in the last bits (summation order)
    "int8_ndcg10_rel_diff_max": 0.01,
    "int8_size_ratio_max": 0.30,
    "model_p50_ms_max": 2.0,
    "http_c1_p50_ms_max": 5.0,
    "http_c1_p99_ms_max": 15.0,
    "score_users_per_s_min": 2000,
    "export100m_peak_rss_gib_max": 2.0,
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
    import torch

    from serve.recommender import Recommender

    torch.set_num_threads(1)
    result: dict = {"threads": 1, "history_len": HISTORY_LEN, "k": 10}
    for quant in ("int8", "fp32"):
        rec = Recommender.load(work / quant)
        history = _histories(work / quant, 1, seed=0)[0]
        answer = rec.recommend([history], k=10)[0]
        if len(answer.items) != 10 or answer.unknown_items:
            raise RuntimeError(f"{quant}: unexpected answer {answer}")
        ms = _time_calls(lambda rec=rec, history=history: rec.recommend([history], k=10), args.seconds)
        result[quant] = {**_percentiles(ms), "items": int(rec.items.rows), "truncated": answer.truncated}
        del rec
    return result


# -- 3. HTTP end to end ------------------------------------------------------------------------------


def client_main(url: str, concurrency: int, seconds: float, payload_file: str | None) -> None:
    """The load generator (its own process): ``concurrency`` threads, one keep-alive connection
    each, posting /v1/recommend until ``seconds`` have passed. Prints one JSON line."""
    import httpx

    payloads = [json.dumps(p).encode() for p in json.loads(Path(payload_file).read_text())] if payload_file else []
    headers = {"content-type": "application/json"}

    def request(client, n: int):
        if not payloads:  # the framework's floor: GET /healthz
            return client.get("/healthz")
        return client.post("/v1/recommend", content=payloads[n % len(payloads)], headers=headers)

    barrier = threading.Barrier(concurrency + 1)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    deadline = [0.0]

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30.0) as client:
            for j in range(3):  # connect and warm up, not timed
                request(client, i + j)
            barrier.wait()
            n = i
            while True:
                started = time.perf_counter()
                try:
                    response = request(client, n)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                now = time.perf_counter()
                if ok:
                    latencies[i].append((now - started) * 1e3)
                else:
                    errors[i] += 1
                n += 1
                if now >= deadline[0]:
                    return

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait(timeout=120)
    started = time.perf_counter()
    deadline[0] = started + seconds
    for t in threads:
        t.join(timeout=seconds + 120)
    elapsed = time.perf_counter() - started
    ms = [x for per in latencies for x in per]
    print(json.dumps({"concurrency": concurrency, "elapsed_s": elapsed, "errors": sum(errors), "ms": ms}))


def section_http(args, work: Path) -> dict:
    import httpx
    import psutil

    artifact = work / "int8"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    payload_file = work / "http_payloads.json"
    payload_file.write_text(json.dumps([{"history": h, "k": 10} for h in _histories(artifact, 64, seed=1)]))
    log_path = work / "server.log"
    result: dict = {"artifact": "int8", "server_threads": 1, "history_len": HISTORY_LEN, "k": 10}
    result |= {"baseline": {}, "levels": {}}  # baseline: GET /healthz at concurrency 1, the framework's floor
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [*LMREC, "serve", str(artifact), "--port", str(port), "--threads", "1"],
            cwd=ROOT,
            env=ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        started = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode}: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 120:
                raise RuntimeError("the server was not ready within 120 s")
            time.sleep(0.1)
        result["ready_seconds"] = round(time.perf_counter() - started, 2)
        check = httpx.post(f"{url}/v1/recommend", json=json.loads(payload_file.read_text())[0], timeout=30).json()
        if len(check.get("items", [])) != 10 or check.get("unknown_items"):
            raise RuntimeError(f"unexpected answer from the server: {str(check)[:500]}")
        for concurrency in ("healthz", 1, 8, 32):
            seconds = min(3.0, args.seconds) if concurrency == "healthz" else args.seconds
            payload = [] if concurrency == "healthz" else ["--payload", payload_file]
            _, done = _run(
                [sys.executable, __file__, "--client", url, "--concurrency", 1 if concurrency == "healthz" else concurrency,
                 "--seconds", seconds, *payload],
                timeout=seconds + 300,
                what=f"HTTP client at concurrency {concurrency}",
            )  # fmt: skip
            level = json.loads(done.stdout.strip().splitlines()[-1])
            ms = level.pop("ms")
            result["levels" if concurrency != "healthz" else "baseline"][str(concurrency)] = {
                **(_percentiles(ms) if ms else {"n": 0}),
                "requests_per_s": round(len(ms) / level["elapsed_s"], 1),
                "errors": level["errors"],
                "elapsed_s": round(level["elapsed_s"], 2),
            }
            where = result["levels" if concurrency != "healthz" else "baseline"][str(concurrency)]
            print(f"  concurrency {concurrency}: {where}", flush=True)
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
    return result


# -- 4. top-K over 10 M synthetic items ---------------------------------------------------------------


def _synthetic_artifacts(run: Path, paths: dict[str, Path], rows: int, dim: int) -> float:
    """Artifacts of one random ``rows`` x ``dim`` table, one per quantization, written block-wise."""
    import contextlib
    import dataclasses

    import numpy as np
    import pyarrow as pa

    from model.config import RecommenderConfig
    from model.modeling import SequenceRecommender
    from serve.artifact import ArtifactWriter
    from train.saved_model import read_saved_model

    cfg = dataclasses.replace(read_saved_model(run / "best").config.architecture, hidden_size=dim)
    vocab = {"items": rows, "actions": 0, "gaps": 0}
    dense = {k: v.numpy() for k, v in SequenceRecommender(RecommenderConfig.build(cfg, vocab)).state_dict().items()}
    config = {"model": cfg.to_dict(), "vocab": vocab}
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
            values = generator.standard_normal((min(rows, start + block) - start, dim), dtype=np.float32)
            for writer in writers:
                writer.write_items(start, values)
        index = np.arange(2, rows, dtype=np.int64)
        vocab = pa.table({"index": index, "raw_id": index * 10, "count": np.ones(rows - 2, dtype=np.int64)})
        for writer in writers:
            writer.write_vocab(vocab)
    return time.perf_counter() - started


def _time_top_k(rec, rows: int, dim: int, repeats: int) -> dict:
    import statistics

    import torch

    out = {}
    generator = torch.Generator().manual_seed(0)
    for batch, n in ((1, repeats), (32, max(2, repeats - 2))):
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
            "median_ms_per_call": round(median * 1e3, 1),
            "ms_per_query": round(median * 1e3 / batch, 2),
            "items_per_s": round(rows * batch / median),
        }
    return out


def section_topk(args, work: Path) -> dict:
    """The first of --topk-threads is the headline figure (batch1, batch32); the others go under
    threads_N: on a machine shared with other work, 2 OpenMP threads on 2 cores can be far slower
    than 1 (every parallel region waits for a descheduled thread)."""
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
    return result


# -- 6. export of a 100 M-row table ----------------------------------------------------------------------


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
                f"model {quant} p50 / p99 ms",
                f"{p50:.2f} / {lat[quant]['p99_ms']:.2f}",
                "p50 <= 2" if ok is not None else "",
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
                goal = "p50 <= 5, p99 <= 15"
                ok = level["p50_ms"] <= GOALS["http_c1_p50_ms_max"] and level["p99_ms"] <= GOALS["http_c1_p99_ms_max"]
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
                add(
                    f"top-10 of {topk['rows'] / 1e6:.0f}M, {quant}, {label} thr.",
                    f"{t['batch1']['ms_per_query']:.0f} ms/query (B=1), {t['batch32']['ms_per_query']:.1f} (B=32)",
                )
        add(
            "top-K item table bytes int8 / fp32",
            f"{topk['int8']['items_bytes'] / 1e9:.2f} / {topk['fp32']['items_bytes'] / 1e9:.2f} GB",
        )
    sc = results.get("score")
    if sc and "error" not in sc:
        for w in (2, 1):
            s = sc[f"workers{w}"]
            ok = s["users_per_s"] >= GOALS["score_users_per_s_min"] if w == 2 else None
            add(
                f"score users/s, {w} worker(s)",
                f"{s['users_per_s']:.0f} ({s['users']} in {s['seconds']:.1f} s; {s['users_per_s_excluding_startup']:.0f} w/o startup)",
                ">= 2000" if w == 2 else "",
                ok,
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
    parser.add_argument("--topk-repeats", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--topk-threads", default="2,1", help=argparse.SUPPRESS)
    parser.add_argument("--big-rows", type=int, default=100_000_000, help=argparse.SUPPRESS)
    parser.add_argument("--big-timeout", type=float, default=3600, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client:
        client_main(args.client, args.concurrency, args.seconds, args.payload)
        return

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
        "http": "lmrec serve WORK/int8 --port P --threads 1",
        "score": "lmrec score --artifact WORK/int8 --input SHARDS --out WORK/scores --k 100 --workers {2,1}",
        "export100m": "lmrec export SYNTH_MODEL --out WORK/a100m --quant int8 --shards SYNTH_SHARDS --no-eval",
    }
    functions = {
        "export": section_export,
        "latency": section_latency,
        "http": section_http,
        "topk": section_topk,
        "score": section_score,
        "export100m": section_export100m,
    }
    try:
        for name in sections:
            print(f"== {name}", flush=True)
            started, load = time.perf_counter(), os.getloadavg()
            try:
                if name in ("latency", "http", "score"):
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
            for name in ("topk_int8", "topk_fp32", "big_model", "big_shards", "a100m", "scores"):
                shutil.rmtree(work / name, ignore_errors=True)
    print()
    try:
        _print_table(_table(results))
    except (KeyError, TypeError, ValueError) as e:  # figures of an older layout in the JSON
        print(f"(no table: {type(e).__name__} {e}); the figures:\n{json.dumps(results, indent=1)}")
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
