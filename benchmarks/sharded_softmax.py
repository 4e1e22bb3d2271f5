"""The full softmax's cost per step as the catalog grows, on 2 CPU ranks: ``full`` (every rank
looks up the whole table and scores its positions against it) beside ``full_sharded`` (each rank
scores every rank's positions against the rows it owns, block by block; train/objectives).

Each case is a fresh pair of processes (1 thread each): a row-wise sharded ID table (TorchRec,
fused SGD) and a fixed set of hidden states per rank, then the loss forward + backward (with the
table update) a few times. Reported per rank: the median step time, the peak resident memory
above what the process held before the first step, and the step's matmul FLOPs against this
machine's measured single-thread matmul peak on the same shapes. Writes
benchmarks/results/sharded_softmax.json.

    python benchmarks/sharded_softmax.py [--positions 1024] [--dim 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

# full's logits alone are positions x rows x 4 bytes per rank (x3 with the softmax's copies):
# beyond a few 10^5 rows it does not fit this box's 24 GiB on 2 ranks.
# sampled (what loss.main=auto picks above 2^20 items): 1,024 uniform + 1,024 in-batch negatives.
CASES = [("full", 100_000), ("full", 300_000), ("full_sharded", 100_000), ("full_sharded", 300_000),
         ("full_sharded", 1_000_000), ("full_sharded", 10_000_000), ("sampled", 1_000_000),
         ("sampled", 10_000_000), ("sampled", 30_000_000)]  # fmt: skip


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _matmul_peak(m: int, k: int, n: int) -> float:
    """FLOP/s of one (m, k) @ (k, n) float32 matmul, the best of several, on one thread."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * m * k * n / best


def _rank(rank: int, objective: str, rows: int, positions: int, dim: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    import torch
    import torch.distributed as dist

    from model.config import ModelConfig, RecommenderConfig
    from model.items import ID_TABLE, ItemCatalog, TableSpec
    from model.modeling import SequenceRecommender
    from train.config import LossConfig
    from train.distributed import compute_cleanup, compute_init
    from train.embeddings import ItemEmbeddings
    from train.objectives import REGISTRY, ObjectiveContext, StepBatch, StepItems

    torch.set_num_threads(1)
    env = compute_init(seed=0)
    tables = ItemEmbeddings([TableSpec(ID_TABLE, rows, dim)], env, "row_wise", "sgd", 0.01, seed=3)
    cfg = ModelConfig(hidden_size=dim, num_layers=1, num_heads=2, max_len=10)
    model = SequenceRecommender(RecommenderConfig.build(cfg, {"items": rows, "actions": 0, "gaps": 0}))
    counts = torch.ones(rows, dtype=torch.float64)
    ctx = ObjectiveContext(
        LossConfig(main=objective), model, tables, ItemCatalog(counts), torch.zeros(0), rows, env.device,
        dist.group.WORLD,
    )  # fmt: skip
    loss_fn = REGISTRY[objective](ctx)
    g = torch.Generator().manual_seed(rank)
    hidden = torch.randn(positions, dim, generator=g)
    targets = torch.randint(2, rows, (positions,), generator=g)
    weights = torch.ones(positions)
    step = StepBatch(None, None, None, targets, weights, weights.sum(), None)
    before = _rss_bytes()
    times = []
    for _ in range(3):
        dist.barrier()
        started = time.perf_counter()
        h = hidden.clone().requires_grad_()
        sampled = loss_fn.sample(step)
        ids = (
            torch.arange(rows)
            if loss_fn.needs_all_items
            else torch.unique(torch.cat([targets, *[sampled][: sampled is not None]]))
        )
        items = StepItems(tables.lookup(ID_TABLE, ids), None if loss_fn.needs_all_items else ids)
        loss_fn(step, h, items, sampled).backward()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    owned = tables.owned_rows(ID_TABLE)
    scored_rows = {"full": rows, "full_sharded": owned[1] - owned[0]}.get(objective) or len(sampled)
    scored_positions = 2 * positions if objective == "full_sharded" else positions
    # full, sampled: one (positions x rows) matmul forward, two backward. full_sharded: one
    # forward, the block's recomputation and two products backward.
    matmuls = 4 if objective == "full_sharded" else 3
    flops = matmuls * 2 * scored_positions * scored_rows * dim
    peak_flops = _matmul_peak(scored_positions, dim, min(scored_rows, 8192))
    result = {
        "step_s": statistics.median(times[1:]),
        "rss_before_step_bytes": before,
        "peak_rss_bytes": peak,
        "step_peak_above_before_bytes": max(0, peak - before),
        "owned_rows": list(owned),
        "table_shard_bytes": (owned[1] - owned[0]) * dim * 4,
        "matmul_flops_per_step": flops,
        "matmul_peak_flops_1_thread": peak_flops,
        "fraction_of_matmul_peak": flops / statistics.median(times[1:]) / peak_flops,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    compute_cleanup()


def _case(objective: str, rows: int, positions: int, dim: int, out: Path) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank, args=(objective, rows, positions, dim, port, str(out)), nprocs=2)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=1024, help="hidden states per rank per step")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--case", nargs=2, metavar=("OBJECTIVE", "ROWS"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "sharded-softmax")
    args = parser.parse_args()
    if args.case:  # one case in this process (its peak memory is its own)
        objective, rows = args.case[0], int(args.case[1])
        ranks = _case(objective, rows, args.positions, args.dim, args.work / f"{objective}-{rows}")
        print(json.dumps(ranks))
        return
    results = []
    for objective, rows in CASES:
        done = subprocess.run(
            [sys.executable, __file__, "--case", objective, str(rows), "--positions", str(args.positions),
             "--dim", str(args.dim), "--work", str(args.work)],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        if done.returncode != 0:
            # A case that does not fit is a result too (the kernel's SIGKILL is the out-of-memory killer).
            killed = "SIGKILL" in done.stderr
            reason = "killed (out of memory)" if killed else done.stderr.strip().splitlines()[-1]
            print(f"{objective:13s} {rows:>11,} rows: failed: {reason}", flush=True)
            results.append({"objective": objective, "rows": rows, "failed": reason})
            continue
        ranks = json.loads(done.stdout.strip().splitlines()[-1])
        results.append({"objective": objective, "rows": rows, "ranks": ranks})
        worst = max(ranks, key=lambda r: r["step_s"])
        print(
            f"{objective:13s} {rows:>11,} rows: step {worst['step_s']:.3f} s, "
            f"peak above start {worst['step_peak_above_before_bytes'] / 2**20:,.0f} MiB "
            f"(shard {worst['table_shard_bytes'] / 2**20:,.0f} MiB), "
            f"{worst['fraction_of_matmul_peak']:.0%} of the matmul peak",
            flush=True,
        )
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "command": f"python benchmarks/sharded_softmax.py --positions {args.positions} --dim {args.dim}",
        "positions_per_rank": args.positions,
        "dim": args.dim,
        "cases": results,
    }
    (RESULTS / "sharded_softmax.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
