"""What item text buys: cold items on ML-1M, and pretraining on ML-1M for ML-100k.

1. Cold items. ML-1M prepared with ``--item-text --hold-out-items 0.1``: a random 10 % of the
   items never appear in training or validation, only as test targets. An ID-only model and a
   text-aware model (ID + projected sentence-encoder vector + pooled text tokens) train on the
   same shards for the same wall budget; their test ranks are compared on the users whose target
   is cold and on the others (warm), with paired bootstrap intervals over users. A second pair
   adds ID dropout (``model.item_id_dropout=0.2``: items trained as their text alone a fifth of
   the time), with both text parts and with the text vector alone; each is compared with the
   ID-only model of the first pair, which ran under the same load (two trainings at once).
2. Transfer. ML-100k (``configs/ml-100k-transfer.yaml``: text-aware, with a head predicting a
   rating >= 4 for the next item) trained from scratch, and fine-tuned from the text-aware ML-1M
   model of step 1 (``--init-from``), for the same wall budget: NDCG@10 and the rating head's AUC,
   precision, recall and F1, differences with paired bootstrap intervals over users.

The two arms of each comparison run at the same time, one process and half the cores each, so
they get the same machine. Results: benchmarks/results/text.json.

    python benchmarks/text.py [--minutes 15] [--work runs/text] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ML1M = ROOT.parent / "shared" / "datasets" / "ml-1m"
RESULTS = ROOT / "benchmarks" / "results"
TEXT_PARTS = ["model.item_text=true", "model.item_text_tokens=true"]
ID_DROPOUT = ["model.item_id_dropout=0.2"]
ML1M_SCHEDULE = ["schedule.epochs=8", "schedule.eval_every=2", "schedule.patience=100", "data.num_workers=0"]
BOOTSTRAP = 1000


def lmrec(*args) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *map(str, args)]


def prepare(work: Path) -> tuple[Path, Path]:
    ml1m, ml100k = work / "shards-ml1m-cold", work / "shards-ml100k"
    if not (ml1m / "manifest.json").exists():
        subprocess.run(
            lmrec("data", "prepare", "--source", "sasrec", "--input", ML1M / "sasrec" / "ml-1m.txt",
                  "--item-map", ML1M / "sasrec" / "sas_to_original_items.txt", "--items", ML1M / "raw" / "movies.dat",
                  "--item-text", "--hold-out-items", 0.1, "--out", ml1m, "--quiet"),
            check=True, cwd=ROOT,
        )  # fmt: skip
    if not (ml100k / "manifest.json").exists():
        cache = ROOT / ".cache"
        subprocess.run(lmrec("data", "fetch-ml100k", "--cache", cache), check=True, cwd=ROOT)
        subprocess.run(
            lmrec("data", "prepare", "--source", "recbole", "--input", cache / "ml-100k", "--item-text", "--out",
                  ml100k, "--quiet"),
            check=True, cwd=ROOT,
        )  # fmt: skip
    return ml1m, ml100k


def train_arms(arms: dict[str, list[str]], work: Path, reuse: bool) -> dict[str, Path]:
    """Runs the arms side by side (one process each, the cores split between them)."""
    threads = str(max(1, (os.cpu_count() or 2) // len(arms)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    running = {}
    for name, args in arms.items():
        out = work / name
        if reuse and (out / "metrics.json").exists():
            continue
        log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed when the process ends
        running[name] = (subprocess.Popen(lmrec("train", *args, "--set", f"output.dir={out}"), cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT), log)  # fmt: skip
    for name, (process, log) in running.items():
        if process.wait() != 0:
            raise SystemExit(f"{name} failed; see {work / f'{name}.log'}")
        log.close()
    return {name: work / name for name in arms}


def _per_user(path: Path, metric: str) -> tuple[np.ndarray, np.ndarray, dict]:
    ranks = dict(np.load(path / "test_ranks.npz"))
    order = np.argsort(ranks["users"])
    ranks = {k: v[order] for k, v in ranks.items()}
    r = ranks["ranks"].astype(np.float64)
    values = (r < 10).astype(float) if metric == "HR@10" else np.where(r < 10, 1 / np.log2(r + 2), 0.0)
    return ranks["users"], values, ranks


def compare(a: Path, b: Path, group: str | None = None) -> dict:
    """b - a on HR@10 and NDCG@10, over all users or the cold / warm group, paired by user."""
    from metrics import paired_bootstrap

    out = {}
    for metric in ("HR@10", "NDCG@10"):
        users_a, va, ra = _per_user(a, metric)
        users_b, vb, _ = _per_user(b, metric)
        assert np.array_equal(users_a, users_b), "the two runs scored different users"
        chosen = np.ones(len(va), bool) if group is None else (ra["cold"] if group == "cold" else ~ra["cold"])
        diff, low, high = paired_bootstrap(va[chosen], vb[chosen], samples=BOOTSTRAP)
        out[metric] = {
            "a": float(va[chosen].mean()),
            "b": float(vb[chosen].mean()),
            "diff": diff,
            "diff_ci95": [low, high],
            "relative": diff / float(va[chosen].mean()) if va[chosen].mean() else None,
            "users": int(chosen.sum()),
        }
    return out


def compare_head(a: Path, b: Path) -> dict:
    """The rating head's metrics for both, and b - a with paired bootstrap intervals over users."""
    import torch

    from metrics import binary_metrics

    runs = [_per_user(p, "HR@10")[2] for p in (a, b)]
    labels = runs[0]["action_label"]

    def metrics(index):
        return [
            binary_metrics(torch.from_numpy(r["action_probability"][index]), torch.from_numpy(labels[index]))
            for r in runs
        ]

    point = metrics(np.arange(len(labels)))
    rng = np.random.default_rng(0)
    draws = [metrics(rng.integers(0, len(labels), len(labels))) for _ in range(200)]
    out = {}
    for key in ("AUC", "precision", "recall", "F1"):
        diffs = np.array([d[1][key] - d[0][key] for d in draws])
        out[key] = {
            "a": point[0][key],
            "b": point[1][key],
            "diff": point[1][key] - point[0][key],
            "diff_ci95": [float(np.nanquantile(diffs, 0.025)), float(np.nanquantile(diffs, 0.975))],
        }
    out["events"] = int(len(labels))
    out["positive_share"] = float(labels.mean())
    return out


