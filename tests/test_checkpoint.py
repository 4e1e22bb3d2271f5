"""Checkpoints with real processes: a real SIGKILL of a real rank under torchrun, torchrun's
elastic restart, SIGTERM preemption, resharding across world sizes, ZeRO stages and table
shardings, consolidation, and every kind of broken checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest

from tests.conftest import ROOT, run_cli, run_losses, torchrun_cmd, torchrun_train

pytestmark = pytest.mark.multiprocess

# 400 users, 2 ranks x 2 dataloader workers x batch 16, shuffled: 14 steps per epoch, 3 epochs.
# Checkpoints every 8 steps (8, 16, 24, ...) and at each epoch's evaluation (14, 28, 42).
EXACT = ["schedule.epochs=3", "data.num_workers=2", "schedule.log_every=1", "checkpoint.every_steps=8"]
KILL_AT = 19  # after the step-16 checkpoint (epoch 1, batch 2), well before the step-24 one


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "shards"
    run_cli(
        "data", "prepare", "--source", "synthetic", "--users", 400, "--num-items", 80,
        "--events-per-user", 12, "--out", out, "--quiet",
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    """The uninterrupted run that interrupted ones must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("ckpt") / "reference"
    summary, _ = torchrun_train(out, shards, *EXACT, "checkpoint.keep=10")
    return out, summary


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _rank_process(launcher: psutil.Process, rank: int) -> psutil.Process:
    for child in launcher.children(recursive=False):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {rank} process under torchrun")


