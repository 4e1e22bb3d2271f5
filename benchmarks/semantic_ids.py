"""Semantic-ID generative retrieval against the ID model on ML-1M, and for cold items.

1. Quality (``--only quality``). ML-1M, the SASRec protocol and split of benchmarks/train_ml1m.py,
   prepared with ``--item-text``. Semantic IDs by ``lmrec data semantic-ids --from-model`` the
   hidden-64, 2-layer ID model of configs/ml-1m.yaml (its run in ``--id-run``, trained by
   benchmarks/train_ml1m.py: its items' text vectors joined with its trained item rows). Two arms
   of configs/ml-1m-semantic.yaml, each on 2 CPU ranks under torchrun like the ID run, alone on
   the machine, with the ID run's training time as their wall budget (``schedule.max_minutes``):
   ``semantic`` (tokens are the items' code rows) and ``combined`` (tokens also carry the ID row).
   Test NDCG@10 and HR@10 against the ID run's, paired bootstrap over users. ``search``: the
   semantic arm's test metrics with beams of 20, 100 and the whole catalog (exhaustive), to tell
   the search's losses from the model's.
2. Cold items (``--only cold``). benchmarks/text.py's protocol: ML-1M with ``--item-text
   --hold-out-items 0.1`` (a random 10 % of the items appear only as test targets), arms side by
   side, one process each, for the same wall budget and 8 epochs: the ID + text model of
   benchmarks/text.py (ID row + projected text vector + text tokens, full softmax) and
   semantic-ID models whose tokens carry the ID row, the text vector and the code rows, one per
   code shape of ``--cold-codes`` (semantic IDs from the items' text alone: held-out items have no
   trained rows). Cold and warm targets apart, paired bootstrap over users, and the share of the
   held-out items whose code prefixes some trained item shares.

Results: benchmarks/results/semantic_ids.json.

    python benchmarks/semantic_ids.py [--only quality,search,cold] [--minutes-cold 15] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from text import ML1M, ML1M_SCHEDULE, TEXT_PARTS, compare, lmrec, summary, train_arms  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RECIPE = "configs/ml-1m-semantic.yaml"
SEMANTIC_TOKENS = ["model.item_id=true"]  # the combined model: code rows + ID row
COLD_SEMANTIC = ["model.item_id=true", "model.item_text=true", "model.item_semantic_ids=true",
                 "model.semantic_id_head=true", "loss.main=semantic_id", "eval.beam_width=20"]  # fmt: skip


def sets(*overrides) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def prepare_ml1m(out: Path, *extra) -> Path:
    if not (out / "manifest.json").exists():
        subprocess.run(
            lmrec("data", "prepare", "--source", "sasrec", "--input", ML1M / "sasrec" / "ml-1m.txt",
                  "--item-map", ML1M / "sasrec" / "sas_to_original_items.txt", "--items", ML1M / "raw" / "movies.dat",
                  "--item-text", *extra, "--out", out, "--quiet"),
            check=True, cwd=ROOT,
        )  # fmt: skip
    return out


def semantic_ids(shards: Path, *args, codes: int = 256, levels: int | None = None) -> dict:
    """The shards' semantic IDs, made (again) unless they already have ``codes`` and ``levels``."""
    entry = json.loads((shards / "manifest.json").read_text()).get("semantic_ids")
    if not entry or entry["codes"] != codes or (levels and entry["levels"] != levels):
        depth = ["--levels", levels] if levels else []
        subprocess.run(lmrec("data", "semantic-ids", shards, *args, "--codes", codes, *depth, "--overwrite"),
                       check=True, cwd=ROOT)  # fmt: skip
        entry = json.loads((shards / "manifest.json").read_text())["semantic_ids"]
    return entry


