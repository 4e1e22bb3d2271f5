"""What each ZeRO stage saves: dense backbones of about 3.5 x 10^8 and 10^9 parameters on 2 CPU
ranks, a few steps each, against DeepSpeed's own estimates.

Each run trains the backbone on tiny synthetic data (the memory is the model's, not the
data's) and reports, per rank, the training phase's peak RSS and the RSS once trained
(metrics.json), minus the same for a hidden-64 model: what the dense model's states add.

Expected model states per rank, P parameters, N = 2 ranks, fp32 with torch's AdamW:
  stage 0: 16P (weights 4, gradients 4, Adam moments 8; all replicated)
  stage 1: 8P + 8P/N  (moments partitioned)   stage 2: 4P + 12P/N (gradients too)
  stage 3: 16P/N (weights too; plus the largest layer gathered for its forward)
DeepSpeed's estimate_zero2/zero3_model_states_mem_needs assume 16-bit weights with an fp32
master copy: 2P + 18P/N (ZeRO-2) and 18P/N + 4 x largest layer (ZeRO-3). With fp32 weights there
is no 16-bit copy (-2P) and the master copy is the weights themselves (-4P/N; -2P/N for the
16-bit gradients), so the fp32 correction of their figure is the formula above. Under ZeRO-1/2
DeepSpeed still keeps an fp32 partition of the weights beside them (+4P/N), which the table shows.

Writes benchmarks/results/zero_memory.json; removes its runs.

    python benchmarks/zero_memory.py [--steps 3] [--skip-1b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
SIZES = {
    "tiny": ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2"],
    "350M": ["model.hidden_size=1024", "model.num_layers=20", "model.num_heads=16"],
    "1B": ["model.hidden_size=2048", "model.num_layers=15", "model.num_heads=16"],
}


def parameters(overrides: list[str], shards: Path) -> tuple[int, int]:
    """(total, largest layer) parameter counts of the dense model, built on the meta device."""
    import torch

    from model.config import RecommenderConfig
    from model.modeling import SequenceRecommender
    from train.config import load_config
    from train.items import model_vocab

    cfg = load_config(None, [f"data.shards={shards}", *overrides])
    manifest = json.loads((shards / "manifest.json").read_text())
    with torch.device("meta"):
        model = SequenceRecommender(RecommenderConfig.build(cfg.model, model_vocab(manifest, cfg.model)))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in model.backbone.layers)
    return total, largest


def run(shards: Path, out: Path, overrides: list[str], steps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [f"data.shards={shards}", f"output.dir={out}", f"schedule.max_steps={steps}", "schedule.epochs=1",
            "schedule.log_every=1", "model.max_len=32", "data.batch_size=4", "data.eval_batch_size=8",
            "data.num_workers=0", "eval.bootstrap_samples=10", "loss.main=full", *overrides]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "launch.cli", "train"]  # fmt: skip
    for o in sets:
        command += ["--set", o]
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode:
        shutil.rmtree(out, ignore_errors=True)
        return {"failed": (done.stdout + done.stderr)[-1500:]}
    summary = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "peak_mib": summary["training_peak_rss_mib_per_rank"],
        "trained_mib": summary["trained_rss_mib_per_rank"],
        "training_seconds": summary["training_seconds"],
        "wall_s": round(wall, 1),
    }


def expected_bytes(stage: int, p: int, largest: int, n: int = 2) -> float:
    return {0: 16 * p, 1: 8 * p + 8 * p / n, 2: 4 * p + 12 * p / n, 3: 16 * p / n + 4 * largest}[stage]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from data.prepare import PrepareConfig, prepare
    from data.synthetic import SyntheticSpec, generate

    work = Path(tempfile.mkdtemp(prefix="zero-memory-"))
    shards = work / "shards"
    raw = generate(SyntheticSpec(users=24, items=200, events_per_user=40, text=False, seed=0))
    prepare(raw, PrepareConfig(out=shards, progress=False), {"name": "synthetic, tiny"})
    plan = [("tiny", 2, []), *(("350M", s, []) for s in (0, 1, 2, 3))]
    if not args.skip_1b:
        plan += [("1B", 3, []), ("1B", 2, ["parallel.precision=bf16"])]
    results = {"date": time.strftime("%Y-%m-%d"), "ranks": 2, "steps": args.steps, "runs": []}
    baseline = None
    try:
        for size, stage, extra in plan:
            overrides = [*SIZES[size], f"parallel.zero_stage={stage}", *extra]
            total, largest = parameters(overrides, shards)
            measured = run(shards, work / "run", overrides, args.steps)
            row = {"model": size, "parameters": total, "zero_stage": stage, "precision": "bf16" if extra else "fp32"}
            row.update(measured)
            if size == "tiny":
                baseline = measured
            elif "failed" not in measured and baseline is not None:
                row["peak_minus_tiny_gib"] = [
                    round((a - b) / 1024, 2) for a, b in zip(measured["peak_mib"], baseline["peak_mib"], strict=True)
                ]
                row["trained_minus_tiny_gib"] = [round((a - b) / 1024, 2) for a, b in zip(measured["trained_mib"], baseline["trained_mib"], strict=True)]  # fmt: skip
                if row["precision"] == "fp32":
                    row["expected_states_gib"] = round(expected_bytes(stage, total, largest) / 2**30, 2)
                estimate = None
                if stage == 2:
                    estimate = estimate_zero2_model_states_mem_needs(total, 2, 1, cpu_offload=False)[1]
                elif stage == 3:
                    estimate = estimate_zero3_model_states_mem_needs(total, largest, 2, 1, cpu_offload=False)[1]
                if estimate is not None:
                    row["deepspeed_estimate_gib"] = round(estimate / 2**30, 2)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zero_memory.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
