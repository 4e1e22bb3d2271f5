import json
import os
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(out, shards, *overrides, nproc=2, config="configs/debug.yaml", torchrun_args=(), train_args=()):
    """`lmrec train` under torchrun on ``nproc`` local processes."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        *torchrun_args, "-m", "launch.cli", "train", "--config", config,
        "--set", f"data.shards={shards}", "--set", f"output.dir={out}", *train_args,
    ]  # fmt: skip
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def torchrun_train(out, shards, *overrides, nproc=2, config="configs/debug.yaml", train_args=()):
    done = subprocess.run(
        torchrun_cmd(out, shards, *overrides, nproc=nproc, config=config, train_args=train_args),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((Path(out) / "metrics.json").read_text())
    summary["losses"] = [loss for _, loss in sorted(run_losses(out).items())]
    return summary, done.stdout


def run_losses(out) -> dict[int, float]:
    """step -> global loss, from a run directory's losses.jsonl."""
    lines = (Path(out) / "losses.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


@pytest.fixture(scope="session", autouse=True)
def text_cache(tmp_path_factory):
    """Encoded item-text vectors go to a session directory, not the user's cache."""
    os.environ["LMREC_TEXT_CACHE"] = str(tmp_path_factory.mktemp("text-cache"))


@pytest.fixture(scope="session")
def ml1m_dir():
    if not (SHARED / "sasrec" / "ml-1m.txt").exists():
        pytest.skip(f"ML-1M benchmark data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny model trained on 2 ranks, shared by the serving tests: (shards, run directory)."""
    root = tmp_path_factory.mktemp("trained")
    shards, run = root / "shards", root / "run"
    run_cli(
        "data", "prepare", "--source", "synthetic", "--users", 300, "--num-items", 120,
        "--events-per-user", 15, "--out", shards, "--quiet",
    )  # fmt: skip
    torchrun_train(run, shards)
    return shards, run


@pytest.fixture(scope="session")
def artifacts(trained_run, tmp_path_factory):
    """The run's best model exported at every quantization: {quant: artifact directory}."""
    shards, run = trained_run
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for quant in ("fp32", "int8", "int4", "fp16"):
        out[quant] = root / quant
        run_cli("export", run / "best", "--out", out[quant], "--quant", quant)
    return out