def train_two_ranks(out: Path, overrides: list[str], reuse: bool) -> Path:
    """``lmrec train`` of the recipe on 2 CPU ranks under torchrun (as benchmarks/train_ml1m.py)."""
    if reuse and (out / "metrics.json").exists():
        return out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "launch.cli", "train", "--config", RECIPE, *sets(*overrides, f"output.dir={out}")]  # fmt: skip
    with open(out.with_suffix(".log"), "w") as log:
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"{out.name} failed; see {out.with_suffix('.log')}")
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def quality(work: Path, id_run: Path, reuse: bool) -> dict:
    if not (id_run / "test_ranks.npz").exists():
        raise SystemExit(f"{id_run}: no finished ID run; train it first (python benchmarks/train_ml1m.py)")
    reference = json.loads((id_run / "metrics.json").read_text())
    shards = prepare_ml1m(work / "shards")
    entry = semantic_ids(shards, "--from-model", id_run / "best")
    budget = reference["training_seconds"] / 60
    runs, loads = {}, {}
    for name, extra in (("semantic", []), ("combined", SEMANTIC_TOKENS)):
        before = load_average()
        runs[name] = train_two_ranks(work / name, [f"data.shards={shards}", f"schedule.max_minutes={budget:.2f}",
                                                   *extra], reuse)  # fmt: skip
        loads[name] = {"before": before, "after": load_average()}
    result = {
        "id_run": {"path": str(id_run.relative_to(ROOT)), "recipe": "configs/ml-1m.yaml", **summary(id_run)},
        "semantic_ids": {k: entry[k] for k in ("method", "levels", "codes", "level_sizes", "collisions", "inputs")},
        "budget_minutes": round(budget, 2),
        "load_average": loads,
        "runs": {name: summary(path) for name, path in runs.items()},
    }
    result["comparisons"] = {name: compare(id_run, path) for name, path in runs.items()}
    ratio = result["comparisons"]["semantic"]["NDCG@10"]
    result["semantic_over_id_ndcg10"] = {
        "ratio": ratio["b"] / ratio["a"],
        "ratio_ci95": [1 + low / ratio["a"] for low in ratio["diff_ci95"]],
        "goal": ">= 0.9",
    }
    return result


def cold(work: Path, minutes: float, reuse: bool, code_choices: list[tuple[int, int | None]]) -> dict:
    """The ID + text arm against one semantic arm per (codes, levels) choice, each on its own
    copy of the shards (``levels`` None: the default depth)."""
    shards = prepare_ml1m(work / "shards-cold", "--hold-out-items", 0.1)
    common = ["--config", "configs/ml-1m.yaml", *sets(f"schedule.max_minutes={minutes}", *ML1M_SCHEDULE)]
    arms, entries, descriptions = {}, {}, {}
    before = load_average()
    for codes, levels in code_choices:
        name = f"cold-semantic-{codes}x{levels or 'default'}"
        copy = work / f"shards-{name}"
        if not copy.exists():
            shutil.copytree(shards, copy)
        entries[name] = semantic_ids(copy, codes=codes, levels=levels)  # text only: held-out items have no trained rows
        descriptions[name] = (
            f"ID row + text vector + code rows ({codes} codes x {entries[name]['levels']} levels), beam 20"
        )
        runs = train_arms(
            {"cold-id-text": [*common, *sets(f"data.shards={shards}", *TEXT_PARTS)],
             name: [*common, *sets(f"data.shards={copy}", *COLD_SEMANTIC)]},
            work, reuse,
        )  # fmt: skip
        arms |= runs
    return {
        "arms": {"cold-id-text": "ID row + text vector + text tokens, full softmax (benchmarks/text.py's ml1m-text)"}
        | descriptions,
        "semantic_ids": {
            name: {k: e[k] for k in ("method", "levels", "codes", "level_sizes", "collisions", "inputs")}
            for name, e in entries.items()
        },
        "shared_prefixes": {name: shared_prefixes(work / f"shards-{name}") for name in entries},
        "budget_minutes": minutes,
        "load_average": {"before": before, "after": load_average()},
        "runs": {name: summary(path) for name, path in arms.items()},
        "comparisons": {
            name: {
                group: compare(arms["cold-id-text"], arms[name], None if group == "all" else group)
                for group in ("cold", "warm", "all")
            }
            for name in entries
        },
        "goal": "cold NDCG@10 above 0.0215 (the ID + text model of benchmarks/results/text.json); warm not worse "
        "by more than 5 % (interval of the relative difference)",
    }


