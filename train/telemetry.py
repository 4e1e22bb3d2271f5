"""Training telemetry. Prometheus: one exporter per rank on 127.0.0.1:(base + global rank), so
several ranks (and several "nodes" on one host) never collide; port 0 turns it off. TensorBoard:
optional scalars written by rank 0."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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

    def step(self, tokens: int, loss: float, lr: float, step_seconds: float, data_seconds: float) -> None:
        self.tokens.inc(tokens)
        self.steps.inc()
        self.loss.set(loss)
        self.lr.set(lr)
        self.step_seconds.observe(step_seconds)
        self.data_seconds.observe(data_seconds)
        self._step += 1
        if self.board is not None:
            for tag, value in (("train/loss", loss), ("train/learning_rate", lr), ("train/step_seconds", step_seconds)):
                self.board.add_scalar(tag, value, self._step)

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
