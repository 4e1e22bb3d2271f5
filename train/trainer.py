"""The Trainer: builds the parts (sharded item tables, the DeepSpeed engine around the dense
model, the loader, the loss from its objectives, the evaluator, the checkpoint manager), then
``train_step`` and ``train``. What happens after a step is the policy's (train.policy); how a
checkpoint is written and resumed is the manager's (train.checkpoint)."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist

from data.loader import LoaderConfig, iterate_epoch, make_loader
from data.shards import load_manifest, write_text_atomic
from model.config import RecommenderConfig
from model.items import RESERVED, SEMANTIC_TABLE, TOKEN_TABLE, item_tables
from model.modeling import SequenceRecommender
from model.semantic import CodeTrie
from train.checkpoint import (
    BLOCK_ROWS,
    CheckpointManager,
    DataPosition,
    DenseState,
    Preemption,
    TableState,
    checkpoint_name,
)
from train.compile import compile_dense_blocks
from train.config import Config, ConfigError
from train.distributed import ComputeEnv
from train.embeddings import ItemEmbeddings
from train.evaluate import Evaluator, metrics_table
from train.items import load_catalog, model_vocab, positive_actions
from train.objectives import LossNormaliser, ObjectiveContext, StepBatch, StepItems, build_loss, choose_main
from train.policy import Decision, StepPolicy, StepSignals, TrainState
from train.pretrained import Pretrained, init_model
from train.saved_model import write_saved_model
from train.telemetry import LossLog, PhaseTimer, TrainingTelemetry


def check_data(cfg: Config, manifest: dict) -> None:
    """Everything about the shards that can be wrong, before any model or process group work."""
    counts = manifest["counts"]["samples_per_split"]
    for split in ("train", "valid", "test"):
        if counts.get(split, 0) == 0:
            raise ConfigError(f"{cfg.data.shards}: the {split} split is empty; training needs all three")
    if manifest["vocab"]["items"] <= RESERVED:
        raise ConfigError(f"{cfg.data.shards}: the item vocabulary is empty")
    if cfg.model.uses_text and not manifest.get("text"):
        raise ConfigError(
            f"model.item_text / item_text_tokens need item text features; {cfg.data.shards} was prepared without "
            "--item-text"
        )
    if cfg.model.uses_semantic_ids and not manifest.get("semantic_ids"):
        raise ConfigError(
            f"model.item_semantic_ids / semantic_id_head need semantic IDs; give {cfg.data.shards}'s items codes with "
            f"`lmrec data semantic-ids {cfg.data.shards}`"
        )
    if cfg.model.action_head and "action" not in manifest["features"]:
        raise ConfigError(f"model.action_head needs actions (event types or ratings), and {cfg.data.shards} has none")


def assert_disjoint(dense_parameters, sparse_parameters) -> None:
    """DeepSpeed must hold no TorchRec parameter: it would broadcast rank 0's shard over the
    other ranks' shards."""
    dense = {id(p) for p in dense_parameters}
    shared = [p for p in sparse_parameters if id(p) in dense]
    if shared:
        raise RuntimeError(f"DeepSpeed holds {len(shared)} TorchRec parameter(s); the item table must stay outside it")


