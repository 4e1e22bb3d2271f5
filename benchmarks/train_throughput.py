"""Training throughput, model FLOP utilisation, padding and weak scaling on this machine.

All rates are real (non-padding) tokens. Measured in one run, so that the ratios hold:

- **Padding**: the fraction of batch cells that are padding, plain vs length-bucketed batches
  (``data.length_buckets``), on ML-1M and on short synthetic histories (9 events on average).
- **Packed rows**: what the alternative to bucketing costs here. The same ML-1M histories
  through the recipe's backbone (forward + backward, one thread): bucketed batches with the
  fused causal kernel, against rows packed first-fit to ``max_len`` positions with a
  block-diagonal causal mask through SDPA and positions restarting at 0 per history.
- **Training runs** (torchrun, 2 ranks x 1 thread, phase timing): the ML-1M recipe with plain and
  bucketed batches, the same on 1 rank (weak scaling: tokens/s per rank), and a hidden-256,
  4-layer variant eager and with ``parallel.compile`` (a cold and a warm compile cache).
- **MFU** = real tokens/s x training FLOPs per real token / (ranks x the measured one-thread
  fp32 matmul rate). FLOPs per token = 3 x forward (backward = 2 x forward), forward =
  layers x 2 x (4 h^2 + 3 h I + 2 h c) + 2 h V: the q/k/v/o projections, the SwiGLU MLP,
  QK^T and AV over the token's actual causal context c (averaged over the data's real
  positions, so a history of n inputs contributes contexts 1..n), and the full-softmax
  scoring against the V candidate items.

Writes benchmarks/results/train_throughput.json.

    python benchmarks/train_throughput.py [--steps 40]
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
H256 = ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=4"]
# name: (ranks, overrides, steps multiplier)
RUNS = {
    "ml-1m recipe, plain batches": (2, ["data.length_buckets=false"], 1.0),
    "ml-1m recipe": (2, [], 1.0),
    "ml-1m recipe, 1 rank": (1, [], 1.0),
    "hidden 256, 4 layers": (2, H256, 0.5),
    "hidden 256, 4 layers, compiled (cold cache)": (2, [*H256, "parallel.compile=true"], 0.5),
    "hidden 256, 4 layers, compiled (warm cache)": (2, [*H256, "parallel.compile=true"], 0.5),
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


def input_lengths(shards: Path, max_len: int) -> np.ndarray:
    """Each training history's number of input positions (what one epoch trains on)."""
    from data.loader import LoaderConfig, make_loader

    _, loader = make_loader(shards, LoaderConfig(batch_size=1024, max_len=max_len, num_workers=0, shuffle=False))
    return np.concatenate([np.maximum(b["lengths"].numpy() - 1, 0) for b in loader])


def padding_fraction(shards: Path, max_len: int, batch_size: int, buckets: bool) -> float:
    from data.loader import LoaderConfig, iterate_epoch, make_loader

    real = cells = 0
    for rank in range(2):
        dataset, loader = make_loader(
            shards, LoaderConfig(batch_size=batch_size, max_len=max_len, num_workers=0, length_buckets=buckets), rank, 2
        )
        for batch in iterate_epoch(dataset, loader, epoch=0):
            if (batch["weights"] > 0).any():
                real += int((batch["lengths"] - 1).clamp(min=0).sum())
                cells += batch["items"].shape[0] * (batch["items"].shape[1] - 1)
    return 1 - real / cells


def short_history_shards(directory: Path) -> Path:
    from data.prepare import PrepareConfig, prepare
    from data.synthetic import SyntheticSpec, generate

    raw = generate(SyntheticSpec(users=20_000, items=5_000, events_per_user=9, min_events=3, text=False, seed=0))
    prepare(raw, PrepareConfig(out=directory, progress=False), {"name": "synthetic, short histories"})
    return directory


