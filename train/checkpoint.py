"""Checkpoints a run can always resume from, at the same size or another.

One checkpoint is a directory ``CHECKPOINTS/step_000000120/``:

- ``deepspeed/``: DeepSpeed's own checkpoint of the dense model (module, ZeRO-partitioned
  optimizer, LR scheduler). Used when the world size, ZeRO stage and precision are unchanged.
- ``dense.safetensors``: the same dense state in a form that fits any world size and ZeRO stage
  (full fp32 weights and AdamW moments per parameter, gathered through DeepSpeed's
  tensor-fragment API, which also covers stage 0 where ``zero_to_fp32`` does not). Used to
  reshard, and as the dense part of a consolidated model.
- ``sparse/``: ``torch.distributed.checkpoint`` of the TorchRec item table and its fused
  optimizer state. Each rank's shard is written in row blocks, so that loading into any other
  sharding, and consolidation, read a block at a time rather than a whole rank's shard.
- ``ranks/rank_00000.pt``: each rank's RNG states and its position in the shard stream.
- ``meta.json``: format version, topology (world size, ZeRO stage, precision, sharding plan),
  resolved config, vocabulary, training progress, and the size and sha256 of every file.

Everything is written under ``.tmp-step_…``, fsynced, then renamed; the ``latest`` pointer
moves last, so a crash at any moment leaves either the old or the new checkpoint complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from data.shards import atomic_output_dir, sha256_file, write_json_atomic, write_text_atomic
from serve.tensorfile import BlockWriter

FORMAT_VERSION = 1
META = "meta.json"
LATEST = "latest"
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
DENSE = "dense.safetensors"
SPARSE = "sparse"
RANKS = "ranks"
WEIGHT_KEY = "item_table"
TOKEN_KEY = "text_token_table"
BLOCK_ROWS = 1 << 18  # rows per stored block of the item table: 64 MiB at 64 fp32 columns
ADAM_STATES = ("exp_avg", "exp_avg_sq")
# Model fields that change the parameters' meaning or shape; anything else may change on resume.
ARCHITECTURE = (
    "backbone",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "use_actions",
    "use_gaps",
    "normalize",
    "action_head",
    "backbone_options",
    "item_id",
    "item_text",
    "item_text_tokens",
)


class CheckpointError(ValueError):
    pass


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint's meta.json."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already trained on every rank
    best_ndcg: float = -1.0
    best_step: int = -1  # the checkpoint holding the best validation weights
    stale: int = 0  # evaluations since the last improvement
    evaluated_step: int = -1
    stopped_early: bool = False
    history: list = field(default_factory=list)
    losses: list = field(default_factory=list)  # the global per-token loss of every step
    tokens: int = 0
    training_seconds: float = 0.0
    elapsed_seconds: float = 0.0


@dataclass
class TrainingParts:
    """What a checkpoint holds the state of."""

    engine: object  # the DeepSpeed engine around the dense model
    module: torch.nn.Module  # the dense model itself
    items: object  # train.embeddings.ItemEmbeddings
    zero_stage: int
    rank: int
    world_size: int


# -- distributed helpers ---------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _broadcast(value, rank: int):
    if not _distributed():
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _share(items: list, rank: int, world_size: int, work) -> dict:
    """Runs ``work`` on this rank's share of ``items`` and gathers every rank's results."""
    mine = {item: work(item) for i, item in enumerate(items) if i % world_size == rank}
    if not _distributed():
        return mine
    everyone = [None] * world_size
    dist.all_gather_object(everyone, mine)
    return {k: v for part in everyone for k, v in part.items()}


def _fsync_and_hash(path: Path) -> tuple[int, str]:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return path.stat().st_size, sha256_file(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the item table in row blocks --------------------------------------------------------------


def _row_blocks(tensor: ShardedTensor, rows: int) -> ShardedTensor:
    """The same ShardedTensor (views, no copy) with every shard cut into blocks of ``rows`` rows."""

    def split(md: ShardMetadata) -> list[ShardMetadata]:
        (row0, *offsets), (n, *sizes) = md.shard_offsets, md.shard_sizes
        return [
            ShardMetadata([row0 + s, *offsets], [min(rows, n - s), *sizes], md.placement) for s in range(0, n, rows)
        ]

    meta = tensor.metadata()
    local = []
    for shard in tensor.local_shards():
        row0 = shard.metadata.shard_offsets[0]
        for block in split(shard.metadata):
            local.append(Shard(shard.tensor.narrow(0, block.shard_offsets[0] - row0, block.shard_sizes[0]), block))
    blocks = [b for md in meta.shards_metadata for b in split(md)]
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local, ShardedTensorMetadata(blocks, meta.size, meta.tensor_properties)
    )


def _sparse_state(items) -> tuple[dict, dict]:
    """(flat name -> ShardedTensor, the fused optimizer's state dict whose tensors those are)."""
    tables = items.module.state_dict()
    state = {WEIGHT_KEY: tables[items.weight_name]}
    if items.text_buckets:
        state[TOKEN_KEY] = tables[items.token_weight_name]
    optimizer = items.module.fused_optimizer.state_dict()
    for param, entries in optimizer["state"].items():
        for key, value in entries.items():
            state[f"optimizer/{param}/{key}"] = value
    return state, optimizer


def _save_sparse(items, directory: Path, rows: int) -> None:
    state, _ = _sparse_state(items)
    blocked = {k: _row_blocks(v, rows) if isinstance(v, ShardedTensor) else v for k, v in state.items()}
    dcp.save(blocked, checkpoint_id=str(directory))


def _load_sparse(items, directory: Path, weights_only: bool = False) -> None:
    """Reads into the current sharding, whatever the saved one: DCP reads the overlapping blocks."""
    state, optimizer = _sparse_state(items)
    if weights_only:
        state = {k: v for k, v in state.items() if k in (WEIGHT_KEY, TOKEN_KEY)}
    dcp.load(state, checkpoint_id=str(directory))
    if not weights_only:
        items.module.fused_optimizer.load_state_dict(optimizer)


class _RowBlockPlanner(DefaultLoadPlanner):
    """Loads rows [start, start + len(out)) of one saved tensor into ``out``, in one process."""

    def __init__(self, key: str, start: int, out: torch.Tensor):
        super().__init__()
        self.key, self.start, self.out = key, start, out

    def create_local_plan(self) -> LoadPlan:
        saved = self.metadata.state_dict_metadata[self.key]
        offsets = torch.Size([self.start] + [0] * (self.out.dim() - 1))
        chunk = ChunkStorageMetadata(offsets=offsets, sizes=self.out.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.key, saved, [chunk]))

    def resolve_tensor(self, read_item) -> torch.Tensor:
        view = self.out
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, offset, length)
        return view


