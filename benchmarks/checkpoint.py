"""Checkpoint save, load and consolidation cost on 2 CPU ranks.

Two cases: the ML-1M recipe's model (configs/ml-1m.yaml, after a few training steps), and a
10 M-row x 64 item table sharded row-wise over 2 ranks beside the same small dense model. For
each: save time, size on disk, load time at the same topology (DeepSpeed's checkpoint) and
converted (the per-parameter dense state, as when resharding). For the large table, also
``lmrec checkpoint consolidate``'s time and peak memory (it streams the table in row blocks).
Writes benchmarks/results/checkpoint.json.

    python benchmarks/checkpoint.py [--rows 10000000] [--shards runs/ml-1m/shards]
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


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def _measure(manager, state) -> dict:
    """Two saves (steps N and N+1); checksum verification (what --resume does first); a
    same-topology load and a converted load (files in the page cache: a warm read)."""
    from train.checkpoint import verify

    saves = []
    for _ in range(2):
        state.step += 1
        seconds, path = _timed(lambda: manager.save(state.step))
        saves.append(seconds)
    verify_seconds, saved = _timed(lambda: verify(path, manager.rank, manager.world_size))

    def load(convert: bool) -> None:
        manager.dense.load(path, saved, convert=convert)
        manager.tables.load(path, saved["format_version"])

    load_same, _ = _timed(lambda: load(False))
    load_converted, _ = _timed(lambda: load(True))
    return {
        "checkpoint": path.name,
        "bytes": _size(path),
        "save_seconds": [round(s, 3) for s in saves],
        "verify_seconds": round(verify_seconds, 3),
        "load_same_topology_seconds": round(load_same, 3),
        "load_converted_seconds": round(load_converted, 3),
    }


def worker_ml1m(shards: str, out: str) -> dict:
    from data.loader import iterate_epoch
    from train.config import load_config
    from train.distributed import compute_init
    from train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "ml-1m.yaml", [f"data.shards={shards}", f"output.dir={out}"])
    env = compute_init(seed=0)
    trainer = Trainer(cfg, env)
    for i, batch in enumerate(iterate_epoch(trainer.train_data, trainer.train_loader, epoch=0)):
        trainer.train_step(batch)
        trainer.state.batch += 1
        if i == 2:
            break
    result = _measure(trainer.checkpointer, trainer.state)
    result |= {"items": trainer.num_items, "dense_parameters": sum(x.numel() for x in trainer.model.parameters())}
    return result


def worker_table(rows: int, dim: int, out: str) -> dict:
    import deepspeed
    import torch

    from model.config import ModelConfig, RecommenderConfig
    from model.items import ID_TABLE, TableSpec
    from model.modeling import SequenceRecommender
    from train.checkpoint import CheckpointManager, DenseState, TableState
    from train.config import Config, DataConfig
    from train.distributed import compute_init
    from train.embeddings import ItemEmbeddings
    from train.policy import TrainState

    cfg = Config(data=DataConfig(shards="synthetic"), model=ModelConfig(hidden_size=dim))
    env = compute_init(seed=0)
    started = time.perf_counter()
    items = ItemEmbeddings([TableSpec(ID_TABLE, rows, dim)], env, "row_wise", "rowwise_adagrad", 0.05, 0)
    build_seconds = time.perf_counter() - started
    vocab = {"items": rows, "actions": 0, "gaps": 0}
    model = SequenceRecommender(RecommenderConfig.build(cfg.model, vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg.deepspeed_config()
    )
    # One real step, so that both optimizers hold state.
    ids = torch.randint(2, rows, (8, 20))
    vectors = items.lookup(ID_TABLE, ids.reshape(-1)).reshape(8, 20, dim)
    hidden = engine(vectors, torch.full((8,), 20), None, None)
    loss = hidden.pow(2).mean()
    engine.backward(loss)
    engine.step()
    state = TrainState()
    manager = CheckpointManager(
        Path(out) / "checkpoints",
        keep=1,
        dense=DenseState(engine, model, cfg.parallel.zero_stage),
        tables=TableState(items),
        data=_NoData(state),
        states={"progress": state},
        describe={"config": cfg.to_dict(), "vocab": vocab, "precision": "fp32", "sharding": "row_wise"},
        rank=env.rank,
        world_size=env.world_size,
        seed=0,
    )
    result = _measure(manager, state)
    return result | {
        "rows": rows,
        "dim": dim,
        "table_bytes_fp32": rows * dim * 4,
        "table_build_seconds": round(build_seconds, 1),
    }


class _NoData:
    """No data stream: the table case checkpoints tables and weights only."""

    signature: dict = {}

    def __init__(self, progress):
        self.progress = progress

    def state_dict(self) -> dict:
        return {}


def worker_consolidate(checkpoint: str, out: str) -> dict:
    from train.saved_model import consolidate

    seconds, _ = _timed(lambda: consolidate(Path(checkpoint), Path(out), log=lambda _: None))
    return {
        "seconds": round(seconds, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "output_bytes": _size(Path(out)),
    }


def _torchrun(case: list[str], work: Path) -> dict:
    result_file = work / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29737", __file__]
    cmd += ["--worker", *case, "--result", str(result_file)]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(result_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", default=str(ROOT / "runs" / "ml-1m" / "shards"))
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-checkpoint"))
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        from train.distributed import compute_cleanup

        kind, *rest = args.worker
        if kind == "ml1m":
            result = worker_ml1m(*rest)
        elif kind == "table":
            result = worker_table(int(rest[0]), int(rest[1]), rest[2])
        else:
            result = worker_consolidate(*rest)
        compute_cleanup()  # a rank exiting with live gloo threads can abort
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(result))
        return

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = {"machine": f"{os.cpu_count()} CPU cores, 2 ranks (gloo)"}
    if (Path(args.shards) / "manifest.json").exists():
        results["ml1m"] = _torchrun(["ml1m", args.shards, str(work / "ml1m")], work)
        print(json.dumps(results["ml1m"], indent=1))
    else:
        print(f"skipping the ML-1M case: no shards at {args.shards} (see benchmarks/train_ml1m.py)")
    table = _torchrun(["table", str(args.rows), str(args.dim), str(work / "table")], work)
    print(json.dumps(table, indent=1))
    subprocess.run(
        [sys.executable, __file__, "--worker", "consolidate", str(work / "table" / "checkpoints" / table["checkpoint"]), str(work / "consolidated"),
         "--result", str(work / "consolidate.json")],
        check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    table["consolidate"] = json.loads((work / "consolidate.json").read_text())
    results["table"] = table
    print(json.dumps(table["consolidate"], indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint.json").write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