def _run_until(cmd, marker: str, action, timeout=300, env=None) -> tuple[int, str]:
    """Starts ``cmd``, calls ``action(process)`` when ``marker`` appears in its output, waits."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, fired = [], False
    deadline = time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if not fired and line.startswith(marker):
            action(proc)
            fired = True
        assert time.time() < deadline, "".join(lines[-50:])
    proc.wait(timeout=120)
    assert fired, "".join(lines[-50:])
    return proc.returncode, "".join(lines)


def _kill_rank_1(proc) -> None:
    _rank_process(psutil.Process(proc.pid), 1).send_signal(signal.SIGKILL)


def _last_step(log: str) -> int:
    return max(int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith("step "))


def _same_files(a, b, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _consolidated(checkpoint, out):
    run_cli("checkpoint", "consolidate", checkpoint, "--out", out)
    return out


def test_resume_after_sigkill_of_a_rank_is_bit_identical(tmp_path, shards, reference):
    ref_out, ref = reference
    out = tmp_path / "killed"
    code, log = _run_until(torchrun_cmd(out, shards, *EXACT, "checkpoint.keep=10"), f"step {KILL_AT}/", _kill_rank_1)
    assert code != 0
    killed_at = _last_step(log)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((out / "checkpoints" / latest / "meta.json").read_text())
    # The kill landed strictly between two checkpoints, mid-epoch: work after step 16 was lost.
    assert meta["progress"]["step"] == 16 < killed_at < 24
    assert (meta["progress"]["epoch"], meta["progress"]["batch"]) == (1, 2)
    assert not (out / "metrics.json").exists()
    assert max(run_losses(out)) > 16, "the run log holds steps the resumed run must take again"

    resumed, log = torchrun_train(out, shards, *EXACT, "checkpoint.keep=10", train_args=["--resume", "auto"])
    assert "resumed from" in log and "at step 16 (epoch 1, batch 2)" in log
    # The run log: every step's loss, bit for bit, the lost steps logged once.
    assert (out / "losses.jsonl").read_bytes() == (ref_out / "losses.jsonl").read_bytes()
    assert len(resumed["losses"]) == 42
    assert resumed["test"] == ref["test"]
    _same_files(out / "best", ref_out / "best", ["model.safetensors", "items.safetensors"])
    final = "step_000000042"
    mine = _consolidated(out / "checkpoints" / final, tmp_path / "mine")
    theirs = _consolidated(ref_out / "checkpoints" / final, tmp_path / "theirs")
    _same_files(mine, theirs, ["model.safetensors", "items.safetensors"])


def test_elastic_restart_resumes_from_the_last_checkpoint_by_itself(tmp_path, shards, reference):
    _, ref = reference
    out = tmp_path / "elastic"
    cmd = torchrun_cmd(out, shards, *EXACT, torchrun_args=["--max-restarts=1"], train_args=["--resume", "auto"])
    code, log = _run_until(cmd, f"step {KILL_AT}/", _kill_rank_1)
    assert code == 0, log[-3000:]
    assert "no checkpoint in" in log  # the first attempt started fresh
    assert "resumed from" in log and "at step 16 (epoch 1, batch 2)" in log
    assert list(run_losses(out).values()) == ref["losses"]


def test_sigterm_saves_a_checkpoint_and_exits_within_the_deadline(tmp_path, shards):
    out = tmp_path / "preempted"
    overrides = [
        "schedule.epochs=50",
        "schedule.log_every=1",
        "data.num_workers=2",
        "checkpoint.preemption_deadline_s=30",
    ]
    sent = {}

    def preempt(proc):
        sent["at"] = time.time()
        proc.send_signal(signal.SIGTERM)  # as SLURM or Kubernetes would, to the launcher

    code, log = _run_until(torchrun_cmd(out, shards, *overrides), "step 10/", preempt)
    assert time.time() - sent["at"] < 30
    lines = [line for line in log.splitlines() if line.startswith("preempted (SIGTERM) at step ")]
    assert lines, log[-5000:]
    line = lines[0]
    step = int(line.split()[4].rstrip(":"))
    assert step >= 10 and "Traceback" not in log.split(line)[0][-2000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{step:09d}"
    run_cli("checkpoint", "list", out / "checkpoints", "--verify")
    resumed, log = torchrun_train(
        out, shards, *overrides, f"schedule.max_steps={step + 3}", train_args=["--resume", "auto"]
    )
    assert f"at step {step} " in log and resumed["steps"] == step + 3


def test_a_missed_preemption_deadline_leaves_no_checkpoint_behind(tmp_path, shards):
    out = tmp_path / "late"
    overrides = ["schedule.epochs=50", "schedule.log_every=1", "checkpoint.preemption_deadline_s=0.01"]
    code, log = _run_until(torchrun_cmd(out, shards, *overrides), "step 5/", lambda p: p.send_signal(signal.SIGTERM))
    assert code != 0
    assert "preemption deadline of 0.01 s passed before the checkpoint was complete" in log, log[-5000:]
    assert not (out / "checkpoints" / "latest").exists()


# -- resharding -----------------------------------------------------------------------------------

# Unshuffled and one worker per rank: 1 rank x batch 32 and 2 ranks x batch 16 see the same
# global batches (without length buckets, which sort each rank's samples apart), so continued
# training can be compared step by step across world sizes.
RESHARD = ["data.shuffle=false", "data.length_buckets=false", "data.num_workers=1", "schedule.log_every=100"]
TWO = ["data.batch_size=16"]
ONE = ["data.batch_size=32"]


def _reshard(tmp_path, shards, source, target, nproc_source, nproc_target):
    src = tmp_path / "source"
    first, _ = torchrun_train(src, shards, *RESHARD, *source, "schedule.epochs=1", nproc=nproc_source)
    checkpoint = src / "checkpoints" / "step_000000013"
    assert checkpoint.is_dir()

    # Loaded at the other size (and ZeRO stage 0), the checkpoint scores exactly as it did where
    # it was written.
    evaluated, log = torchrun_train(
        tmp_path / "evaluated", shards, *RESHARD, *target, "parallel.zero_stage=0", "schedule.epochs=1",
        nproc=nproc_target, train_args=["--resume", str(checkpoint)],
    )  # fmt: skip
    assert f"resharded from {nproc_source} to {nproc_target} ranks" in log
    assert evaluated["steps"] == 13
    for key, value in first["test"]["model"].items():
        assert evaluated["test"]["model"][key] == pytest.approx(value, abs=1e-6), key

    # Training goes on as it would have at the original size (weights and optimizer state carried).
    same, _ = torchrun_train(
        tmp_path / "same", shards, *RESHARD, *source, "schedule.epochs=2",
        nproc=nproc_source, train_args=["--resume", str(checkpoint)],
    )  # fmt: skip
    other, _ = torchrun_train(
        tmp_path / "other", shards, *RESHARD, *target, "schedule.epochs=2",
        nproc=nproc_target, train_args=["--resume", str(checkpoint)],
    )  # fmt: skip
    # Each continued run logs its own steps, 14 to 26.
    assert sorted(run_losses(tmp_path / "other")) == sorted(run_losses(tmp_path / "same")) == list(range(14, 27))
    np.testing.assert_allclose(other["losses"], same["losses"], rtol=1e-4)
    # Without the optimizer state the continued losses would drift far more than that.
    assert not np.allclose(same["losses"], first["losses"], rtol=1e-2)


def test_two_ranks_reshard_to_one_with_another_zero_stage_and_sharding(tmp_path, shards):
    source = [*TWO, "parallel.zero_stage=2", "parallel.sharding=row_wise"]
    target = [*ONE, "parallel.zero_stage=1", "parallel.sharding=table_wise"]
    _reshard(tmp_path, shards, source, target, 2, 1)


def test_one_rank_reshards_to_two_with_another_zero_stage_and_sharding(tmp_path, shards):
    source = [*ONE, "parallel.zero_stage=0", "parallel.sharding=row_wise"]
    target = [*TWO, "parallel.zero_stage=3", "parallel.sharding=table_wise"]
    _reshard(tmp_path, shards, source, target, 1, 2)


# -- consolidation and broken checkpoints -------------------------------------------------------------


@pytest.fixture(scope="module")
def stage0(tmp_path_factory, shards):
    """A 2-rank ZeRO stage 0 run (DeepSpeed's zero_to_fp32 cannot read stage 0) with checkpoints."""
    out = tmp_path_factory.mktemp("ckpt") / "stage0"
    summary, _ = torchrun_train(
        out, shards, "parallel.zero_stage=0", "schedule.epochs=1", "checkpoint.every_steps=5", "checkpoint.keep=2"
    )
    return out, summary


def test_retention_keeps_the_newest_and_the_best(stage0):
    out, summary = stage0
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_000000010", "step_000000013"]  # 5 pruned; 13 is the best and the newest
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000000013"


def test_consolidated_stage0_checkpoint_streams_the_table_and_evaluates_like_the_run(tmp_path, stage0):
    from safetensors.torch import load_file

    from train.saved_model import consolidate

    out, summary = stage0
    checkpoint = out / "checkpoints" / "step_000000013"
    model = _consolidated(checkpoint, tmp_path / "model")
    blocked = consolidate(checkpoint, tmp_path / "blocked", block_rows=7, log=lambda _: None)
    table = load_file(str(model / "items.safetensors"))["items"]
    assert table.shape == (82, 16)
    assert (blocked / "items.safetensors").read_bytes() == (model / "items.safetensors").read_bytes()
    # The run's best weights (step 13 is the best) are exactly the consolidated ones.
    best = load_file(str(out / "best" / "items.safetensors"))["items"]
    assert (table == best).all()
    assert (
        load_file(str(model / "model.safetensors")).keys() == load_file(str(out / "best" / "model.safetensors")).keys()
    )
    done = run_cli("eval", model)
    assert f"{summary['test']['model']['NDCG@10']:.4f}" in done.stdout


def _copy(stage0, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(stage0[0] / "checkpoints", root)
    return root


def test_broken_files_are_named(tmp_path, stage0):
    from train.checkpoint import CheckpointError, verify

    root = _copy(stage0, tmp_path)
    ckpt = root / "step_000000013"
    names = json.loads((ckpt / "meta.json").read_text())["files"]
    distcp = next(n for n in names if n.startswith("sparse/__1_"))
    data = (ckpt / distcp).read_bytes()
    (ckpt / distcp).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{distcp} is truncated or replaced"):
        verify(ckpt)
    (ckpt / distcp).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match=f"checksum mismatch in {distcp}"):
        verify(ckpt)
    (ckpt / distcp).write_bytes(data)
    verify(ckpt)
    (ckpt / "ranks" / "rank_00001.pt").unlink()
    with pytest.raises(CheckpointError, match="missing file ranks/rank_00001.pt"):
        verify(ckpt)
    (ckpt / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match="meta.json: not valid JSON"):
        verify(ckpt)
    done = run_cli("checkpoint", "consolidate", ckpt, "--out", tmp_path / "x", check=False)
    assert done.returncode == 2 and "not valid JSON" in done.stderr and "Traceback" not in done.stderr


def test_resume_auto_passes_over_a_broken_newest_checkpoint(tmp_path, stage0):
    from train.checkpoint import resolve

    root = _copy(stage0, tmp_path)
    (root / "step_000000013" / "dense.safetensors").write_bytes(b"garbage")
    said = []
    path, meta = resolve("auto", root, log=said.append)
    assert path.name == "step_000000010" and meta["progress"]["step"] == 10
    assert said and "step_000000013 is broken, trying the previous one" in said[0] and "dense.safetensors" in said[0]
    assert resolve("auto", tmp_path / "nothing-here") is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.hidden_size=32", "model.hidden_size is 16 in the checkpoint and 32 here"),
        ("model.backbone=gpt2", "model.backbone is 'llama' in the checkpoint and 'gpt2' here"),
        ("optim.sparse_optimizer=sgd", "optim.sparse_optimizer is 'rowwise_adagrad' in the checkpoint"),
    ],
)
def test_incompatible_config_is_refused_with_what_differs(stage0, override, message):
    from train.checkpoint import CheckpointError, check_compatible, read_meta
    from train.config import load_config

    out, _ = stage0
    meta = read_meta(out / "checkpoints" / "step_000000013")
    cfg = load_config(ROOT / "configs" / "debug.yaml", [f"data.shards={meta['config']['data']['shards']}", override])
    with pytest.raises(CheckpointError, match=message):
        check_compatible(meta, cfg, meta["vocab"], "ckpt")