def read_item_rows(checkpoint: Path, start: int = 0, stop: int | None = None, key: str = WEIGHT_KEY) -> torch.Tensor:
    """Rows [start, stop) of a checkpoint's item table (or, by ``key``, its text-token table),
    reading only the blocks that hold them."""
    reader = dcp.FileSystemReader(str(Path(checkpoint) / SPARSE))
    size = reader.read_metadata().state_dict_metadata[key].size
    out = torch.empty((size[0] if stop is None else stop) - start, *size[1:])
    dcp.load({key: out}, storage_reader=reader, planner=_RowBlockPlanner(key, start, out), no_dist=True)
    return out


# -- the dense model in any topology -------------------------------------------------------------


def _gather_dense(parts: TrainingParts) -> dict[str, torch.Tensor]:
    """Full fp32 weights and AdamW moments of every dense parameter (collective; all ranks get them)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    inner = _inner_optimizer(parts.engine)
    for name, p in parts.module.named_parameters():
        if parts.zero_stage == 0:
            weight, state = p.detach(), inner.state.get(p, {})
            moments = [state.get(k) for k in ADAM_STATES]
        else:
            weight = safe_get_full_fp32_param(p)
            moments = [safe_get_full_optimizer_state(p, k) for k in ADAM_STATES]
        out[f"weight/{name}"] = weight.detach().float().cpu().clone()
        for key, value in zip(ADAM_STATES, moments):
            # Before the first step AdamW has no state yet: zeros are what it would start from.
            out[f"{key}/{name}"] = torch.zeros_like(out[f"weight/{name}"]) if value is None else value.float().cpu()
    return out


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


@torch.no_grad()
def _set_module_weights(parts: TrainingParts, weights: dict[str, torch.Tensor]) -> None:
    import deepspeed

    params = dict(parts.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=parts.zero_stage == 3):
        for name, p in params.items():
            p.data.copy_(weights[name].to(p.dtype))


@torch.no_grad()
def _set_dense(parts: TrainingParts, tensors: dict[str, torch.Tensor], step: int, scheduler_state: dict) -> None:
    """Puts full fp32 weights and AdamW moments into this engine's partitioning."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    inner = _inner_optimizer(parts.engine)
    # AdamW creates its state at the first step (ZeRO-3 and stage 0 have none yet): create it
    # here, at the saved step count, so that the moments below have somewhere to go. ZeRO-3
    # points the optimizer's groups at its fp32 partitions only while stepping.
    partitions = [p for g in inner.param_groups for p in g["params"]]
    partitions += getattr(parts.engine.optimizer, "fp32_partitioned_groups_flat", [])
    for flat in {id(p): p for p in partitions}.values():
        state = inner.state[flat]
        for key in ADAM_STATES:
            state.setdefault(key, torch.zeros_like(flat))
        state["step"] = torch.tensor(float(step))
    zero = parts.engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 (and DeepSpeed's bf16 optimizer) link each parameter to its slice of the
        # optimizer state only after their first step; link them now, to the state above.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, p in parts.module.named_parameters():
        weight = tensors[f"weight/{name}"]
        if parts.zero_stage == 0:
            p.data.copy_(weight)
            for key in ADAM_STATES:
                inner.state[p][key].copy_(tensors[f"{key}/{name}"])
        else:
            safe_set_full_fp32_param(p, weight.to(parts.engine.device))
            for key in ADAM_STATES:
                safe_set_full_optimizer_state(p, tensors[f"{key}/{name}"].to(parts.engine.device), key)
    # The working (possibly bf16) weights follow the fp32 master weights.
    _set_module_weights(parts, {n: tensors[f"weight/{n}"] for n, _ in parts.module.named_parameters()})
    scheduler = parts.engine.lr_scheduler
    scheduler.load_state_dict(scheduler_state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    parts.engine.global_steps = step


# -- RNG and data position -----------------------------------------------------------------------


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- compatibility ------------------------------------------------------------------------------


def check_compatible(meta: dict, cfg, vocab: dict, where: str) -> list[str]:
    """Raises on what cannot carry over (vocabulary, architecture, sparse optimizer); returns the
    config fields that changed harmlessly, for the log."""
    saved_vocab = meta["vocab"]
    for key in ("items", "actions", "gaps"):
        if saved_vocab[key] != vocab[key]:
            raise CheckpointError(
                f"{where}: vocabulary differs: the checkpoint has {saved_vocab[key]} {key}, data.shards "
                f"{cfg.data.shards} has {vocab[key]} (prepare new data with --vocab-from to keep the indices)"
            )
    saved = meta["config"]
    current = cfg.to_dict()
    for name in ARCHITECTURE:
        if saved["model"][name] != current["model"][name]:
            raise CheckpointError(
                f"{where}: model.{name} is {saved['model'][name]!r} in the checkpoint and {current['model'][name]!r} here"
            )
    if saved["optim"]["sparse_optimizer"] != current["optim"]["sparse_optimizer"]:
        raise CheckpointError(
            f"{where}: optim.sparse_optimizer is {saved['optim']['sparse_optimizer']!r} in the checkpoint and "
            f"{current['optim']['sparse_optimizer']!r} here; its state cannot carry over"
        )
    changed = []
    for section, values in current.items():
        for key, value in values.items():
            before = saved.get(section, {}).get(key)
            if before != value and section not in ("output", "checkpoint"):
                changed.append(f"{section}.{key} {before!r} -> {value!r}")
    return changed


def check_dense(path: Path, module: torch.nn.Module) -> None:
    """Raises naming the first dense parameter whose presence or shape differs."""
    where = str(path)
    with safe_open(str(Path(path) / DENSE), "pt") as f:
        saved = {k.removeprefix("weight/"): f.get_slice(k).get_shape() for k in f.keys() if k.startswith("weight/")}
    # ZeRO-3 leaves each rank a partition; ds_shape is the parameter's real shape.
    current = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
    for name in sorted(set(saved) | set(current)):
        if name not in current or name not in saved:
            side = "only the checkpoint" if name in saved else "only this model"
            raise CheckpointError(f"{where}: parameter {name} exists in {side}")
        if list(saved[name]) != current[name]:
            raise CheckpointError(
                f"{where}: parameter {name} has shape {saved[name]} in the checkpoint, {current[name]} here"
            )


# -- reading and verifying ------------------------------------------------------------------------


def read_meta(path: Path) -> dict:
    path = Path(path)
    file = path / META
    if not file.exists():
        raise CheckpointError(f"{path}: no {META}; not an lmrec checkpoint (or an incomplete one)")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')}, this lmrec reads {FORMAT_VERSION}"
        )
    return meta


def verify(path: Path, rank: int = 0, world_size: int = 1) -> dict:
    """The checkpoint's meta, after checking every file's size and sha256 (ranks share the work)."""
    path = Path(path)
    meta = read_meta(path)
    files = meta["files"]

    def check(name: str) -> str | None:
        file = path / name
        if not file.exists():
            return f"missing file {name}"
        size = file.stat().st_size
        if size != files[name]["bytes"]:
            return f"{name} is truncated or replaced ({size} bytes, {files[name]['bytes']} expected)"
        if sha256_file(file) != files[name]["sha256"]:
            return f"checksum mismatch in {name}"
        return None

    problems = [p for p in _share(sorted(files), rank, world_size, check).values() if p]
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(sorted(problems)))
    return meta


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def resolve(resume: str, root: Path, rank: int = 0, world_size: int = 1, log=print) -> tuple[Path, dict] | None:
    """``auto``: the newest checkpoint under ``root`` that verifies, passing over broken ones
    (and saying so); None when there is none. A path: that checkpoint, or the newest good one
    in that checkpoint directory; a broken explicit checkpoint is an error."""
    if resume != "auto":
        path = Path(resume)
        if (path / META).exists():
            return path, verify(path, rank, world_size)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint")
        root = path
    candidates = list_checkpoints(root)
    for path in candidates:
        try:
            return path, verify(path, rank, world_size)
        except CheckpointError as e:
            log(f"checkpoint {path.name} is broken, trying the previous one: {e}")
    if resume != "auto":
        raise CheckpointError(f"--resume {resume}: no usable checkpoint in {root}")
    return None


