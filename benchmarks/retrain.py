"""The daily retrain: continuing yesterday's model against training from scratch on the union.

Two logs with timestamps: MovieLens-100k (the RecBole wheel's ml-100k.inter) and synthetic data
whose popularity drifts (``SyntheticSpec(drift=1.0)``: late events draw their popularity from
another order of the items, so the new day brings items and tastes day 1 never saw).

Protocol, the same for both:

- **Day 1** is the events before the 80 % quantile of the log's event times, trained from scratch
  with the recipe below until validation stops improving.
- **Day 2** is the union, every event, prepared with ``--vocab-from`` day 1 (new items appended).
- Both days' shards hold out each user's last two events for validation and test
  (leave-one-out): ML-100k's timestamps come in bursts (users rate dozens of films in one
  sitting), and a split at global time quantiles leaves 29 validation and 83 test users, too few to
  stop on or compare with. So the union's test targets are each user's last event: for the users
  active after the cut, an event day 1 never saw; for the others, the one day 1 held out too.
- The arms train on day 2's shards with the same recipe, one after the other, 2 ranks each:
  **scratch**, from the initialiser; **continue**, ``--init-from`` day 1's best checkpoint (known
  items' rows and their row-wise Adagrad state; new rows from the initialiser; the dense
  optimizer and the learning-rate schedule restart with their warm-up).

Why the union and not day 2's new events alone: a sequence model's examples are user histories,
and a new event means something only after the history before it, which the union's samples
carry; continuing saves steps, not data per epoch. (Training on the new windows alone would also
forget what only the old events teach, and would need a way to cut histories into "new" targets
that the shard format does not have.)

Figures: test NDCG@10 of each arm, with the paired bootstrap interval of the difference over the
test users; the steps and training seconds (optimizer steps and data waits, evaluations
excluded) each arm needed to reach scratch's quality, read from the per-epoch evaluations;
their ratio is the speed-up. Scratch's quality is the best of its validation NDCG@10 averaged over
3 consecutive epochs (an arm reaches it at the last epoch of the first 3 whose mean does): a
single epoch's value is noisy (943 ML-100k users give a standard error near 0.008 on a value near
0.11), and the best single epoch is partly luck. The single-epoch mark is reported too. Day 1's own training is listed for context:
it was paid the day before.

Recipe: configs/ml-100k.yaml without the item-text parts (an ID model: the rows are what carries
over), evaluated every epoch, patience 5, at most 30 epochs (ML-100k) or 12 (synthetic).

    python benchmarks/retrain.py [--work runs/retrain] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ["model.item_text=false", "model.item_text_tokens=false", "schedule.eval_every=1", "schedule.patience=5",
          "schedule.log_every=1000", "data.num_workers=1", "eval.bootstrap_samples=200"]  # fmt: skip
MARKS = {"mean of 3 epochs": 3, "single epoch": 1}  # validation NDCG@10 averaged over this many evaluations
DAY1_CUT = 0.8  # day 1: events before this quantile of the log's times
DATASETS = {
    "ml-100k": {"epochs": 30, "what": "MovieLens-100k (ml-100k.inter, ratings as actions)"},
    "synthetic-drift": {
        "epochs": 12,
        "what": "synthetic, 4,000 users x 5,000 items, 30 events per user, popularity drift 1.0",
    },
}


def lmrec(*args) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *map(str, args)]


def events(name: str) -> pl.DataFrame:
    """The log as (user, item, ts, rating)."""
    if name == "ml-100k":
        from data.readers import fetch_ml100k

        inter = fetch_ml100k(ROOT / ".cache") / "ml-100k.inter"
        raw = pl.read_csv(inter, separator="\t")
        return raw.select(
            pl.col("user_id:token").alias("user"),
            pl.col("item_id:token").alias("item"),
            pl.col("timestamp:float").cast(pl.Int64).alias("ts"),
            pl.col("rating:float").cast(pl.Int64).alias("rating"),
        )
    from data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(users=4_000, items=5_000, events_per_user=30, text=False, drift=1.0, seed=0)
    return generate(spec).events.rename({"action": "rating"}).with_columns(pl.col("rating").cast(pl.Int64))


def prepare(name: str, work: Path) -> tuple[Path, Path, dict]:
    """Day 1's shards and the union's (--vocab-from day 1), and what they hold."""
    log = events(name)
    cut = float(np.quantile(log["ts"].to_numpy(), DAY1_CUT))
    day1, union = work / "shards-day1", work / "shards-union"
    files = {day1: log.filter(pl.col("ts") < cut), union: log}
    for shards, frame in files.items():
        if (shards / "manifest.json").exists():
            continue
        source = work / f"{shards.name}.parquet"
        frame.write_parquet(source)
        extra = ["--vocab-from", day1] if shards == union else []
        subprocess.run(
            lmrec("data", "prepare", "--source", "events", "--input", source, "--user-col", "user", "--item-col",
                  "item", "--time-col", "ts", "--rating-col", "rating", "--out", shards, "--quiet", *extra),
            check=True, cwd=ROOT,
        )  # fmt: skip
    manifests = {s: json.loads((s / "manifest.json").read_text()) for s in files}
    facts = {
        "events": {"day1": files[day1].height, "union": log.height},
        "items": {"day1": manifests[day1]["vocab"]["items"] - 2, "union": manifests[union]["vocab"]["items"] - 2},
        "users": {"day1": manifests[day1]["counts"]["users"], "union": manifests[union]["counts"]["users"]},
        "union_events_per_segment": manifests[union]["counts"]["events_per_segment"],
        "test_users": manifests[union]["counts"]["samples_per_split"]["test"],
    }
    return day1, union, facts


def train(shards: Path, out: Path, epochs: int, reuse: bool, init_from: Path | None = None) -> dict:
    """`lmrec train` on 2 ranks under torchrun; its metrics.json, with the process's wall time."""
    if reuse and (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "launch.cli", "train", "--config", "configs/ml-100k.yaml"]  # fmt: skip
    for o in [*RECIPE, f"schedule.epochs={epochs}", f"data.shards={shards}", f"output.dir={out}"]:
        command += ["--set", o]
    if init_from is not None:
        command += ["--init-from", str(init_from)]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"training {out} failed; see {out.parent / f'{out.name}.log'}")
    summary = json.loads((out / "metrics.json").read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def best_checkpoint(run: Path) -> Path:
    """The checkpoint holding the run's best validation weights (what its best/ model is)."""
    root = run / "checkpoints"
    latest = json.loads((root / (root / "latest").read_text().strip() / "meta.json").read_text())
    return root / f"step_{latest['progress']['best_step']:09d}"


def curve(summary: dict, window: int) -> list[tuple[float, dict]]:
    """(mean validation NDCG@10 of an evaluation and the ``window - 1`` before it, that evaluation)."""
    values = [h["valid"]["model"]["NDCG@10"] for h in summary["history"]]
    return [
        (float(np.mean(values[i + 1 - window : i + 1])), h) for i, h in enumerate(summary["history"]) if i + 1 >= window
    ]


def reached(summary: dict, target: float, window: int) -> dict | None:
    """The first evaluation at which the ``window``-evaluation mean reached ``target``."""
    for value, h in curve(summary, window):
        if value >= target:
            return {"epoch": h["epoch"] + 1, "step": h["step"], "training_seconds": h["training_seconds"]}
    return None


def per_user_ndcg(run: Path) -> tuple[np.ndarray, np.ndarray]:
    ranks = dict(np.load(run / "test_ranks.npz"))
    order = np.argsort(ranks["users"])
    r = ranks["ranks"][order].astype(np.float64)
    return ranks["users"][order], np.where(r < 10, 1 / np.log2(r + 2), 0.0)


def arm_summary(summary: dict, targets: dict) -> dict:
    test = summary["test"]["model"]
    return {
        "test_ndcg10": test["NDCG@10"],
        "test_ndcg10_ci95": summary["test"]["model_ndcg10_ci"],
        "test_hr10": test["HR@10"],
        "test_users": test["users"],
        "best_valid_ndcg10": summary["best_valid_ndcg10"],
        "valid_ndcg10_per_epoch": [round(h["valid"]["model"]["NDCG@10"], 4) for h in summary["history"]],
        "steps": summary["steps"],
        "training_seconds": summary["training_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "reached": {mark: reached(summary, targets[mark], MARKS[mark]) for mark in MARKS},
    }


def run_dataset(name: str, work: Path, reuse: bool) -> dict:
    from metrics import paired_bootstrap

    work.mkdir(parents=True, exist_ok=True)
    epochs = DATASETS[name]["epochs"]
    day1_shards, union, facts = prepare(name, work)
    day1 = train(day1_shards, work / "day1", epochs, reuse)
    scratch = train(union, work / "scratch", epochs, reuse)
    source = best_checkpoint(work / "day1")
    cont = train(union, work / "continue", epochs, reuse, init_from=source)
    users_a, a = per_user_ndcg(work / "scratch")
    users_b, b = per_user_ndcg(work / "continue")
    assert np.array_equal(users_a, users_b), "the arms scored different users"
    diff, low, high = paired_bootstrap(a, b, samples=1000)
    targets = {mark: max(value for value, _ in curve(scratch, window)) for mark, window in MARKS.items()}
    arms = {"scratch": arm_summary(scratch, targets), "continue": arm_summary(cont, targets)}
    speedup = {}
    for mark, at in arms["continue"]["reached"].items():
        ref = arms["scratch"]["reached"][mark]
        speedup[mark] = (
            {"training_seconds": ref["training_seconds"] / at["training_seconds"], "steps": ref["step"] / at["step"]}
            if at
            else None
        )
    return {
        "data": DATASETS[name]["what"],
        "facts": facts,
        "day1": {
            "steps": day1["steps"],
            "training_seconds": day1["training_seconds"],
            "wall_seconds": day1["wall_seconds"],
            "best_valid_ndcg10": day1["best_valid_ndcg10"],
            "continued_from": str(source.relative_to(work)),
        },
        "scratch_quality_valid_ndcg10": targets,
        "arms": arms,
        "test_ndcg10_continue_minus_scratch": {"diff": diff, "ci95": [low, high]},
        "speedup_to_scratch_quality": speedup,
    }


def table(results: dict) -> str:
    marks = list(MARKS)
    lines = [
        "| data | arm | test NDCG@10 (continue − scratch, 95 % interval) | "
        + " | ".join(f"reached scratch's best valid NDCG@10 ({m})" for m in marks)
        + " | trained until early stop | wall |",
        "|---" * (5 + len(marks)) + "|",
    ]

    def when(at: dict | None) -> str:
        return f"epoch {at['epoch']}: {at['step']} steps, {at['training_seconds']:.1f} s" if at else "not reached"

    for name, r in results["datasets"].items():
        d1 = r["day1"]
        lines.append(
            f"| {name} | day 1: events before the 80 % time quantile, from scratch | | "
            + " | " * (len(marks) - 1)
            + f" | {d1['steps']} steps, {d1['training_seconds']:.1f} s | {d1['wall_seconds']:.0f} s |"
        )
        for arm, a in r["arms"].items():
            test = f"{a['test_ndcg10']:.4f}"
            if arm == "continue":
                c = r["test_ndcg10_continue_minus_scratch"]
                test += f" ({c['diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}])"
            reached_at = " | ".join(when(a["reached"][m]) for m in marks)
            lines.append(
                f"| {name} | {arm}, on the union | {test} | {reached_at} | {a['steps']} steps, "
                f"{a['training_seconds']:.1f} s | {a['wall_seconds']:.0f} s |"
            )
        ratios = " | ".join(
            f"**{s['training_seconds']:.1f}×** less training time ({s['steps']:.1f}× fewer steps)" if s else "—"
            for s in (r["speedup_to_scratch_quality"][m] for m in marks)
        )
        lines.append(f"| {name} | continue vs scratch | | {ratios} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "retrain")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished")
    parser.add_argument("--only", choices=sorted(DATASETS), action="append", help="a data set (default: both)")
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()
    results = {
        "protocol": __doc__.split("Protocol, the same for both:")[1].split("    python")[0].strip(),
        "recipe": ["configs/ml-100k.yaml", *RECIPE],
        "datasets": {name: run_dataset(name, args.work / name, args.reuse) for name in (args.only or DATASETS)},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retrain.json").write_text(json.dumps(results, indent=2, default=float))
    print(table(results))
    print(f"\n{results['wall_seconds']:.0f} s in all; results in {RESULTS / 'retrain.json'}")


if __name__ == "__main__":
    main()