def packed_rows_cost(lengths: np.ndarray, hidden: int, layers: int, heads: int, max_len: int) -> dict:
    """Backbone forward + backward on the same histories, bucketed vs packed, one thread."""
    import torch

    from model.config import ModelConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from transformers import AutoModel

    cfg = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, max_len=max_len, dropout=0.0)
    backbone = AutoModel.from_config(cfg.backbone_config())
    rng = np.random.default_rng(0)
    sample = rng.permutation(lengths[lengths > 0])[:1536]
    batch_size = 64

    def bucketed():
        ordered = np.sort(sample)
        for i in range(0, len(ordered), batch_size):
            group = ordered[i : i + batch_size]
            yield torch.randn(len(group), int(group.max()), hidden), {}

    def packed():
        rows: list[list[int]] = []
        for n in sorted(sample.tolist(), reverse=True):  # first-fit decreasing
            for row in rows:
                if sum(row) + n <= max_len:
                    row.append(n)
                    break
            else:
                rows.append([n])
        per_batch = max(1, round(batch_size * sample.mean() / max_len))  # the same tokens per step
        for i in range(0, len(rows), per_batch):
            group = rows[i : i + per_batch]
            width = max(sum(r) for r in group)
            mask = torch.zeros(len(group), 1, width, width, dtype=torch.bool)
            positions = torch.zeros(len(group), width, dtype=torch.long)
            for b, row in enumerate(group):
                start = 0
                for n in row:
                    mask[b, 0, start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
                    positions[b, start : start + n] = torch.arange(n)
                    start += n
                for j in range(start, width):  # padding attends to itself: no empty softmax rows
                    mask[b, 0, j, j] = True
            yield torch.randn(len(group), width, hidden), {"attention_mask": mask, "position_ids": positions}

    def rate(batches) -> tuple[float, float]:
        batches = list(batches)
        cells = sum(x.shape[0] * x.shape[1] for x, _ in batches)
        for x, kw in batches[:2]:
            backbone(inputs_embeds=x, use_cache=False, **kw).last_hidden_state.sum().backward()
        started = time.perf_counter()
        for x, kw in batches:
            backbone(inputs_embeds=x, use_cache=False, **kw).last_hidden_state.sum().backward()
        return float(sample.sum()) / (time.perf_counter() - started), 1 - float(sample.sum()) / cells

    bucketed_rate, bucketed_padding = rate(bucketed())
    packed_rate, packed_padding = rate(packed())
    return {
        "histories": len(sample),
        "bucketed": {"real_tokens_per_s": round(bucketed_rate), "padding": round(bucketed_padding, 4)},
        "packed": {"real_tokens_per_s": round(packed_rate), "padding": round(packed_padding, 4)},
        "packed_over_bucketed": round(packed_rate / bucketed_rate, 3),
    }


def train_run(name: str, ranks: int, overrides: list[str], steps: int, shards: Path, compile_cache: Path) -> dict:
    out = ROOT / "runs" / "throughput" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [f"data.shards={shards}", f"output.dir={out}", f"schedule.max_steps={steps}", "schedule.epochs=10",
            "schedule.eval_every=10", "schedule.time_phases=true", "schedule.max_minutes=0",
            "eval.bootstrap_samples=10", *overrides]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}",
               "-m", "launch.cli", "train", "--config", "configs/ml-1m.yaml"]  # fmt: skip
    for o in sets:
        command += ["--set", o]
    # One thread per rank whatever the rank count (torchrun sets it only for more than one).
    # The compiled runs share a cache that starts empty: the first is cold, the second warm.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(compile_cache)}
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env, capture_output=True)
    wall = time.perf_counter() - started
    summary = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    phases = {k: v for k, v in summary["phase_seconds"].items() if k != "evaluation"}
    total = sum(phases.values())
    return {
        "ranks": ranks,
        "overrides": overrides,
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        "tokens_per_s_per_rank": round(summary["tokens_per_s"] / ranks),
        "training_seconds": summary["training_seconds"],
        "wall_s_with_start_and_test": round(wall, 1),
        "ms_per_step": round(1000 * total / summary["steps"], 1),
        "phase_share": {k: round(v / total, 3) for k, v in phases.items()},
        "model": summary["config"]["model"],
    }


def flops_per_token(model: dict, mean_context: float, candidates: int) -> float:
    h, layers = model["hidden_size"], model["num_layers"]
    intermediate = model["intermediate_size"] or 4 * h
    forward = layers * 2 * (4 * h * h + 3 * h * intermediate + 2 * h * mean_context) + 2 * h * candidates
    return 3 * forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--shards", type=Path, default=ROOT / "runs" / "ml-1m" / "shards")
    args = parser.parse_args()
    manifest = json.loads((args.shards / "manifest.json").read_text())
    max_len = 200
    lengths = input_lengths(args.shards, max_len)
    mean_context = float((lengths * (lengths + 1) / 2).sum() / lengths.sum())
    candidates = manifest["vocab"]["items"] - 2  # minus the reserved rows (no training events)
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "matmul_fp32_flops_per_thread": matmul_flops_per_thread(),
        "ml1m_mean_causal_context": round(mean_context, 1),
        "padding_fraction": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        short = short_history_shards(Path(tmp) / "short")
        short_lengths = input_lengths(short, max_len)
        for name, shards in (("ml-1m", args.shards), ("synthetic, 9 events on average", short)):
            results["padding_fraction"][name] = {
                "plain": round(padding_fraction(shards, max_len, 64, False), 4),
                "length_buckets": round(padding_fraction(shards, max_len, 64, True), 4),
            }
        results["padding_fraction"]["synthetic, 9 events on average"]["mean_input_length"] = round(
            float(short_lengths.mean()), 2
        )
    results["packed_rows_vs_buckets_backbone"] = packed_rows_cost(lengths, 64, 2, 2, max_len)
    peak_per_thread = results["matmul_fp32_flops_per_thread"]
    results["runs"] = {}
    compile_cache = Path(tempfile.mkdtemp(prefix="inductor-"))
    for name, (ranks, overrides, share) in RUNS.items():
        run = train_run(name, ranks, overrides, max(4, int(args.steps * share)), args.shards, compile_cache)
        run["model_flops_per_token"] = flops_per_token(run.pop("model"), mean_context, candidates)
        run["mfu"] = round(run["tokens_per_s"] * run["model_flops_per_token"] / (ranks * peak_per_thread), 3)
        results["runs"][name] = run
        print(name, run["tokens_per_s"], run["mfu"], flush=True)
    shutil.rmtree(compile_cache, ignore_errors=True)
    runs = results["runs"]
    cold, warm = (runs[f"hidden 256, 4 layers, compiled ({c} cache)"]["training_seconds"] for c in ("cold", "warm"))
    results["compile_seconds_cold_minus_warm"] = round(cold - warm, 1)
    results["weak_scaling_tokens_per_s_per_rank_2_over_1"] = round(
        runs["ml-1m recipe"]["tokens_per_s_per_rank"] / runs["ml-1m recipe, 1 rank"]["tokens_per_s_per_rank"], 3
    )
    results["length_buckets_speedup"] = round(
        runs["ml-1m recipe"]["tokens_per_s"] / runs["ml-1m recipe, plain batches"]["tokens_per_s"], 3
    )
    results["compile_speedup_warm"] = round(
        runs["hidden 256, 4 layers, compiled (warm cache)"]["tokens_per_s"]
        / runs["hidden 256, 4 layers"]["tokens_per_s"],
        3,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
