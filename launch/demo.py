"""`make demo`: the whole pipeline on the embedded default data set (MovieLens-100k).

Each step is a real `lmrec` command, printed before it runs, so this file doubles as a
walk-through of the command line. Everything lands in runs/demo/.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = Path("runs/demo")
CACHE = Path(".cache")


def run(shown: list[str], actual: list[str]) -> None:
    print(f"\n$ {shlex.join(shown)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(actual, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"demo step failed ({done.returncode}): {shlex.join(shown)}")
    print(f"({time.perf_counter() - started:.1f} s)", flush=True)


def lmrec(*args) -> None:
    args = [str(a) for a in args]
    run(["lmrec", *args], [sys.executable, "-m", "launch.cli", *args])


def torchrun_lmrec(nproc: int, *args) -> None:
    args = [str(a) for a in args]
    launcher = ["torchrun", f"--nproc_per_node={nproc}"]
    run(
        [*launcher, "-m", "launch.cli", *args],
        [sys.executable, "-m", "torch.distributed.run", *launcher[1:], "-m", "launch.cli", *args],
    )


def main() -> None:
    lmrec("data", "fetch-ml100k", "--cache", CACHE)
    shards = RUN / "shards"
    lmrec("data", "prepare", "--source", "recbole", "--input", CACHE / "ml-100k", "--out", shards, "--overwrite", "--quiet")  # fmt: skip
    lmrec("data", "inspect", shards, "--verify")
    # Two ranks on this machine: TorchRec shards the item table, DeepSpeed ZeRO-2 trains the rest.
    torchrun_lmrec(2, "train", "--config", "configs/ml-100k.yaml")
    lmrec("eval", "--model", RUN / "train" / "best", "--split", "test")


if __name__ == "__main__":
    main()
