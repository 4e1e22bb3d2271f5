"""Data preparation speed and memory, per engine, through the real ``lmrec data prepare``.

Inputs are Parquet files of synthetic events written beforehand (not timed): users with a
geometric number of events (mean ``--events-per-user``), items drawn from a Zipf-like law,
increasing times, ratings 1-5, rows interleaved across users as in a real log. Each run is one
``lmrec`` process; its memory is the peak of the summed RSS of the whole process tree (pool
workers, DuckDB's threads, Spark's JVMs and Python workers, and a standalone cluster's master and
worker JVMs), sampled every 0.2 s. Disk: the peak of the file system's used bytes above what it
was before the run. Outputs and inputs are removed afterwards.

Sections (``--only``, comma-separated):
- ``ml1m``: ML-1M (the SASRec file from ../shared) in memory, wall time; and the shard reader's
  tokens/s (one dataloader worker);
- ``memory``: 10^8 events in memory (goal >= 2 M events/s end to end);
- ``duckdb``: 10^9 events out of core (10 M users, 10 M items; goals <= 8 GiB summed RSS and
  >= 1 M events/s); checks free disk first;
- ``spark``: 10^8 events on Spark local[2] and on a 2-worker standalone cluster on 127.0.0.1.

    python benchmarks/data_prep.py [--only memory,duckdb,spark] [--work DIR] [--scale 0.1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ML1M = ROOT.parent / "shared" / "datasets" / "ml-1m"
RESULTS = ROOT / "benchmarks" / "results" / "data_prep.json"
GIB = 2**30


def write_events(path: Path, users: int, items: int, events_per_user: float, seed: int = 0, files: int = 1) -> int:
    """Synthetic events as a Parquet file (``files`` = 1) or a directory of ``files`` part
    files, written in blocks of users (bounded memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    block = max(1, min(int(2e7 // events_per_user), -(-users // files)))
    # Zipf-like popularity over a random order of the items, drawn by inverse CDF.
    weights = 1.0 / np.arange(1, items + 1) ** 0.8
    cdf = np.cumsum(weights) / weights.sum()
    item_of_rank = rng.permutation(items).astype(np.int64) + 1
    total = 0
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
                        ("rating", pa.int8())])  # fmt: skip
    if files > 1:
        path.mkdir(parents=True)
    targets = [path] if files == 1 else [path / f"part-{i:05d}.parquet" for i in range(files)]
    writers = [pq.ParquetWriter(target, schema, compression="zstd") for target in targets]
    with contextlib.ExitStack() as stack:
        for writer in writers:
            stack.enter_context(writer)
        for number, lo in enumerate(range(0, users, block)):
            writer = writers[number % files]
            n_users = min(block, users - lo)
            lengths = 1 + rng.geometric(1.0 / events_per_user, size=n_users)
            n = int(lengths.sum())
            user = np.repeat(np.arange(lo + 1, lo + n_users + 1, dtype=np.int64), lengths)
            item = item_of_rank[np.minimum(np.searchsorted(cdf, rng.random(n)), items - 1)]
            start = rng.integers(1_500_000_000, 1_600_000_000, size=n_users)
            gaps = rng.exponential(86_400.0, size=n).astype(np.int64)
            first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            steps = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[first] - gaps[first], lengths)
            ts = np.repeat(start, lengths) + steps
            rating = rng.integers(1, 6, size=n).astype(np.int8)
            order = rng.permutation(n)  # a log interleaves users
            table = pa.table({"user_id": user[order], "item_id": item[order], "timestamp": ts[order],
                              "rating": rating[order]})  # fmt: skip
            writer.write_table(table, row_group_size=1 << 20)
            total += n
    return total


class TreeMemory:
    """Peak summed RSS of a process tree plus ``extra`` PIDs, sampled in a thread."""

    def __init__(self, pid: int, extra: list[int] = (), disk_path: Path | None = None):
        import psutil

        self.root, self.extra, self.peak, self.disk_peak = psutil.Process(pid), list(extra), 0, 0
        self.disk_path = disk_path
        self.disk_before = shutil.disk_usage(disk_path).used if disk_path else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for pid in self.extra:  # a cluster's daemons, with the executors they start
                with contextlib.suppress(psutil.Error):
                    daemon = psutil.Process(pid)
                    procs += [daemon, *daemon.children(recursive=True)]
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            if self.disk_path is not None:
                self.disk_peak = max(self.disk_peak, shutil.disk_usage(self.disk_path).used - self.disk_before)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_prepare(args: list, work: Path, extra_pids: list[int] = (), env: dict | None = None) -> dict:
    """One ``lmrec data prepare`` process: wall seconds, peak summed RSS, peak extra disk."""
    cmd = [sys.executable, "-m", "launch.cli", "data", "prepare", *map(str, args), "--quiet", "--timings"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})  # fmt: skip
    memory = TreeMemory(proc.pid, extra_pids, work)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}\n{err}")
    timings = next((json.loads(line.split(": ", 1)[1]) for line in out.splitlines() if line.startswith("timings:")), {})
    return {
        "wall_s": round(wall, 2),
        "peak_rss_gib": round(memory.peak / GIB, 2),
        "peak_disk_gib": round(memory.disk_peak / GIB, 2),
        "phases_s": timings,
        # Other work on the machine slows a run down: the load it ran under, over its last 15 min.
        "load_avg_1_5_15_min_after": [round(x, 2) for x in os.getloadavg()],
    }