# -- the checkpointer --------------------------------------------------------------------------------


class Checkpointer:
    def __init__(self, root: Path, keep: int, parts: TrainingParts, block_rows: int = BLOCK_ROWS):
        self.root, self.keep, self.parts, self.block_rows = Path(root), keep, parts, block_rows

    def save(self, progress: Progress, meta: dict, data_position: dict) -> Path:
        """Writes a checkpoint (every rank takes part) and moves ``latest`` to it."""
        parts, rank = self.parts, self.parts.rank
        name = checkpoint_name(progress.step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RANKS).mkdir(parents=True)
        _barrier()
        parts.engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
        dense = _gather_dense(parts)
        if rank == 0:
            save_file(dense, str(tmp / DENSE))
        del dense
        _save_sparse(parts.items, tmp / SPARSE, self.block_rows)
        torch.save({"rng": _rng_state(), "data": data_position}, tmp / RANKS / f"rank_{rank:05d}.pt")
        _barrier()
        names = _broadcast(
            sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) if rank == 0 else None, rank
        )
        digests = _share(names, rank, parts.world_size, lambda n: _fsync_and_hash(tmp / n))
        if rank == 0:
            shards = [
                {"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes), "rank": s.placement.rank()}
                for s in parts.items.module.state_dict()[parts.items.weight_name].metadata().shards_metadata
            ]
            record = {
                "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "world_size": parts.world_size,
                "zero_stage": parts.zero_stage,
                "sparse_plan": shards,
                **meta,
                "progress": asdict(progress),
                "files": {n: {"bytes": digests[n][0], "sha256": digests[n][1]} for n in names},
            }
            write_json_atomic(tmp / META, record)
            _fsync_dir(tmp)
            if final.exists():  # the same step saved again (resumed at an epoch's last batch)
                old = self.root / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            _fsync_dir(self.root)
            write_text_atomic(self.root / LATEST, name + "\n")
            self._prune(progress.best_step)
        _barrier()
        return final

    def _prune(self, best_step: int) -> None:
        keep = {checkpoint_name(best_step)} if best_step >= 0 else set()
        for i, path in enumerate(list_checkpoints(self.root)):
            if i >= self.keep and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, meta: dict, convert_dense: bool) -> None:
        """Restores the model and optimizer state of ``path``: the dense part through DeepSpeed's
        own checkpoint, or, with ``convert_dense`` (another world size, ZeRO stage or precision),
        from the full per-parameter state into this engine's partitioning. The item table and its
        optimizer state load into the current sharding, whatever the saved one."""
        parts = self.parts
        if convert_dense:
            tensors = _load_safetensors(path / DENSE)
            _set_dense(parts, tensors, meta["progress"]["step"], meta["scheduler"])
            del tensors
        else:
            loaded, _ = parts.engine.load_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
            if loaded is None:
                raise CheckpointError(f"{path}: DeepSpeed could not load {DEEPSPEED_DIR}/{DEEPSPEED_TAG}")
        _load_sparse(parts.items, path / SPARSE)

    def rank_state(self, path: Path) -> dict:
        """This rank's saved RNG states and data position."""
        file = Path(path) / RANKS / f"rank_{self.parts.rank:05d}.pt"
        if not file.exists():
            raise CheckpointError(f"{path}: missing rank file {file.relative_to(path)}")
        return torch.load(file, weights_only=False)

    @staticmethod
    def restore_rng(state: dict) -> None:
        _set_rng_state(state["rng"])

    def load_weights(self, path: Path) -> None:
        """Only the model weights (dense and item table) of ``path``: the best checkpoint's, say."""
        tensors = _load_safetensors(Path(path) / DENSE, prefix="weight/")
        _set_module_weights(self.parts, tensors)
        _load_sparse(self.parts.items, Path(path) / SPARSE, weights_only=True)