def test_another_vocabulary_is_refused_on_the_command_line(tmp_path, stage0):
    out, _ = stage0
    other = tmp_path / "other"
    run_cli(
        "data", "prepare", "--source", "synthetic", "--users", 100, "--num-items", 40,
        "--events-per-user", 12, "--out", other, "--quiet",
    )  # fmt: skip
    done = run_cli(
        "train", "--config", "configs/debug.yaml", "--set", f"data.shards={other}",
        "--set", f"output.dir={tmp_path / 'run'}", "--resume", out / "checkpoints" / "step_000000013", check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "vocabulary differs: the checkpoint has 82 items" in done.stderr and "Traceback" not in done.stderr


def _gather_after_resume(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    import deepspeed
    import torch

    from train.checkpoint import DenseState
    from train.distributed import compute_cleanup, compute_init

    compute_init(seed=0)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}

    def engine():
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
        built, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(module.parameters()), config=config)
        return built, module

    trained, module = engine()
    trained.backward(trained(torch.randn(2, 8)).sum())
    trained.step()
    before = DenseState(trained, module, 2).gather()
    trained.save_checkpoint(f"{out}/ds", tag="t")
    resumed, module = engine()
    resumed.load_checkpoint(f"{out}/ds", tag="t")
    # No step in between: what a run preempted at an epoch's last batch does first on resuming.
    after = DenseState(resumed, module, 2).gather()
    torch.save({"before": before, "after": after}, f"{out}/rank{rank}.pt")
    compute_cleanup()


def test_a_zero2_checkpoint_right_after_a_resume_gathers_the_loaded_moments(tmp_path):
    import torch
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    mp.spawn(_gather_after_resume, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["before"].keys() == saved["after"].keys()
        assert any(k.startswith("exp_avg/") and v.abs().sum() > 0 for k, v in saved["after"].items())
        for key, value in saved["before"].items():
            torch.testing.assert_close(saved["after"][key], value, rtol=0, atol=0, msg=key)