def prepare_events(input_path: Path, out: Path, work: Path, engine: str, extra: list = (), **kw) -> dict:
    args = ["--source", "events", "--input", input_path, "--rating-col", "rating", "--out", out, "--overwrite",
            "--engine", engine, *extra]  # fmt: skip
    result = run_prepare(args, work, **kw)
    manifest = json.loads((out / "manifest.json").read_text())
    events = manifest["counts"]["events"] + manifest["counts"]["dropped"]["duplicates"]
    result |= {
        "events": events,
        "events_per_s": round(events / result["wall_s"]),
        "counts": manifest["counts"],
        "shards": len(manifest["shards"]),
        "shard_gib": round(sum(s["bytes"] for s in manifest["shards"]) / GIB, 2),
        "parts": manifest.get("engine", {}).get("parts") or manifest.get("engine", {}).get("partitions"),
    }
    shutil.rmtree(out)
    return result


def reader_tokens_per_second(directory: Path, max_len: int, max_seconds: float = 60.0) -> dict:
    sys.path.insert(0, str(ROOT))
    from data.loader import LoaderConfig, iterate_epoch, make_loader

    dataset, loader = make_loader(
        directory, LoaderConfig(split="train", batch_size=128, max_len=max_len, num_workers=0)
    )
    tokens = samples = 0
    started = time.perf_counter()
    for batch in iterate_epoch(dataset, loader, epoch=0):
        tokens += int(batch["lengths"].sum())
        samples += int(batch["weights"].sum())
        if time.perf_counter() - started > max_seconds:
            break
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "samples": samples, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}


def section_ml1m(work: Path) -> dict:
    out = work / "ml-1m"
    result = run_prepare(
        ["--source", "sasrec", "--input", ML1M / "sasrec" / "ml-1m.txt",
         "--item-map", ML1M / "sasrec" / "sas_to_original_items.txt", "--items", ML1M / "raw" / "movies.dat",
         "--out", out, "--overwrite"],
        work,
    )  # fmt: skip
    result["counts"] = json.loads((out / "manifest.json").read_text())["counts"]
    result["reader"] = reader_tokens_per_second(out, max_len=200)
    shutil.rmtree(out)
    return result