def shared_prefixes(shards: Path) -> dict:
    """For the held-out items: the share whose first d codes some trained item also has, per depth
    d. A decoder trained on the trained items' tuples has never been asked for a prefix no
    trained item has."""
    import numpy as np
    import polars as pl

    from data.semantic_ids import load_semantic_ids

    codes = load_semantic_ids(shards).codes
    items = pl.read_parquet(shards / "items.parquet", columns=["index", "count"])
    trained = np.zeros(len(codes), dtype=bool)
    trained[items["index"].to_numpy()] = items["count"].to_numpy() > 0
    held_out = (codes[:, 0] >= 0) & ~trained
    out = {}
    for depth in range(1, codes.shape[1] + 1):
        seen = {tuple(row) for row in codes[trained][:, :depth].tolist()}
        out[f"depth_{depth}"] = float(np.mean([tuple(row) in seen for row in codes[held_out][:, :depth].tolist()]))
    return out


def search_error(run: Path, beams: tuple[int, ...]) -> dict:
    """The quality run's semantic model on the test split with wider beams, up to the whole
    catalog (exhaustive): how much of its gap to the ID model the beam search loses."""
    import train.config
    from train.evaluate import evaluate_source

    parse = train.config.config_from_dict
    out = {}
    for beam in beams:

        def with_beam(values, beam=beam):
            cfg = parse(values)
            cfg.eval.beam_width = beam
            return cfg

        train.config.config_from_dict = with_beam
        started = time.perf_counter()
        test = evaluate_source(run / "best", "test")["model"]
        out[str(beam)] = {"HR@10": test["HR@10"], "NDCG@10": test["NDCG@10"],
                          "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    train.config.config_from_dict = parse
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        default="quality,search,cold",
        help="comma-separated sections: quality, search (beam 20 against exhaustive search), cold",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "semantic")
    parser.add_argument("--id-run", type=Path, default=ROOT / "runs" / "ml-1m" / "train")
    parser.add_argument("--minutes-cold", type=float, default=15.0, help="wall budget of each cold-item arm")
    parser.add_argument(
        "--cold-codes",
        default="256xdefault,64x2",
        help="semantic-ID shapes of the cold-item arms, CODESxLEVELS (default: the depth lmrec picks)",
    )
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished in --work")
    args = parser.parse_args()
    if not (ML1M / "sasrec" / "ml-1m.txt").exists():
        raise SystemExit(f"ML-1M not found at {ML1M}")
    path = RESULTS / "semantic_ids.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result |= {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores"}
    sections = set(args.only.split(","))
    if "quality" in sections:
        (args.work / "ml1m").mkdir(parents=True, exist_ok=True)
        result["quality_ml1m"] = quality(args.work / "ml1m", args.id_run.resolve(), args.reuse)
        RESULTS.joinpath("semantic_ids.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    if "search" in sections:
        run = args.work / "ml1m" / "semantic"
        items = json.loads((run.parent / "shards" / "manifest.json").read_text())["vocab"]["items"]
        result["quality_ml1m"]["search_error"] = search_error(run, (20, 100, items))
        RESULTS.joinpath("semantic_ids.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    if "cold" in sections:
        (args.work / "cold").mkdir(parents=True, exist_ok=True)
        choices = [(int(c), int(lv) if lv != "default" else None)
                   for c, _, lv in (choice.partition("x") for choice in args.cold_codes.split(","))]  # fmt: skip
        result["cold_items_ml1m"] = cold(args.work / "cold", args.minutes_cold, args.reuse, choices)
        RESULTS.joinpath("semantic_ids.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