def _lr_lambda(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    def __init__(self, cfg: Config, env: ComputeEnv, pretrained: Pretrained | None = None):
        import deepspeed

        self.cfg, self.env = cfg, env
        self.out = Path(cfg.output.dir)
        manifest = load_manifest(cfg.data.shards)
        check_data(cfg, manifest)
        text = manifest.get("text") if cfg.model.uses_text else None
        semantic = manifest.get("semantic_ids") if cfg.model.uses_semantic_ids else None
        self.model_config = RecommenderConfig.build(cfg.model, model_vocab(manifest, cfg.model), text, semantic)
        self.num_items = self.model_config.num_items
        if cfg.loss.main == "auto":
            # Resolved once, here, so that checkpoints and metrics record the objective that ran.
            cfg.loss.main = choose_main(cfg.loss, self.num_items, env.world_size, cfg.parallel.sharding)
            self.log(f"loss.main auto: {cfg.loss.main} ({self.num_items:,} items, {env.world_size} ranks)")
        self.catalog = load_catalog(
            cfg.data.shards, self.num_items, with_text=cfg.model.uses_text, with_semantic=cfg.model.uses_semantic_ids
        )
        self.tables = ItemEmbeddings(
            item_tables(self.model_config),
            env,
            cfg.parallel.sharding,
            cfg.optim.sparse_optimizer,
            cfg.optim.sparse_lr,
            cfg.schedule.seed,
            cfg.parallel.table_dtype,
        )
        torch.manual_seed(cfg.schedule.seed)
        model = SequenceRecommender(self.model_config)
        if pretrained is not None:
            init_model(model, self.tables, pretrained, cfg, self.log)
        if cfg.parallel.compile:
            compile_dense_blocks(model.backbone, self.log, env.device)
        self.train_data, self.train_loader = make_loader(
            cfg.data.shards,
            LoaderConfig(
                split="train",
                batch_size=cfg.data.batch_size,
                max_len=cfg.model.max_len,
                seed=cfg.schedule.seed,
                num_workers=cfg.data.num_workers,
                shuffle=cfg.data.shuffle,
                shuffle_buffer=cfg.data.shuffle_buffer,
                length_buckets=cfg.data.length_buckets,
            ),
            env.rank,
            env.world_size,
        )
        self.steps_per_epoch = len(self.train_data)
        total = self.steps_per_epoch * cfg.schedule.epochs
        if cfg.schedule.max_steps:
            total = min(total, cfg.schedule.max_steps)
        self.total_steps = total
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio)
        )
        # The dense model alone: TorchRec's parameters must never reach DeepSpeed.
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=cfg.deepspeed_config()
        )
        self.model = model
        self.check_parameter_ownership()
        num_actions = self.model_config.num_actions
        self.positive_action = positive_actions(cfg.data.shards, num_actions, cfg.loss.positive_action_min)
        self.loss_fn = build_loss(
            ObjectiveContext(
                cfg=cfg.loss,
                model=model,
                tables=self.tables,
                catalog=self.catalog,
                positive_action=self.positive_action,
                num_items=self.num_items,
                device=env.device,
                group=dist.group.WORLD if dist.is_initialized() else None,
            )
        )
        trie = (
            CodeTrie.build(self.catalog.semantic_codes, self.model_config.level_sizes) if model.code_decoder else None
        )
        self.evaluator = Evaluator(
            cfg.data.shards, cfg, self.catalog.counts, self.positive_action, env.rank, env.world_size, env.device, trie
        )
        self.state = TrainState()
        self.normaliser = LossNormaliser(cfg.loss.normaliser, env.device)
        self.best_checkpoint: Path | None = None
        self.policy = StepPolicy(cfg.schedule, cfg.checkpoint, self.steps_per_epoch)
        self.signals = StepSignals(env.device)
        self.checkpointer = CheckpointManager(
            cfg.checkpoint_dir,
            cfg.checkpoint.keep,
            dense=DenseState(self.engine, model, cfg.parallel.zero_stage),
            tables=TableState(self.tables),
            data=DataPosition(self.train_data, self.state, self._data_signature()),
            states={"progress": self.state, "loss_normaliser": self.normaliser},
            describe={
                "config": cfg.to_dict(),
                "vocab": self.model_config.vocab,
                "text": text,
                "semantic_ids": self.model_config.semantic_ids,
                "precision": cfg.parallel.precision,
                "sharding": cfg.parallel.sharding,
            },
            rank=env.rank,
            world_size=env.world_size,
            seed=cfg.schedule.seed,
            log=self.log,
        )
        self.losses = LossLog(self.out, env.rank, env.world_size, cfg.schedule.log_every)
        self.preemption = Preemption(cfg.checkpoint.preemption_deadline_s)
        self.timer = PhaseTimer(cfg.schedule.time_phases, env.device)
        board = str(self.out / "tensorboard") if cfg.output.tensorboard else None
        self.telemetry = TrainingTelemetry(cfg.output.metrics_port, env.rank, board, cfg.output.metrics_host)

    def check_parameter_ownership(self) -> None:
        dense = list(self.engine.parameters()) + [p for g in self.engine.optimizer.param_groups for p in g["params"]]
        assert_disjoint(dense, self.tables.parameters())

    def _data_signature(self) -> dict:
        """What the data position depends on: with any of it changed, the saved position means
        nothing and the data restarts at an epoch boundary."""
        data, model = self.cfg.data, self.cfg.model
        signature = {
            "world_size": self.env.world_size,
            "batch_size": data.batch_size,
            "num_workers": data.num_workers,
            "shuffle": data.shuffle,
            "shuffle_buffer": data.shuffle_buffer,
            "seed": self.cfg.schedule.seed,
            "max_len": model.max_len,
            "steps_per_epoch": self.steps_per_epoch,
        }
        if data.length_buckets:  # absent from checkpoints written before bucketing existed
            signature["length_buckets"] = True
        return signature

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    # -- one step ------------------------------------------------------------------------------

    def train_step(self, batch: dict) -> None:
        """One optimizer step. Its only lmrec collective is the loss normaliser's all-reduce (which
        also carries the stop signals), and nothing waits for the device: the loss is read at
        the next log step."""
        self.engine.train()
        step = self._step_batch(batch)
        samples = self.loss_fn.sample(step)
        items = self._lookup(step, samples)
        self.timer.mark("sparse")
        actions = batch["actions"][:, :-1].to(self.env.device) if "actions" in batch else None
        gaps = batch["gaps"][:, :-1].to(self.env.device) if "gaps" in batch else None
        hidden = self.engine(items(step.inputs), step.input_lengths, actions, gaps)[step.positions].float()
        self.timer.mark("dense_forward")
        loss = self.loss_fn(step, hidden, items, samples)
        self.timer.mark("loss")
        self.engine.backward(loss)  # also the item tables' fused optimizer update
        self.timer.mark("backward")
        self.engine.step()
        self.timer.mark("optimizer")
        self.state.step += 1
        # Logged as the step's per-token mean, whatever the normaliser.
        self.losses.record(loss * step.total / step.weight_share.clamp(min=1e-12))

    def _step_batch(self, batch: dict) -> StepBatch:
        device = self.env.device
        items = batch["items"].to(device)
        lengths = batch["lengths"].to(device)
        inputs, targets = items[:, :-1], items[:, 1:]
        input_lengths = (lengths - 1).clamp(min=0)
        positions = torch.arange(inputs.shape[1], device=device)[None, :] < input_lengths[:, None]
        weights = batch["weights"].to(device)[:, None].expand_as(positions)[positions]
        schedule = self.cfg.schedule
        out_of_time = bool(schedule.max_minutes) and self.state.elapsed_seconds > 60 * schedule.max_minutes
        weight_sum = self.signals.reduce(weights.sum(), self.preemption.requested, out_of_time)
        total = self.normaliser(weight_sum) / self.env.world_size
        next_actions = batch["actions"][:, 1:].to(device)[positions] if "actions" in batch else None
        share = weight_sum / self.env.world_size
        return StepBatch(inputs, input_lengths, positions, targets[positions], weights, total, next_actions, share)

    def _lookup(self, step: StepBatch, samples: list) -> StepItems:
        """The vectors of every item the step scores, in one lookup (one collective)."""
        if self.loss_fn.needs_all_items:
            return StepItems(self.item_vectors(torch.arange(self.num_items)))
        targets = [step.targets] if self.loss_fn.scores_targets else []
        wanted = [step.inputs.reshape(-1), *targets, *self.loss_fn.extra_items(samples)]
        ids = torch.unique(torch.cat(wanted))
        return StepItems(self.item_vectors(ids), ids)

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """The vectors of items ``ids`` (model.items). Collective: every rank calls it."""
        return self.model.item_encoder(ids, self.tables, self.catalog)

    # -- evaluation, checkpoints, the saved model ---------------------------------------------------

    def evaluate(self, split: str, ranks_out: Path | None = None) -> dict:
        self.engine.eval()
        return self.evaluator(self.engine, self.model, self.item_vectors, split, ranks_out)

    def save_checkpoint(self) -> Path:
        started = time.perf_counter()
        path = self.checkpointer.save(self.state.step, self.state.best_step)
        self.telemetry.checkpoint(time.perf_counter() - started)
        self.log(f"checkpoint {path} ({time.perf_counter() - started:.1f} s)")
        return path

    def resume(self, spec: str) -> None:
        """``--resume auto|PATH`` (see CheckpointManager.resume)."""
        path = self.checkpointer.resume(spec, self.cfg, self.model_config.vocab)
        if path is not None and self.state.best_step >= 0:
            # Resumed from another run's checkpoints, its best weights are still there.
            self.best_checkpoint = path.parent / checkpoint_name(self.state.best_step)

    def save_model(self, directory: Path, training: dict) -> None:
        """The current weights as a saved model (all ranks take part; rank 0 writes)."""
        import deepspeed

        tokens = self.tables.full(TOKEN_TABLE) if self.cfg.model.item_text_tokens else None
        code_table = self.tables.full(SEMANTIC_TABLE) if self.cfg.model.item_semantic_ids else None
        # Where the vectors are the ID rows themselves, they are stored in the table's dtype.
        half = self.cfg.parallel.table_dtype == "fp16" and not self.model_config.architecture.composed

        @torch.no_grad()
        def rows(start: int, stop: int) -> torch.Tensor:  # collective
            block = self.item_vectors(torch.arange(start, stop))
            return block.half() if half else block

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.parallel.zero_stage == 3):
            # A copy on the writing rank only: at 10^9 parameters another rank's copy is 4 GB.
            dense = (
                {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}
                if self.env.is_main
                else None
            )
        # The table streams in blocks, never whole on a rank; the other ranks take part in each
        # block's lookup in the order write_saved_model asks for them (BLOCK_ROWS from row 0).
        if self.env.is_main:
            write_saved_model(directory, self.model_config, dense, rows, tokens, training, BLOCK_ROWS, code_table)
        else:
            for start in range(0, self.num_items, BLOCK_ROWS):
                rows(start, min(self.num_items, start + BLOCK_ROWS))

    # -- the loop ------------------------------------------------------------------------------

    def _agree(self, flag: bool) -> bool:
        """True on every rank if any rank says so (outside steps: after evaluations and checkpoints)."""
        if not dist.is_initialized() or self.env.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.env.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def train(self) -> dict:
        self.losses.start_at(self.state.step)
        with self.preemption:
            finished = self._train_loop()
        # The training phase's memory: its high-water mark (Linux: KiB; it includes building the
        # whole dense model on every rank before DeepSpeed partitions it) and what the rank holds
        # once trained, before the final evaluation and the saved model.
        self.rss_bytes = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            psutil.Process().memory_info().rss,
        )
        if not finished:
            self.telemetry.close()
            return {"preempted": True, "steps": self.state.step}
        return self._finish()

    def _train_loop(self) -> bool:
        """Trains until the policy stops; False when stopped by preemption (checkpoint saved)."""
        state = self.state
        started = time.perf_counter() - state.elapsed_seconds
        decision = self.policy.at_start(state)
        if not self._act(decision):
            return False
        while not (decision.stop or state.stopped_early):
            epoch = state.epoch
            self.timer.mark("evaluation")
            waited_from = time.perf_counter()
            for batch in iterate_epoch(self.train_data, self.train_loader, epoch, skip=state.batch):
                self.timer.mark("data")
                step_from = time.perf_counter()
                self.train_step(batch)
                state.batch += 1
                step_tokens = int(np.maximum(batch["lengths"].numpy() - 1, 0).sum())
                state.tokens += step_tokens
                done = time.perf_counter()
                self.telemetry.step(step_tokens, self.engine.get_lr()[0], done - step_from, step_from - waited_from)
                state.training_seconds += done - waited_from
                state.elapsed_seconds = done - started
                decision = self.policy.after_step(state, *self.signals.agreed())
                if not self._act(decision):
                    return False
                if decision.end_of_epoch or decision.stop or state.stopped_early:
                    break
                waited_from = time.perf_counter()
            else:
                raise RuntimeError(
                    f"the loader ended epoch {epoch} after {state.batch} of {self.steps_per_epoch} batches"
                )
        return True

    def _act(self, decision: Decision) -> bool:
        """Carries out a decision; False when the run stopped for preemption."""
        state = self.state
        if decision.log or decision.evaluate or decision.checkpoint or decision.preempt:
            first, values = self.losses.flush()
            state.loss_sum, state.loss_steps = state.loss_sum + math.fsum(values), state.loss_steps + len(values)
            self.telemetry.losses(first, values)
        if decision.log:
            self._log_step(state.epoch)
        if decision.preempt:
            self._save_on_preemption()
            return False
        if decision.end_of_epoch:
            state.epoch, state.batch = state.epoch + 1, 0
        if decision.evaluate:
            self._validate(state.epoch - 1 if decision.end_of_epoch else state.epoch)
        if decision.checkpoint:
            self.save_checkpoint()
        if (decision.evaluate or decision.checkpoint) and self._agree(self.preemption.requested):
            self._save_on_preemption()
            return False
        return True

    def _log_step(self, epoch: int) -> None:
        state = self.state
        eta = state.elapsed_seconds / max(state.step, 1) * (self.total_steps - state.step)
        tokens_per_s = state.tokens * self.env.world_size / max(state.training_seconds, 1e-9)
        self.log(
            f"step {state.step}/{self.total_steps} epoch {epoch} loss {np.mean(self.losses.recent):.4f} "
            f"lr {self.engine.get_lr()[0]:.2e} tokens/s {tokens_per_s:,.0f} eta {eta:,.0f}s"
        )

    def _validate(self, epoch: int) -> None:
        state = self.state
        result = self.evaluate("valid")
        self.telemetry.evaluation(result)
        ndcg = result["model"]["NDCG@10"]
        train_loss = state.loss_sum / state.loss_steps if state.loss_steps else None
        state.history.append(
            {
                "epoch": epoch,
                "step": state.step,
                "training_seconds": round(state.training_seconds, 1),
                "train_loss": train_loss,
                "valid": result,
            }
        )
        state.loss_sum, state.loss_steps = 0.0, 0
        state.evaluated_step = state.step
        self.log(
            f"epoch {epoch} valid NDCG@10 {ndcg:.4f} HR@10 {result['model']['HR@10']:.4f} "
            f"(popularity {result['popularity']['NDCG@10']:.4f})"
        )
        if ndcg > state.best_ndcg:
            state.best_ndcg, state.best_step, state.stale = ndcg, state.step, 0
            self.best_checkpoint = self.checkpointer.root / checkpoint_name(state.step)
        else:
            state.stale += 1
            if state.stale >= self.cfg.schedule.patience:
                self.log(f"early stop: no better validation NDCG@10 for {state.stale} evaluations")
                state.stopped_early = True

    def _save_on_preemption(self) -> None:
        started = time.perf_counter()
        path = self.save_checkpoint()
        self.log(
            f"preempted (SIGTERM) at step {self.state.step}: checkpoint {path} saved in "
            f"{time.perf_counter() - started:.1f} s; continue with --resume auto"
        )

    def _finish(self) -> dict:
        cfg, state = self.cfg, self.state
        if state.best_step >= 0 and state.best_step != state.step:
            self.checkpointer.load_weights(self.best_checkpoint)
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        test = self.evaluate("test", ranks_out=self.out / "test_ranks.npz")
        self.telemetry.evaluation(test)
        training = {"config": cfg.to_dict(), "step": state.step, "best_valid_ndcg10": state.best_ndcg, "test": test}
        self.save_model(self.out / "best", training)
        memory = torch.zeros(self.env.world_size, 2, dtype=torch.float64, device=self.env.device)
        memory[self.env.rank] = torch.tensor(self.rss_bytes, dtype=torch.float64)
        if dist.is_initialized() and self.env.world_size > 1:
            dist.all_reduce(memory)
        peak_mib, held_mib = (memory / 2**20).round().long().T.tolist()
        summary = {
            "config": cfg.to_dict(),
            "world_size": self.env.world_size,
            "training_peak_rss_mib_per_rank": peak_mib,
            "trained_rss_mib_per_rank": held_mib,
            "steps": state.step,
            "train_seconds": round(state.elapsed_seconds, 1),
            "tokens_per_s": round(state.tokens * self.env.world_size / max(state.training_seconds, 1e-9)),
            "training_seconds": round(state.training_seconds, 1),
            "best_valid_ndcg10": state.best_ndcg,
            "history": state.history,
            "phase_seconds": {k: round(v, 3) for k, v in self.timer.seconds.items()},
            "test": test,
        }
        self.telemetry.close()
        if self.env.is_main:
            # The run's completion record: never half written.
            write_text_atomic(self.out / "metrics.json", json.dumps(summary, indent=2, default=float))
            print(metrics_table(test))
        if dist.is_initialized():
            dist.barrier()
        return summary
