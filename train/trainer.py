"""The Trainer: builds the sharded item table, the DeepSpeed engine and the loaders; then
``train_step``, ``evaluate`` and ``train`` (early stopping on validation NDCG@10, the test split
scored once with the best validation weights)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.loader import LoaderConfig, iterate_epoch, make_loader, slot_positions
from data.shards import load_manifest
from model.losses import RESERVED, full_softmax_loss, in_batch_loss, sampled_softmax_loss, weighted_mean
from model.modeling import SequenceRecommender
from train.checkpoint import (
    Checkpointer,
    CheckpointError,
    Preemption,
    Progress,
    TrainingParts,
    check_compatible,
    check_dense,
    checkpoint_name,
    resolve,
)
from train.config import Config, ConfigError
from train.distributed import ComputeEnv
from train.embeddings import ItemEmbeddings, token_bags
from train.evaluate import evaluate, load_item_text, load_popularity, metrics_table, positive_actions, save_model
from train.pretrained import Pretrained, init_model
from train.telemetry import TrainingTelemetry


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


class Trainer:
    def __init__(self, cfg: Config, env: ComputeEnv, pretrained: Pretrained | None = None):
        import deepspeed

        self.cfg, self.env = cfg, env
        self.out = Path(cfg.output.dir)
        self.manifest = load_manifest(cfg.data.shards)
        check_data(cfg, self.manifest)
        vocab, features = self.manifest["vocab"], self.manifest["features"]
        self.num_items = vocab["items"]
        self.text = load_item_text(cfg.data.shards, self.num_items) if cfg.model.uses_text else None
        self.items = ItemEmbeddings(
            self.num_items,
            cfg.model.hidden_size,
            env,
            cfg.parallel.sharding,
            cfg.optim.sparse_optimizer,
            cfg.optim.sparse_lr,
            cfg.schedule.seed,
            self.text.buckets if cfg.model.item_text_tokens else 0,
        )
        torch.manual_seed(cfg.schedule.seed)
        num_actions = vocab["actions"] if "action" in features else 0
        num_gaps = vocab["gaps"] if "gap" in features else 0
        text_dim = int(self.text.spec["encoder"]["dim"]) if self.text else 0
        model = SequenceRecommender(cfg.model, num_actions, num_gaps, text_dim)
        self.model_vocab = {"items": self.num_items, "actions": num_actions, "gaps": num_gaps, "text_dim": text_dim}
        if pretrained is not None:
            init_model(model, self.items, pretrained, self.log)
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
        self.popularity = counts = load_popularity(cfg.data.shards, self.num_items)
        # Items without training events (held-out or new ones) have no trained ID embedding, and
        # are no training candidates: the catalog being trained on is the items seen in training.
        self.has_id = counts > 0
        self.positive_action = positive_actions(cfg.data.shards, num_actions, cfg.model.positive_action_min)
        # Sampled-softmax proposal: uniform over real items, or popularity (count + 1).
        weights = torch.ones(self.num_items) if cfg.model.negative_sampler == "uniform" else counts.float() + 1.0
        weights[:RESERVED] = 0.0
        weights[~self.has_id] = 0.0
        self.proposal = weights / weights.sum()
        self.progress = Progress()
        self.parts = TrainingParts(self.engine, model, self.items, cfg.parallel.zero_stage, env.rank, env.world_size)
        self.checkpoints = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep, self.parts)
        self.best_path: Path | None = None
        self.preemption = Preemption(cfg.checkpoint.preemption_deadline_s)
        self.timer = PhaseTimer(cfg.schedule.time_phases, env.device)
        board = str(self.out / "tensorboard") if cfg.output.tensorboard else None
        self.telemetry = TrainingTelemetry(cfg.output.metrics_port, env.rank, board, cfg.output.metrics_host)

    def check_parameter_ownership(self) -> None:
        dense = list(self.engine.parameters()) + [p for g in self.engine.optimizer.param_groups for p in g["params"]]
        assert_disjoint(dense, self.items.parameters())

    # -- one step ------------------------------------------------------------------------------

    def train_step(self, batch: dict) -> float:
        cfg, device, timer = self.cfg.model, self.env.device, self.timer
        self.engine.train()
        items = batch["items"].to(device)
        lengths = batch["lengths"].to(device)
        inputs, targets = items[:, :-1], items[:, 1:]
        input_lengths = (lengths - 1).clamp(min=0)
        positions = torch.arange(inputs.shape[1], device=device)[None, :] < input_lengths[:, None]
        weights = batch["weights"].to(device)[:, None].expand_as(positions)[positions]
        target = targets[positions]
        total = self._global_weight(weights)
        if cfg.loss == "full":
            # One lookup of the whole catalog serves as inputs and as softmax targets.
            table = self.item_vectors(torch.arange(self.num_items))
            input_embeddings = table[inputs]
        else:
            wanted = [inputs.reshape(-1), target]
            if cfg.loss == "sampled":
                negatives = torch.multinomial(self.proposal, cfg.num_negatives, replacement=True).to(device)
                wanted.append(negatives)
            unique = torch.unique(torch.cat(wanted))
            vectors = self.item_vectors(unique)

            def embed(ids):
                return vectors[torch.searchsorted(unique, ids)]

            input_embeddings = embed(inputs)
        timer.mark("sparse")
        actions = batch["actions"][:, :-1].to(device) if "actions" in batch else None
        gaps = batch["gaps"][:, :-1].to(device) if "gaps" in batch else None
        hidden = self.engine(input_embeddings, input_lengths, actions, gaps)[positions].float()
        timer.mark("dense_forward")
        if cfg.loss == "full":
            candidates = self.has_id.to(device)
            loss = full_softmax_loss(self.model.scores(hidden, table), target, weights, total, candidates)
        elif cfg.loss == "sampled":
            log_q = torch.log(self.proposal.to(device) * cfg.num_negatives)
            positive = self.model.pair_scores(hidden, embed(target))
            negative = self.model.scores(hidden, embed(negatives))
            loss = sampled_softmax_loss(
                positive, negative, target, negatives, log_q[target], log_q[negatives], weights, total
            )
        else:
            log_q = torch.log(self.popularity.float().to(device) + 1.0)
            loss = in_batch_loss(self.model.scores(hidden, embed(target)), target, log_q[target], weights, total)
        if self.model.action_head is not None:
            labels = self.positive_action[batch["actions"][:, 1:].to(device)[positions]].float()
            next_vectors = table[target] if cfg.loss == "full" else embed(target)
            logits = self.model.action_logits(hidden, next_vectors)
            action_loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            loss = loss + cfg.action_loss_weight * weighted_mean(action_loss, weights, total)
        timer.mark("loss")
        self.engine.backward(loss)  # also the item table's fused optimizer update
        timer.mark("backward")
        self.engine.step()
        timer.mark("optimizer")
        self.progress.step += 1
        self.progress.losses.append(self._global_mean(loss.detach()))
        return self.progress.losses[-1]

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """The vectors of items ``ids`` (1-D, on CPU) from their enabled parts: sharded ID rows,
        projected text vectors, pooled sharded text-token rows. Collective: every rank calls it."""
        cfg, device = self.cfg.model, self.env.device
        id_part = self.items.lookup(ids) if cfg.item_id else None
        if not cfg.uses_text:
            return id_part
        text = self.text.vectors[ids].to(device) if cfg.item_text else None
        tokens = (
            self.items.pool_tokens(*token_bags(self.text.token_offsets, self.text.token_ids, ids))
            if cfg.item_text_tokens
            else None
        )
        has_id = self.has_id[ids]
        if cfg.item_id_dropout and torch.is_grad_enabled():
            # The global generator: its state is in every checkpoint, so resuming stays exact.
            keep = torch.rand(len(ids)) >= cfg.item_id_dropout
            has_id = has_id & keep
        return self.model.item_encoder(id_part, text, tokens, has_id.to(device))

    def full_table(self) -> torch.Tensor:
        """Every item's vector on every rank (evaluation and the saved model score against it)."""
        with torch.no_grad():
            return self.item_vectors(torch.arange(self.num_items))

    def _global_weight(self, weights: torch.Tensor) -> torch.Tensor:
        """All ranks' weight (target token) sum over the world size: the loss normaliser."""
        total = weights.sum().detach().reshape(1)
        if dist.is_initialized():
            dist.all_reduce(total)
        return total[0] / self.env.world_size

    def _global_mean(self, loss: torch.Tensor) -> float:
        """The global per-token loss of this step: the mean of the ranks' losses."""
        value = loss.reshape(1).clone()
        if dist.is_initialized():
            dist.all_reduce(value)
        return float(value[0]) / self.env.world_size

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, split: str, ranks_out: Path | None = None) -> dict:
        self.engine.eval()
        return evaluate(
            self.engine,
            self.model,
            self.full_table(),
            self.popularity,
            self.cfg.data.shards,
            split,
            self.cfg,
            self.env.rank,
            self.env.world_size,
            self.env.device,
            self.positive_action,
            ranks_out,
        )

    def save_best(self, directory: Path, meta: dict) -> None:
        """Writes the current weights (all ranks take part; rank 0 writes)."""
        import deepspeed

        table = self.full_table()
        tokens = self.items.token_table() if self.cfg.model.item_text_tokens else None
        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.parallel.zero_stage == 3):
            dense = {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}
        if self.env.is_main:
            save_model(directory, dense, table, meta, tokens)

    # -- checkpoints -----------------------------------------------------------------------------

    def _data_signature(self) -> dict:
        """What the data position depends on: with any of it changed, the saved position means
        nothing and the data restarts at an epoch boundary."""
        data, model = self.cfg.data, self.cfg.model
        return {
            "world_size": self.env.world_size,
            "batch_size": data.batch_size,
            "num_workers": data.num_workers,
            "shuffle": data.shuffle,
            "shuffle_buffer": data.shuffle_buffer,
            "seed": self.cfg.schedule.seed,
            "max_len": model.max_len,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def save_checkpoint(self) -> Path:
        p = self.progress
        meta = {
            "config": self.cfg.to_dict(),
            "vocab": self.model_vocab,
            "text": self.text.spec if self.text else None,
            "precision": self.cfg.parallel.precision,
            "sharding": self.cfg.parallel.sharding,
            "data_signature": self._data_signature(),
            "scheduler": self.engine.lr_scheduler.state_dict(),
        }
        position = {"epoch": p.epoch, "batch": p.batch, "slots": slot_positions(self.train_data, p.epoch, p.batch)}
        started = time.perf_counter()
        path = self.checkpoints.save(p, meta, position)
        self.telemetry.checkpoint(time.perf_counter() - started)
        self.log(f"checkpoint {path} ({time.perf_counter() - started:.1f} s)")
        return path

    def resume(self, spec: str) -> None:
        """``--resume auto|PATH``: continue from a checkpoint, exactly when the topology and data
        settings are unchanged, otherwise converted (resharded) with the data restarting at the
        next epoch boundary."""
        cfg, env = self.cfg, self.env
        found = resolve(spec, cfg.checkpoint_dir, env.rank, env.world_size, self.log)
        if found is None:
            self.log(f"no checkpoint in {cfg.checkpoint_dir}; starting from scratch")
            return
        path, meta = found
        for change in check_compatible(meta, cfg, self.model_vocab, str(path)):
            self.log(f"resuming with a changed setting: {change}")
        check_dense(path, self.model)
        same_dense = (meta["world_size"], meta["zero_stage"], meta["precision"]) == (
            env.world_size,
            cfg.parallel.zero_stage,
            cfg.parallel.precision,
        )
        same_data = meta["data_signature"] == self._data_signature()
        self.checkpoints.load(path, meta, convert_dense=not same_dense)
        p = self.progress = Progress(**meta["progress"])
        if p.best_step >= 0:
            self.best_path = path.parent / checkpoint_name(p.best_step)
        message = f"resumed from {path} at step {p.step} (epoch {p.epoch}, batch {p.batch})"
        if not same_dense or (meta["world_size"], meta["sharding"]) != (env.world_size, cfg.parallel.sharding):
            message += (
                f", resharded from {meta['world_size']} to {env.world_size} ranks (ZeRO stage {meta['zero_stage']} -> "
                f"{cfg.parallel.zero_stage}, {meta['precision']} -> {cfg.parallel.precision}, table {meta['sharding']} "
                f"-> {cfg.parallel.sharding})"
            )
        if same_data:
            state = self.checkpoints.rank_state(path)
            expected = slot_positions(self.train_data, p.epoch, p.batch)
            if {int(k): v for k, v in state["data"]["slots"].items()} != expected:
                raise CheckpointError(f"{path}: saved data position {state['data']['slots']} != {expected}")
            self.checkpoints.restore_rng(state)
            self.log(message)
            return
        # Another world size or loader: RNG streams and data positions have no counterpart.
        torch.manual_seed(cfg.schedule.seed * 1_000_003 + p.step * 1_009 + env.rank)
        np.random.seed((cfg.schedule.seed, p.step, env.rank))
        if p.batch:
            p.epoch, p.batch = p.epoch + 1, 0
        before = meta["data_signature"]
        self.log(
            f"{message}; the data settings changed ({before['world_size']} ranks x batch {before['batch_size']} x "
            f"{before['num_workers']} workers -> {env.world_size} x {cfg.data.batch_size} x {cfg.data.num_workers}), "
            f"so the data restarts at the next epoch boundary: epoch {p.epoch}"
        )

    # -- the loop ------------------------------------------------------------------------------

    def _agree(self, *flags: bool) -> list[bool]:
        """Each flag true on every rank if any rank says so: ranks' clocks and signals differ,
        their steps must not."""
        if not dist.is_initialized() or self.env.world_size == 1:
            return [bool(f) for f in flags]
        value = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.env.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return [bool(v) for v in value.tolist()]

    def log(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    def _out_of_steps(self) -> bool:
        return bool(self.cfg.schedule.max_steps) and self.progress.step >= self.cfg.schedule.max_steps

    def train(self) -> dict:
        with self.preemption:
            preempted = self._train_epochs()
        if preempted:
            self.telemetry.close()
            return {"preempted": True, "steps": self.progress.step}
        return self._finish()

    def _train_epochs(self) -> bool:
        """Trains until the schedule ends; True when stopped by preemption (checkpoint saved)."""
        cfg, p = self.cfg, self.progress
        started = time.perf_counter() - p.elapsed_seconds
        every = cfg.checkpoint.every_steps
        while p.epoch < cfg.schedule.epochs and not p.stopped_early:
            epoch, stop = p.epoch, self._out_of_steps()
            self.timer.mark("evaluation")
            waited_from = time.perf_counter()
            batches = iterate_epoch(self.train_data, self.train_loader, epoch, skip=p.batch)
            for batch in batches if not stop else ():
                self.timer.mark("data")
                step_from = time.perf_counter()
                loss = self.train_step(batch)
                p.batch += 1
                step_tokens = int((batch["lengths"] - 1).clamp(min=0).sum())
                p.tokens += step_tokens
                done = time.perf_counter()
                self.telemetry.step(
                    step_tokens, loss, self.engine.get_lr()[0], done - step_from, step_from - waited_from
                )
                p.training_seconds += done - waited_from
                p.elapsed_seconds = done - started
                waited_from = done
                if p.step % cfg.schedule.log_every == 0:
                    self._log_step(epoch, p.elapsed_seconds)
                out_of_time = cfg.schedule.max_minutes and p.elapsed_seconds > 60 * cfg.schedule.max_minutes
                out_of_time, preempted = self._agree(out_of_time, self.preemption.requested)
                if preempted:
                    self._save_on_preemption()
                    return True
                stop = out_of_time or self._out_of_steps()
                if stop:
                    break
                if every and p.step % every == 0 and p.batch < self.steps_per_epoch:
                    self.save_checkpoint()
            if p.batch >= self.steps_per_epoch:
                p.epoch, p.batch = epoch + 1, 0
            last = p.epoch >= cfg.schedule.epochs
            due = p.batch == 0 and (p.epoch % cfg.schedule.eval_every == 0 or last)
            if (due or stop) and p.evaluated_step != p.step:
                self._validate(epoch)
                self.save_checkpoint()
            elif every and p.step % every == 0 and p.batch == 0:
                self.save_checkpoint()
            if self._agree(self.preemption.requested)[0]:
                self._save_on_preemption()
                return True
            if stop:
                break
        return False

    def _log_step(self, epoch: int, elapsed: float) -> None:
        p, every = self.progress, self.cfg.schedule.log_every
        eta = elapsed / max(p.step, 1) * (self.total_steps - p.step)
        tokens_per_s = p.tokens * self.env.world_size / max(p.training_seconds, 1e-9)
        self.log(
            f"step {p.step}/{self.total_steps} epoch {epoch} loss {np.mean(p.losses[-every:]):.4f} "
            f"lr {self.engine.get_lr()[0]:.2e} tokens/s {tokens_per_s:,.0f} eta {eta:,.0f}s"
        )

    def _validate(self, epoch: int) -> None:
        p = self.progress
        result = self.evaluate("valid")
        self.telemetry.evaluation(result)
        ndcg = result["model"]["NDCG@10"]
        first = p.history[-1]["step"] if p.history else 0
        epoch_losses = p.losses[first:]
        p.history.append(
            {
                "epoch": epoch,
                "step": p.step,
                "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                "valid": result,
            }
        )
        p.evaluated_step = p.step
        self.log(
            f"epoch {epoch} valid NDCG@10 {ndcg:.4f} HR@10 {result['model']['HR@10']:.4f} "
            f"(popularity {result['popularity']['NDCG@10']:.4f})"
        )
        if ndcg > p.best_ndcg:
            p.best_ndcg, p.best_step, p.stale = ndcg, p.step, 0
            self.best_path = self.checkpoints.root / checkpoint_name(p.step)
        else:
            p.stale += 1
            if p.stale >= self.cfg.schedule.patience:
                self.log(f"early stop: no better validation NDCG@10 for {p.stale} evaluations")
                p.stopped_early = True

    def _save_on_preemption(self) -> None:
        started = time.perf_counter()
        path = self.save_checkpoint()
        self.log(
            f"preempted (SIGTERM) at step {self.progress.step}: checkpoint {path} saved in "
            f"{time.perf_counter() - started:.1f} s; continue with --resume auto"
        )

    def _finish(self) -> dict:
        cfg, p = self.cfg, self.progress
        if p.best_step >= 0 and p.best_step != p.step:
            self.checkpoints.load_weights(self.best_path)
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        test = self.evaluate("test", ranks_out=self.out / "test_ranks.npz")
        self.telemetry.evaluation(test)
        meta = {
            "config": cfg.to_dict(),
            "vocab": self.model_vocab,
            "text": self.text.spec if self.text else None,
            "step": p.step,
            "best_valid_ndcg10": p.best_ndcg,
        }
        self.save_best(self.out / "best", meta | {"test": test})
        summary = {
            "config": cfg.to_dict(),
            "world_size": self.env.world_size,
            "steps": p.step,
            "train_seconds": round(p.elapsed_seconds, 1),
            "tokens_per_s": round(p.tokens * self.env.world_size / max(p.training_seconds, 1e-9)),
            "training_seconds": round(p.training_seconds, 1),
            "best_valid_ndcg10": p.best_ndcg,
            "history": p.history,
            "losses": p.losses,
            "phase_seconds": {k: round(v, 3) for k, v in self.timer.seconds.items()},
            "test": test,
        }
        self.telemetry.close()
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
            print(metrics_table(test))
        if dist.is_initialized():
            dist.barrier()
        return summary
