"""Training with catalogs of 10^7 and 10^8 items on 2 CPU ranks, the item table row-wise sharded.

For each catalog size: synthetic events in which every item occurs (once, or twice for a few: the
vocabulary has exactly that many items; each user has 20 to 80 events, items shuffled) go
through ``lmrec data prepare``'s code into real shards; then 2 ranks under torchrun build the
Trainer from configs/ml-1m.yaml (hidden 64, 2 layers) with the sampled softmax and mixed
negatives (what ``loss.main: auto`` picks above 1,048,576 items) and run:

- training steps: step time and real (non-padding) tokens/s after warm-up steps;
- a checkpoint save, its verification, and a resume into the same Trainer (what ``--resume``
  does), each timed;
- an evaluation of a fixed sample of about 500 test users (``eval.user_fraction``) against the
  whole catalog (the sharded block sweep of train.evaluate);
- per-rank proportional set size (PSS, /proc/self/smaps_rollup) after training, after the
  resume and at the end, and the peak RSS.

At 10^8 items the table is fp16 (``parallel.table_dtype=fp16``). Each size is run beside the
same run on a tiny catalog (10^4 items, the same users, events and objective): its tokens/s are
the peer for the step's cost, and the memory goal compares each rank's PSS with its:
the excess must stay within 1.3x the rank's shard bytes (its rows in the table's dtype plus the
row-wise Adagrad state, one fp32 per row). The items are a systems workload, not a quality
benchmark: items occur about once, so there is nothing to learn. Files are removed afterwards.
Writes benchmarks/results/catalog_scale.json.

    python benchmarks/catalog_scale.py [--items 10000000 100000000] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

TINY_ITEMS = 10_000
SAMPLED_USERS = 500
MIN_EVENTS, MAX_EVENTS = 20, 80


def _users_for(items: int) -> int:
    """Users whose events (50 on average) cover every item once."""
    return max(1, items // ((MIN_EVENTS + MAX_EVENTS) // 2))


def prepare_shards(out: Path, items: int, users: int, seed: int = 0) -> dict:
    """Events for ``users`` users in which every one of ``items`` items occurs: a shuffled
    range of event ids taken modulo ``items``."""
    import numpy as np
    import polars as pl

    from data.prepare import PrepareConfig, prepare
    from data.readers import RawData

    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_EVENTS, MAX_EVENTS + 1, size=users)
    total = int(lengths.sum())
    if total < items:  # the last user takes the items no one else drew
        lengths[-1] += items - total
        total = items
    order = rng.permutation(max(items, total))[:total] % items
    user = np.repeat(np.arange(1, users + 1, dtype=np.int32), lengths)
    starts = np.cumsum(lengths) - lengths
    ts = 1_600_000_000 + np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    events = pl.DataFrame({"user": user, "item": (order + 1).astype(np.int32), "ts": ts})
    del order, user, ts
    started = time.perf_counter()
    prepare(RawData(events), PrepareConfig(out=out, progress=False), {"name": f"synthetic, {items:,} items"})
    return {"events": total, "users": users, "prepare_seconds": round(time.perf_counter() - started, 1)}


def _pss_bytes() -> dict:
    """PSS, and its anonymous (heap) and file-backed parts."""
    wanted = {"Pss:": "pss", "Pss_Anon:": "anon", "Pss_File:": "file"}
    found = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key = line.split()[0]
        if key in wanted:
            found[wanted[key]] = int(line.split()[1]) * 1024
    return found


def worker(shards: str, out: str, table_dtype: str, steps: int, warmup: int, users: int) -> dict:
    import torch
    import torch.distributed as dist

    from data.loader import iterate_epoch
    from model.items import ID_TABLE
    from train.checkpoint import verify
    from train.config import load_config
    from train.distributed import compute_init
    from train.trainer import Trainer

    fraction = min(1.0, SAMPLED_USERS / users)
    # sampled, what loss.main auto picks at these sizes, for the tiny catalog too: the two runs
    # then differ in the table alone.
    overrides = [f"data.shards={shards}", f"output.dir={out}", f"parallel.table_dtype={table_dtype}",
                 f"eval.user_fraction={fraction}", "loss.main=sampled", "schedule.log_every=1000000"]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "ml-1m.yaml", overrides)
    env = compute_init(seed=0)
    started = time.perf_counter()
    trainer = Trainer(cfg, env)
    build_seconds = time.perf_counter() - started
    memory = {"after_build": _pss_bytes()}

    times, tokens = [], 0
    batches = iterate_epoch(trainer.train_data, trainer.train_loader, epoch=0)
    for i, batch in zip(range(warmup + steps), batches):
        dist.barrier()
        started = time.perf_counter()
        trainer.train_step(batch)
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - started)
            tokens += int((batch["lengths"] - 1).clamp(min=0)[batch["weights"] > 0].sum())
        trainer.state.batch += 1
    memory["after_training"] = _pss_bytes()
    real_tokens = torch.tensor([tokens], dtype=torch.float64)
    dist.all_reduce(real_tokens)

    def timed(fn):
        dist.barrier()
        started = time.perf_counter()
        value = fn()
        dist.barrier()
        return time.perf_counter() - started, value

    save_seconds, path = timed(trainer.save_checkpoint)
    verify_seconds, _ = timed(lambda: verify(path, env.rank, env.world_size))
    resume_seconds, _ = timed(lambda: trainer.resume(str(path)))
    memory["after_resume"] = _pss_bytes()
    eval_seconds, test = timed(lambda: trainer.evaluate("test"))
    memory["end"] = _pss_bytes()

    first, last = trainer.tables.owned_rows(ID_TABLE)
    row_bytes = cfg.model.hidden_size * (2 if table_dtype == "fp16" else 4)
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, memory)
    return {
        "items": trainer.num_items,
        "table_dtype": table_dtype,
        "loss": cfg.loss.main,
        "batch_size_per_rank": cfg.data.batch_size,
        "trainer_build_seconds": round(build_seconds, 1),
        "step_seconds_median": round(sorted(times)[len(times) // 2], 4),
        "real_tokens_per_second": round(float(real_tokens) / sum(times), 1),
        "checkpoint": {
            "bytes": sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()),
            "save_seconds": round(save_seconds, 1),
            "verify_seconds": round(verify_seconds, 1),
            "resume_seconds": round(resume_seconds, 1),
        },
        "evaluation": {
            "seconds": round(eval_seconds, 1),
            "user_fraction": fraction,
            "users": test["model"]["users"],
            "NDCG@10": round(test["model"]["NDCG@10"], 5),
        },
        "rank0_rows": last - first,
        "rank0_shard_bytes": (last - first) * (row_bytes + 4),  # rows + row-wise Adagrad state (fp32)
        "pss_bytes_per_rank": {k: [rank[k]["pss"] for rank in everyone] for k in memory},
        "pss_anon_file_bytes_per_rank": {k: [(rank[k]["anon"], rank[k]["file"]) for rank in everyone] for k in memory},
        "rank0_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _torchrun(args: list[str], result: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29741", __file__]
    subprocess.run([*cmd, "--worker", *args, "--result", str(result)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    return json.loads(result.read_text())


def _prepare_in_child(out: Path, items: int, users: int) -> dict:
    """In its own process, so that preparation's memory is not the benchmark's."""
    result = out.with_suffix(".json")
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks.catalog_scale import prepare_shards; "
        "from pathlib import Path; "
        "Path(sys.argv[5]).write_text(json.dumps(prepare_shards(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))"
    )
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(out), str(items), str(users), str(result)], check=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[10_000_000, 100_000_000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--fp16-from", type=int, default=50_000_000, help="fp16 tables from this many items on")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-catalog"))
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        from train.distributed import compute_cleanup

        shards, out, dtype, steps, warmup, users = args.worker
        result = worker(shards, out, dtype, int(steps), int(warmup), int(users))
        compute_cleanup()
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(result))
        return

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    free = shutil.disk_usage(work).free
    results = {"machine": f"{os.cpu_count()} CPU cores, 2 ranks (gloo)", "disk_free_bytes_at_start": free, "runs": []}
    try:
        for items in sorted(args.items):
            dtype = "fp16" if items >= args.fp16_from else "fp32"
            users = _users_for(items)
            for name, catalog in ((f"tiny-{items}", TINY_ITEMS), (f"items-{items}", items)):
                shards = work / name / "shards"
                data = _prepare_in_child(shards, catalog, users)
                run = _torchrun([str(shards), str(work / name / "run"), dtype, str(args.steps), str(args.warmup),
                                 str(users)], work / f"{name}.json")  # fmt: skip
                run["data"] = data
                shutil.rmtree(work / name, ignore_errors=True)
                print(json.dumps(run, indent=1), flush=True)
                if catalog == TINY_ITEMS:
                    tiny = run
                    continue
                excess = [
                    big - small
                    for big, small in zip(run["pss_bytes_per_rank"]["after_training"], tiny["pss_bytes_per_rank"]["after_training"])
                ]  # fmt: skip
                run["tiny_catalog_run"] = {
                    k: tiny[k] for k in ("items", "pss_bytes_per_rank", "real_tokens_per_second")
                }
                run["tokens_per_second_vs_tiny"] = round(
                    run["real_tokens_per_second"] / tiny["real_tokens_per_second"], 3
                )
                run["pss_excess_over_tiny_per_rank"] = excess
                run["pss_excess_over_shard_bytes"] = round(max(excess) / run["rank0_shard_bytes"], 3)
                results["runs"].append(run)
                RESULTS.mkdir(parents=True, exist_ok=True)
                (RESULTS / "catalog_scale.json").write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
