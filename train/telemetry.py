"""Training telemetry. Prometheus: one exporter per rank on 127.0.0.1:(base + global rank), so
several ranks (and several "nodes" on one host) never collide; port 0 turns it off. TensorBoard:
optional scalars written by rank 0. The run's per-step losses: ``LossLog``."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class PhaseTimer:
    """Wall time per step phase, summed; off unless schedule.time_phases (GPU timing needs syncs)."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device = enabled, device
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TrainingTelemetry:
    def __init__(self, base_port: int, rank: int, tensorboard_dir: str | None = None, host: str = "127.0.0.1"):
        self.registry = CollectorRegistry()
        labels = {"rank": str(rank)}
        r = self.registry
        self.tokens = Counter(
            "lmrec_train_tokens", "Training tokens (next-item targets) processed", ["rank"], registry=r
        ).labels(**labels)
        self.steps = Counter("lmrec_train_steps", "Optimizer steps taken", ["rank"], registry=r).labels(**labels)
        self.loss = Gauge("lmrec_train_loss", "Loss of the last step", ["rank"], registry=r).labels(**labels)
        self.lr = Gauge("lmrec_train_learning_rate", "Dense learning rate", ["rank"], registry=r).labels(**labels)
        self.step_seconds = Histogram(
            "lmrec_train_step_seconds", "Wall time of one training step", ["rank"], buckets=_STEP_BUCKETS, registry=r
        ).labels(**labels)
        self.data_seconds = Histogram(
            "lmrec_train_data_wait_seconds",
            "Time spent waiting for the next batch",
            ["rank"],
            buckets=_STEP_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.checkpoint_seconds = Histogram(
            "lmrec_train_checkpoint_seconds",
            "Wall time of one checkpoint save",
            ["rank"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        ).labels(**labels)
        self.eval_metric = Gauge(
            "lmrec_eval_metric", "Last evaluation result", ["rank", "split", "scorer", "metric"], registry=r
        )
        self.rank = str(rank)
        self.port = base_port + rank if base_port else 0
        if self.port:
            start_http_server(self.port, addr=host, registry=self.registry)
        self.board = None
        if tensorboard_dir and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(tensorboard_dir)
        self._step = 0

    def step(self, tokens: int, lr: float, step_seconds: float, data_seconds: float) -> None:
        """Host-side figures of one step (the loss follows at log steps: reading it syncs the device)."""
        self.tokens.inc(tokens)
        self.steps.inc()
        self.lr.set(lr)
        self.step_seconds.observe(step_seconds)
        self.data_seconds.observe(data_seconds)
        self._step += 1
        if self.board is not None:
            for tag, value in (("train/learning_rate", lr), ("train/step_seconds", step_seconds)):
                self.board.add_scalar(tag, value, self._step)

    def losses(self, first_step: int, values: list[float]) -> None:
        """The global losses of steps first_step, first_step + 1, ..."""
        if values:
            self.loss.set(values[-1])
        if self.board is not None:
            for offset, value in enumerate(values):
                self.board.add_scalar("train/loss", value, first_step + offset)

    def checkpoint(self, seconds: float) -> None:
        self.checkpoint_seconds.observe(seconds)

    def evaluation(self, result: dict) -> None:
        for scorer in ("model", "popularity"):
            for metric, value in result[scorer].items():
                self.eval_metric.labels(self.rank, result["split"], scorer, metric).set(value)
                if self.board is not None:
                    self.board.add_scalar(f"{result['split']}/{scorer}/{metric}", value, self._step)
        if self.board is not None:
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class LossLog:
    """Every step's global per-token loss, kept on the device until a log step, then reduced in
    one collective and appended to ``losses.jsonl`` (rank 0). A step between log steps thus
    costs no extra collective and no device sync. On resume the log is cut back to the
    checkpoint's step, so an interrupted and resumed run writes the same file as one that never
    stopped."""

    FILE = "losses.jsonl"

    def __init__(self, directory: Path, rank: int, world_size: int, window: int):
        self.path, self.rank, self.world_size = Path(directory) / self.FILE, rank, world_size
        self.pending: list[torch.Tensor] = []
        self.first_pending = 1  # the step of pending[0]
        self.recent: deque[float] = deque(maxlen=window)  # the last log window's losses, for the log line

    def start_at(self, step: int) -> None:
        """Training continues after ``step``: entries beyond it (work lost in a crash) go."""
        self.first_pending = step + 1
        if self.rank != 0:
            return
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def record(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach().reshape(()))

    def flush(self) -> tuple[int, list[float]]:
        """(first step, global losses) of the steps since the last flush (collective)."""
        first, pending = self.first_pending, self.pending
        self.pending, self.first_pending = [], first + len(pending)
        if not pending:
            return first, []
        summed = torch.stack(pending)
        if dist.is_initialized():
            dist.all_reduce(summed)
        values = [v / self.world_size for v in summed.tolist()]
        self.recent.extend(values)
        if self.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.writelines(json.dumps({"step": first + i, "loss": v}) + "\n" for i, v in enumerate(values))
        return first, values


def read_losses(directory: Path) -> list[float]:
    """The per-step losses of a run directory's losses.jsonl, in step order."""
    lines = (Path(directory) / LossLog.FILE).read_text().splitlines()
    return [entry["loss"] for entry in sorted((json.loads(line) for line in lines), key=lambda e: e["step"])]