def _load_safetensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


# -- consolidation ----------------------------------------------------------------------------------


def checkpoint_items(checkpoint: Path, meta: dict, shards: Path | None = None):
    """(rows(start, stop) -> the items' scoring vectors, the text-token table or None). For an
    ID-only model the rows are the ID table's; a text-aware model's are composed from the ID rows,
    the dense text projection and the token table, with the text features of its shards."""
    from train.evaluate import build_model, compose_items, load_item_text, load_popularity

    model_cfg = meta["config"]["model"]
    if not (model_cfg.get("item_text") or model_cfg.get("item_text_tokens")):
        return (lambda a, b: read_item_rows(checkpoint, a, b)), None
    rows = meta["vocab"]["items"]
    shards = str(shards or meta["config"]["data"]["shards"])
    model = build_model(meta)
    model.load_state_dict(_load_safetensors(checkpoint / DENSE, prefix="weight/"))
    text, has_id = load_item_text(shards, rows), load_popularity(shards, rows) > 0
    tokens = read_item_rows(checkpoint, key=TOKEN_KEY) if model_cfg.get("item_text_tokens") else None
    return (lambda a, b: compose_items(model, a, read_item_rows(checkpoint, a, b), text, has_id, tokens)), tokens


def consolidate(checkpoint: Path, out: Path, block_rows: int = BLOCK_ROWS, log=print) -> Path:
    """``lmrec checkpoint consolidate``: one fp32 safetensors file for the dense model and one for
    the full item table, plus the meta.json of a saved model (``lmrec eval --model OUT`` reads
    it). The table is streamed in row blocks: memory stays at a block, whatever the table's size."""
    from train.evaluate import SAVED_DENSE, SAVED_ITEMS, SAVED_META

    checkpoint, out = Path(checkpoint), Path(out)
    meta = verify(checkpoint)
    rows = meta["vocab"]["items"]
    cols = meta["config"]["model"]["hidden_size"]
    rows_of, tokens = checkpoint_items(checkpoint, meta)
    tables = {"items": (np.float32, (rows, cols))}
    if tokens is not None:
        tables["text_tokens"] = (np.float32, tuple(tokens.shape))
    saved = {
        "config": meta["config"],
        "vocab": meta["vocab"],
        "text": meta.get("text"),
        "step": meta["progress"]["step"],
        "source_checkpoint": str(checkpoint),
        "best_valid_ndcg10": meta["progress"]["best_ndcg"],
    }
    with atomic_output_dir(out, overwrite=True) as tmp:
        save_file(_load_safetensors(checkpoint / DENSE, prefix="weight/"), str(tmp / SAVED_DENSE))
        with BlockWriter(tmp / SAVED_ITEMS, tables, {"source": checkpoint.name}) as table:
            for start in range(0, rows, block_rows):
                table.write("items", start, rows_of(start, min(rows, start + block_rows)).numpy())
            if tokens is not None:
                table.write("text_tokens", 0, tokens.numpy())
        write_json_atomic(tmp / SAVED_META, saved)
    log(f"consolidated {checkpoint} (step {saved['step']}) into {out}: {rows:,} x {cols} item table")
    return out


# -- preemption -------------------------------------------------------------------------------------


class Preemption:
    """SIGTERM (a scheduler's preemption notice, torchrun passing one on) sets ``requested``; the
    training loop checks it between steps, saves a checkpoint and exits. A watchdog ends the
    process when the deadline passes first, so that the scheduler never has to wait longer: the
    unfinished checkpoint stays under its temporary name and is never used."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            return
        self.requested = True
        watchdog = threading.Timer(self.deadline_s, self._expire)
        watchdog.daemon = True
        watchdog.start()

    def _expire(self) -> None:
        print(
            f"lmrec: preemption deadline of {self.deadline_s:g} s passed before the checkpoint was complete; "
            "exiting without it",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)