def summary(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps"],
        "epochs": metrics["history"][-1]["epoch"] + 1 if metrics["history"] else 0,
        "tokens_per_s": metrics["tokens_per_s"],
        "test": {k: metrics["test"][k] for k in ("model", "cold", "warm", "action") if k in metrics["test"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall budget of every run")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "text")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished in --work")
    args = parser.parse_args()
    if not (ML1M / "sasrec" / "ml-1m.txt").exists():
        raise SystemExit(f"ML-1M not found at {ML1M}")
    args.work.mkdir(parents=True, exist_ok=True)
    ml1m, ml100k = prepare(args.work)
    budget = f"schedule.max_minutes={args.minutes}"

    def sets(*overrides):
        return [x for o in overrides for x in ("--set", o)]

    ml1m_args = ["--config", "configs/ml-1m.yaml", *sets(f"data.shards={ml1m}", budget, *ML1M_SCHEDULE)]
    cold = train_arms({"ml1m-id": ml1m_args, "ml1m-text": [*ml1m_args, *sets(*TEXT_PARTS)]}, args.work, args.reuse)
    cold |= train_arms(
        {
            "ml1m-text-iddrop": [*ml1m_args, *sets(*TEXT_PARTS, *ID_DROPOUT)],
            "ml1m-vec-iddrop": [*ml1m_args, *sets("model.item_text=true", *ID_DROPOUT)],
        },
        args.work,
        args.reuse,
    )
    ml100k_args = ["--config", "configs/ml-100k-transfer.yaml", *sets(f"data.shards={ml100k}", budget)]
    transfer = train_arms(
        {
            "ml100k-scratch": ml100k_args,
            "ml100k-transfer": [*ml100k_args, "--init-from", cold["ml1m-text"] / "best"],
        },
        args.work,
        args.reuse,
    )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "budget_minutes": args.minutes,
        "machine": f"{os.cpu_count()} CPU cores; the two arms of a comparison run at once, one process each",
        "bootstrap_samples": BOOTSTRAP,
        "cold_items_ml1m": {
            "a": "ml1m-id: ID only",
            "b": {
                "ml1m-text": "ID + text vector + text tokens",
                "ml1m-text-iddrop": "ID + text vector + text tokens, ID dropout 0.2",
                "ml1m-vec-iddrop": "ID + text vector, ID dropout 0.2",
            },
            "runs": {name: summary(path) for name, path in cold.items()},
            "comparisons": {
                name: {group or "all": compare(cold["ml1m-id"], cold[name], group) for group in ("cold", "warm", None)}
                for name in ("ml1m-text", "ml1m-text-iddrop", "ml1m-vec-iddrop")
            },
        },
        "transfer_ml1m_to_ml100k": {
            "a": "from scratch",
            "b": "--init-from the text-aware ML-1M model",
            "runs": {name: summary(path) for name, path in transfer.items()},
            "ranking": compare(transfer["ml100k-scratch"], transfer["ml100k-transfer"]),
            "rating_head": compare_head(transfer["ml100k-scratch"], transfer["ml100k-transfer"]),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "text.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
