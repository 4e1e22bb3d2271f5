"""Training throughput and model FLOP utilisation on 2 CPU ranks.

For the ML-1M recipe and a hidden-256, 4-layer variant: a short torchrun run with per-phase
timing (data, sparse lookup, dense forward, loss, backward, optimizer), tokens/s, and model FLOP
utilisation against this machine's measured fp32 matmul rate (one thread per rank, as torchrun
sets). Writes benchmarks/results/train_throughput.json.

    python benchmarks/train_throughput.py [--steps 40]
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = {
    "ml-1m recipe (hidden 64, 2 layers)": [],
    "hidden 256, 4 layers": ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=4"],
}


def matmul_flops_per_thread(n: int = 1024, repeats: int = 20) -> float:
    code = (
        "import time, torch\n"
        "torch.set_num_threads(1)\n"
        f"a = torch.randn({n}, {n}); b = torch.randn({n}, {n})\n"
        "for _ in range(3): a @ b\n"
        "t = time.perf_counter()\n"
        f"for _ in range({repeats}): a @ b\n"
        f"print(2 * {n}**3 * {repeats} / (time.perf_counter() - t))\n"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def model_flops_per_token(hidden: int, layers: int, intermediate: int, seq: int, items: int) -> float:
    """Training FLOPs per target token: 3 x forward (forward + backward); forward counts the
    projections, the SwiGLU MLP, attention over the average causal context, and the full-softmax
    scoring against every item."""
    projections = 4 * hidden * hidden + 3 * hidden * intermediate
    attention = 2 * hidden * (seq / 2)  # QK^T and AV, each position sees seq/2 keys on average
    forward = layers * 2 * (projections + attention) + 2 * hidden * items
    return 3 * forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--shards", default=str(ROOT / "runs" / "ml-1m" / "shards"))
    args = parser.parse_args()
    manifest = json.loads((Path(args.shards) / "manifest.json").read_text())
    per_thread = matmul_flops_per_thread()
    peak = 2 * per_thread  # 2 ranks x 1 thread
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "matmul_fp32_flops_per_thread": per_thread,
        "peak_2_ranks": peak,
        "runs": {},
    }
    for name, overrides in VARIANTS.items():
        out = ROOT / "runs" / "throughput" / name.split(" ")[0].replace("-", "")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        sets = [f"data.shards={args.shards}", f"output.dir={out}", f"schedule.max_steps={args.steps}", "schedule.epochs=1",
                "schedule.time_phases=true", "schedule.max_minutes=0", "eval.bootstrap_samples=10", *overrides]  # fmt: skip
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                   "-m", "launch.cli", "train", "--config", "configs/ml-1m.yaml"]  # fmt: skip
        for o in sets:
            command += ["--set", o]
        subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
        summary = json.loads((out / "metrics.json").read_text())
        model = summary["config"]["model"]
        flops = model_flops_per_token(
            model["hidden_size"], model["num_layers"], model["intermediate_size"] or 4 * model["hidden_size"],
            model["max_len"], manifest["vocab"]["items"],
        )  # fmt: skip
        phases = {k: v for k, v in summary["phase_seconds"].items() if k != "evaluation"}
        total = sum(phases.values())
        results["runs"][name] = {
            "tokens_per_s": summary["tokens_per_s"],
            "model_flops_per_token": flops,
            "mfu": summary["tokens_per_s"] * flops / peak,
            "ms_per_step": 1000 * total / summary["steps"],
            "phase_share": {k: round(v / total, 3) for k, v in phases.items()},
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
