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


def lmrec(*args) -> None:
    command = ["lmrec", *map(str, args)]
    print(f"\n$ {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "launch.cli", *command[1:]], cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"demo step failed ({done.returncode}): {shlex.join(command)}")
    print(f"({time.perf_counter() - started:.1f} s)", flush=True)


def main() -> None:
    lmrec("data", "fetch-ml100k", "--cache", CACHE)
    shards = RUN / "shards"
    lmrec("data", "prepare", "--source", "recbole", "--input", CACHE / "ml-100k", "--out", shards, "--overwrite", "--quiet")  # fmt: skip
    lmrec("data", "inspect", shards, "--verify")


if __name__ == "__main__":
    main()
