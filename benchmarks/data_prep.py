"""Data preparation and reading speed.

Measures, each in a fresh process through the real ``lmrec`` command line:
- ML-1M (SASRec file from ../shared) -> shards: wall time;
- synthetic data of fixed shape (default 1 M users x 100 events on average, 1 M items) -> shards:
  events/s end to end (process start, generation, preparation) and peak resident memory;
- the shard reader: tokens/s of one dataloader worker (one process, no worker subprocesses).

Writes benchmarks/results/data_prep.json and prints a Markdown table.

    python benchmarks/data_prep.py [--users 1000000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML1M = ROOT.parent / "shared" / "datasets" / "ml-1m"
RESULTS = ROOT / "benchmarks" / "results" / "data_prep.json"


def run_lmrec(*args) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in GiB (of that child alone) and stdout of one lmrec command."""
    code = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "done = subprocess.run([sys.executable, '-m', 'launch.cli', *sys.argv[1:]], capture_output=True, text=True)\n"
        "wall = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20\n"
        "print(done.stdout); print(done.stderr, file=sys.stderr)\n"
        "print(f'@@ {wall} {peak} {done.returncode}')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    wall, peak, rc = re.search(r"@@ (\S+) (\S+) (\S+)", done.stdout).groups()
    if int(rc) != 0:
        raise SystemExit(f"lmrec {' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}")
    return float(wall), float(peak), done.stdout


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--events-per-user", type=float, default=100.0)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lmrec-bench-"))
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }

    if (ML1M / "sasrec" / "ml-1m.txt").exists():
        out = work / "ml-1m"
        wall, peak, stdout = run_lmrec(
            "data", "prepare", "--source", "sasrec", "--input", ML1M / "sasrec" / "ml-1m.txt",
            "--item-map", ML1M / "sasrec" / "sas_to_original_items.txt", "--items", ML1M / "raw" / "movies.dat",
            "--out", out, "--overwrite", "--quiet",
        )  # fmt: skip
        manifest = json.loads((out / "manifest.json").read_text())
        results["ml1m_prepare"] = {
            "wall_s": round(wall, 2),
            "peak_rss_gib": round(peak, 2),
            "counts": manifest["counts"],
        }
        results["ml1m_reader"] = reader_tokens_per_second(out, max_len=200)
        print(stdout)

    out = work / "synthetic"
    wall, peak, stdout = run_lmrec(
        "data", "prepare", "--source", "synthetic", "--users", args.users, "--num-items", args.items,
        "--events-per-user", args.events_per_user, "--out", out, "--overwrite", "--quiet", "--timings",
    )  # fmt: skip
    print(stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    events = manifest["counts"]["events"]
    phases = json.loads(re.search(r"timings: (\{.*\})", stdout).group(1))
    results["synthetic_prepare"] = {
        "shape": {"users": args.users, "items": args.items, "events_per_user": args.events_per_user},
        "events": events,
        "wall_s": round(wall, 2),
        "events_per_s_end_to_end": round(events / wall),
        "events_per_s_prepare_only": round(events / sum(v for k, v in phases.items() if k != "read")),
        "peak_rss_gib": round(peak, 2),
        "phases_s": phases,
        "shard_bytes": sum(s["bytes"] for s in manifest["shards"]),
        "goals": {"events_per_s": 1_000_000, "peak_rss_gib": 8},
    }
    results["synthetic_reader"] = reader_tokens_per_second(out, max_len=200)
    results["goals"] = {"reader_tokens_per_s_per_worker": 2_000_000}

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(r: dict) -> str:
    rows = ["| measure | result | goal |", "|---|---|---|"]
    if "ml1m_prepare" in r:
        c = r["ml1m_prepare"]["counts"]
        rows.append(
            f"| ML-1M prepare ({c['users']:,} users, {c['items']:,} items, {c['events']:,} events) | {r['ml1m_prepare']['wall_s']} s | |"
        )
        rows.append(f"| reader, ML-1M, 1 worker | {r['ml1m_reader']['tokens_per_s'] / 1e6:.2f} M tokens/s | ≥ 2 M |")
    s = r["synthetic_prepare"]
    rows.append(
        f"| synthetic {s['events'] / 1e6:.0f} M events -> shards, end to end | {s['events_per_s_end_to_end'] / 1e6:.2f} M events/s ({s['wall_s']} s) | ≥ 1 M |"
    )
    rows.append(f"| same, peak memory | {s['peak_rss_gib']} GiB | ≤ 8 GiB |")
    rows.append(
        f"| reader, synthetic, 1 worker | {r['synthetic_reader']['tokens_per_s'] / 1e6:.2f} M tokens/s | ≥ 2 M |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