def _input(work: Path, name: str, users: int, items: int, epu: float, files: int = 1) -> tuple[Path, dict]:
    path = work / (f"{name}.parquet" if files == 1 else name)
    started = time.perf_counter()
    events = write_events(path, users, items, epu, files=files)
    size = sum(p.stat().st_size for p in ([path] if files == 1 else path.iterdir()))
    return path, {
        "users": users, "items": items, "events_per_user": epu, "events": events, "files": files,
        "parquet_gib": round(size / GIB, 2), "written_in_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def section_memory(work: Path, scale: float) -> dict:
    path, shape = _input(work, "events-1e8", int(1e6 * scale), int(1e6 * scale), 100.0)
    try:
        result = prepare_events(path, work / "out-memory", work, "memory")
    finally:
        path.unlink()
    return {"input": shape, **result, "goal_events_per_s": 2_000_000}


def section_duckdb(work: Path, scale: float, memory_limit: str) -> dict:
    users = int(1e7 * scale)
    need = users * 100 * 60 / GIB  # input, parts and shards per event (45 bytes at 10^8), and a margin
    free = shutil.disk_usage(work).free / GIB
    if free < need:
        return {"skipped": f"needs about {need:.0f} GiB free in {work}, has {free:.0f} GiB"}
    path, shape = _input(work, "events-1e9", users, users, 100.0)
    try:
        result = prepare_events(path, work / "out-duckdb", work, "duckdb", ["--memory-limit", memory_limit])
    finally:
        path.unlink()
    return {
        "input": shape, "memory_limit": memory_limit, "free_disk_gib_before": round(free, 1), **result,
        "goals": {"events_per_s": 1_000_000, "peak_rss_gib": 8},
    }  # fmt: skip


def section_spark(work: Path, scale: float) -> dict:
    from data.spark import standalone_cluster

    # Eight part files, as a warehouse table has them: Spark reads one file per task.
    path, shape = _input(work, "events-1e8-parts", int(1e6 * scale), int(1e6 * scale), 100.0, files=8)
    out: dict = {"input": shape}
    # In local mode the executors live in the driver's JVM: give it the memory a cluster's
    # executors would have (Spark's default is 1 GiB).
    local = {"PYSPARK_SUBMIT_ARGS": "--driver-memory 6g pyspark-shell"}
    try:
        out["local[2]"] = prepare_events(
            path, work / "out-spark", work, "spark", ["--spark-master", "local[2]"], env=local
        )
        with standalone_cluster(workers=2, cores=1, memory="3g") as cluster:
            out["standalone, 2 workers x 1 core"] = prepare_events(
                path, work / "out-spark", work, "spark", ["--spark-master", cluster.master],
                extra_pids=cluster.pids, env=cluster.driver_env,
            )  # fmt: skip
    finally:
        shutil.rmtree(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="ml1m,memory,duckdb,spark")
    parser.add_argument("--scale", type=float, default=1.0, help="users and items x this (for a quick try)")
    parser.add_argument("--memory-limit", default="5GB", help="duckdb's --memory-limit")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lmrec-bench-", dir=ROOT / "runs"))
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update(
        machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        date=time.strftime("%Y-%m-%d"),
    )
    sections = {
        "ml1m": lambda: section_ml1m(work) if (ML1M / "sasrec" / "ml-1m.txt").exists() else {"skipped": "no ML-1M"},
        "memory": lambda: section_memory(work, args.scale),
        "duckdb": lambda: section_duckdb(work, args.scale, args.memory_limit),
        "spark": lambda: section_spark(work, args.scale),
    }
    try:
        for name in args.only.split(","):
            print(f"== {name}", flush=True)
            results[name] = sections[name]()
            if args.scale != 1.0:
                results[name]["scale"] = args.scale
            print(json.dumps(results[name], indent=2), flush=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))


def markdown(r: dict) -> str:
    rows = ["| measure | result | goal |", "|---|---|---|"]
    if "wall_s" in r.get("ml1m", {}):
        c = r["ml1m"]["counts"]
        rows.append(f"| ML-1M prepare ({c['users']:,} users, {c['events']:,} events) | {r['ml1m']['wall_s']} s | |")
        rows.append(f"| reader, ML-1M, 1 worker | {r['ml1m']['reader']['tokens_per_s'] / 1e6:.2f} M tokens/s | |")

    def line(name, s, goal_rate="", goal_rss=""):
        if "wall_s" not in s:
            return [f"| {name} | {s.get('skipped', 'not run')} | |"]
        return [
            f"| {name}: {s['events'] / 1e6:,.0f} M events, end to end | {s['events_per_s'] / 1e6:.2f} M events/s "
            f"({s['wall_s']} s) | {goal_rate} |",
            f"| {name}: peak summed RSS / extra disk | {s['peak_rss_gib']} GiB / {s['peak_disk_gib']} GiB | {goal_rss} |",
        ]

    if "memory" in r:
        rows += line("in memory", r["memory"], "≥ 2 M/s")
    if "duckdb" in r:
        rows += line(f"out of core (duckdb, {r['duckdb'].get('memory_limit')})", r["duckdb"], "≥ 1 M/s", "≤ 8 GiB")
    for name, s in r.get("spark", {}).items():
        if name != "input" and isinstance(s, dict):
            rows += line(f"spark {name}", s)
    return "\n".join(rows)


if __name__ == "__main__":
    main()
