import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "ml-1m"


def run_cli(*args, check=True, cwd=ROOT):
    """Runs the real `lmrec` entry point in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-m", "launch.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"lmrec {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return done


@pytest.fixture(scope="session")
def ml1m_dir():
    if not (SHARED / "sasrec" / "ml-1m.txt").exists():
        pytest.skip(f"ML-1M benchmark data not found at {SHARED}")
    return SHARED
