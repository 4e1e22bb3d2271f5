"""Checkpoints a run can always resume from, at the same size or another.

The trainer hands its stateful parts to one ``CheckpointManager``: the dense engine
(``DenseState``), the sharded item tables (``TableState``), the training progress and any other
global state (``states``: ``torch.distributed.checkpoint.stateful.Stateful`` objects, kept in
meta.json), and per-rank state (``rank_states``: RNG streams and the data position). The manager
owns the layout and the resume policy; the parts own their conversions.

One checkpoint is a directory ``CHECKPOINTS/step_000000120/``:

- ``deepspeed/``: DeepSpeed's own checkpoint of the dense model (module, ZeRO-partitioned
  optimizer, LR scheduler). Used when the world size, ZeRO stage and precision are unchanged.
- ``dense.safetensors``: the same dense state in a form that fits any world size and ZeRO stage
  (full fp32 weights and AdamW moments per parameter, gathered through DeepSpeed's
  tensor-fragment API, which also covers stage 0 where ``zero_to_fp32`` does not). Used to
  reshard, and as the dense part of a consolidated model.
- ``sparse/``: ``torch.distributed.checkpoint`` of the TorchRec tables (by table name) and their
  fused optimizer state. Each rank's shard is written in row blocks, so that loading into any
  other sharding, and consolidation, read a block at a time rather than a whole rank's shard.
- ``ranks/rank_00000.pt``: each rank's ``rank_states``.
- ``meta.json``: format version, topology (world size, ZeRO stage, precision, sharding plan),
  resolved config, vocabulary, the global ``states`` (``progress``), and the size and sha256 of
  every file.

Everything is written under ``.tmp-step_…``, fsynced, then renamed; the ``latest`` pointer
moves last, so a crash at any moment leaves either the old or the new checkpoint complete.
Format 1 checkpoints (before the objectives had their own config section) are converted on read.
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
from torch.distributed.checkpoint.stateful import Stateful

from data.loader import slot_positions
from data.shards import sha256_file, write_json_atomic, write_text_atomic
from model.items import ID_TABLE

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META = "meta.json"
LATEST = "latest"
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
DENSE = "dense.safetensors"
SPARSE = "sparse"
RANKS = "ranks"
BLOCK_ROWS = 1 << 18  # rows per stored block of the item table: 64 MiB at 64 fp32 columns
ADAM_STATES = ("exp_avg", "exp_avg_sq")
# Format 1 stored the fused optimizer's state under TorchRec's parameter names of the time.
_V1_OPTIMIZER_NAMES = {
    "item_table": "ids.embeddings.item_table.weight",
    "text_token_table": "tokens.embedding_bags.text_token_table.weight",
}
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


def _load_safetensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


# -- the item tables in row blocks --------------------------------------------------------------


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


class _BlockPlanner(DefaultLoadPlanner):
    """Loads the block of one saved tensor that starts at ``offsets`` and has ``out``'s shape
    into ``out``, in one process."""

    def __init__(self, key: str, offsets: list[int], out: torch.Tensor):
        super().__init__()
        self.key, self.offsets, self.out = key, offsets, out

    def create_local_plan(self) -> LoadPlan:
        saved = self.metadata.state_dict_metadata[self.key]
        chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.out.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.key, saved, [chunk]))

    def resolve_tensor(self, read_item) -> torch.Tensor:
        view = self.out
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, offset, length)
        return view


def read_table_rows(checkpoint: Path, table: str = ID_TABLE, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of one of a checkpoint's tables, reading only the blocks that hold them,
    in the dtype they were trained in (parallel.table_dtype)."""
    reader = SparseReader(checkpoint)
    size = reader.sizes[table]
    out = torch.empty((size[0] if stop is None else stop) - start, *size[1:], dtype=reader.dtypes[table])
    reader.read(table, [start] + [0] * (len(size) - 1), out)
    return out


def optimizer_key(table: str, state: str, format_version: int = FORMAT_VERSION) -> str:
    """The DCP key of the fused optimizer's ``state`` (TorchRec's name, ``item_table.momentum1``)
    of ``table``."""
    return f"optimizer/{_V1_OPTIMIZER_NAMES[table] if format_version == 1 else table}/{state}"


class SparseReader:
    """Blocks of a checkpoint's sparse tensors (tables and their optimizer state), read one at a
    time into tensors the caller owns: the overlapping stored row blocks only, never a whole table."""

    def __init__(self, checkpoint: Path):
        self.reader = dcp.FileSystemReader(str(Path(checkpoint) / SPARSE))
        stored = self.reader.read_metadata().state_dict_metadata
        self.sizes = {key: md.size for key, md in stored.items() if hasattr(md, "size")}
        self.dtypes = {key: md.properties.dtype for key, md in stored.items() if hasattr(md, "size")}

    def read(self, key: str, offsets: list[int], out: torch.Tensor) -> None:
        """Fills ``out`` with the block of ``key`` starting at ``offsets`` (cast to ``out``'s dtype)."""
        dcp.load({key: out}, storage_reader=self.reader, planner=_BlockPlanner(key, offsets, out), no_dist=True)


class TableState:
    """The sharded item tables and their fused optimizer state, in DCP row blocks: loading
    reads the overlapping blocks into the current sharding, whatever the saved one."""

    def __init__(self, tables, block_rows: int = BLOCK_ROWS):
        self.tables, self.block_rows = tables, block_rows

    def _state(self, format_version: int = FORMAT_VERSION) -> tuple[dict, dict]:
        """(DCP key -> tensor, the fused optimizer's state dict whose tensors those are)."""
        state = dict(self.tables.weights())
        optimizer = self.tables.fused_optimizer.state_dict()
        table_of = {key: table for table, key in self.tables.weight_names.items()}
        for param, entries in optimizer["state"].items():
            for key, value in entries.items():
                state[optimizer_key(table_of[param], key, format_version)] = value
        return state, optimizer

    def save(self, directory: Path) -> None:
        state, _ = self._state()
        blocked = {k: _row_blocks(v, self.block_rows) if isinstance(v, ShardedTensor) else v for k, v in state.items()}
        dcp.save(blocked, checkpoint_id=str(directory / SPARSE))

    def load(self, directory: Path, format_version: int, weights_only: bool = False) -> None:
        state, optimizer = self._state(format_version)
        if weights_only:
            state = {k: v for k, v in state.items() if not k.startswith("optimizer/")}
        dcp.load(state, checkpoint_id=str(directory / SPARSE))
        if not weights_only:
            self.tables.fused_optimizer.load_state_dict(optimizer)


# -- the dense model in any topology -------------------------------------------------------------


class DenseState:
    """The dense model under DeepSpeed: saved natively and as full per-parameter fp32 state, so
    that it loads exactly where the topology is unchanged and converted everywhere else."""

    def __init__(self, engine, module: torch.nn.Module, zero_stage: int):
        self.engine, self.module, self.zero_stage = engine, module, zero_stage

    def meta(self) -> dict:
        return {"scheduler": self.engine.lr_scheduler.state_dict()}

    def save(self, directory: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
        dense = self.gather()
        if rank == 0:
            save_file(dense, str(directory / DENSE))

    def load(self, directory: Path, meta: dict, convert: bool) -> None:
        if convert:
            _set_dense(self, _load_safetensors(directory / DENSE), meta["progress"]["step"], meta["scheduler"])
            return
        loaded, _ = self.engine.load_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        if loaded is None:
            raise CheckpointError(f"{directory}: DeepSpeed could not load {DEEPSPEED_DIR}/{DEEPSPEED_TAG}")

    def load_weights(self, directory: Path) -> None:
        _set_module_weights(self, _load_safetensors(directory / DENSE, prefix="weight/"))

    def check(self, directory: Path) -> None:
        """Raises naming the first dense parameter whose presence or shape differs."""
        with safe_open(str(directory / DENSE), "pt") as f:
            saved = {k.removeprefix("weight/"): f.get_slice(k).get_shape() for k in f.keys() if k.startswith("weight/")}
        # ZeRO-3 leaves each rank a partition; ds_shape is the parameter's real shape.
        current = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in self.module.named_parameters()}
        for name in sorted(set(saved) | set(current)):
            if name not in current or name not in saved:
                side = "only the checkpoint" if name in saved else "only this model"
                raise CheckpointError(f"{directory}: parameter {name} exists in {side}")
            if list(saved[name]) != current[name]:
                raise CheckpointError(
                    f"{directory}: parameter {name} has shape {saved[name]} in the checkpoint, {current[name]} here"
                )

    def gather(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights and AdamW moments of every dense parameter (collective; all ranks get them)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {}
        inner = _inner_optimizer(self.engine)
        relink = getattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if self.zero_stage in (1, 2) and relink is not None and inner.state:
            # DeepSpeed links its parameter fragments to the optimizer state at step(), not at
            # load: a checkpoint right after a resume (a run preempted at an epoch's last batch
            # ends that epoch first) found no moments on the ranks holding a fragment, which
            # raised there and left the other ranks waiting in the all-reduce.
            self.engine.optimizer._hp_optimizer_states_linked = False
            relink()
        for name, p in self.module.named_parameters():
            if self.zero_stage == 0:
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
def _set_module_weights(dense: DenseState, weights: dict[str, torch.Tensor]) -> None:
    import deepspeed

    params = dict(dense.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=dense.zero_stage == 3):
        for name, p in params.items():
            p.data.copy_(weights[name].to(p.dtype))


@torch.no_grad()
def _set_dense(dense: DenseState, tensors: dict[str, torch.Tensor], step: int, scheduler_state: dict) -> None:
    """Puts full fp32 weights and AdamW moments into this engine's partitioning."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    engine = dense.engine
    inner = _inner_optimizer(engine)
    # AdamW creates its state at the first step (ZeRO-3 and stage 0 have none yet): create it
    # here, at the saved step count, so that the moments below have somewhere to go. ZeRO-3
    # points the optimizer's groups at its fp32 partitions only while stepping.
    partitions = [p for g in inner.param_groups for p in g["params"]]
    partitions += getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])
    for flat in {id(p): p for p in partitions}.values():
        state = inner.state[flat]
        for key in ADAM_STATES:
            state.setdefault(key, torch.zeros_like(flat))
        state["step"] = torch.tensor(float(step))
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 (and DeepSpeed's bf16 optimizer) link each parameter to its slice of the
        # optimizer state only after their first step; link them now, to the state above.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for name, p in dense.module.named_parameters():
        weight = tensors[f"weight/{name}"]
        if dense.zero_stage == 0:
            p.data.copy_(weight)
            for key in ADAM_STATES:
                inner.state[p][key].copy_(tensors[f"{key}/{name}"])
        else:
            safe_set_full_fp32_param(p, weight.to(engine.device))
            for key in ADAM_STATES:
                safe_set_full_optimizer_state(p, tensors[f"{key}/{name}"].to(engine.device), key)
    # The working (possibly bf16) weights follow the fp32 master weights.
    _set_module_weights(dense, {n: tensors[f"weight/{n}"] for n, _ in dense.module.named_parameters()})
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(scheduler_state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = step


# -- per-rank state -------------------------------------------------------------------------------


class RNGState(Stateful):
    """This rank's torch, numpy, Python (and CUDA) generators."""

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    @staticmethod
    def reseed(seed: int, step: int, rank: int) -> None:
        """Fresh streams for a run resumed where the saved ones have no counterpart."""
        torch.manual_seed(seed * 1_000_003 + step * 1_009 + rank)
        np.random.seed((seed, step, rank))


class DataPosition(Stateful):
    """This rank's position in the shard stream, which follows from the progress (epoch, batch)
    and the data settings (``signature``); saved to check that it still does on resume."""

    def __init__(self, dataset, progress, signature: dict):
        self.dataset, self.progress, self.signature = dataset, progress, signature

    def state_dict(self) -> dict:
        return {"slots": slot_positions(self.dataset, self.progress.epoch, self.progress.batch)}

    def load_state_dict(self, state: dict) -> None:
        expected = self.state_dict()["slots"]
        if {int(k): v for k, v in state["slots"].items()} != expected:
            raise CheckpointError(f"saved data position {state['slots']} != {expected}")


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


# -- reading and verifying ------------------------------------------------------------------------


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json, format 1 converted to the current form."""
    from train.config import upgrade_saved_config

    path = Path(path)
    file = path / META
    if not file.exists():
        raise CheckpointError(f"{path}: no {META}; not an lmrec checkpoint (or an incomplete one)")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')}, this lmrec reads {READABLE_VERSIONS}"
        )
    if meta["format_version"] == 1:
        meta["config"] = upgrade_saved_config(meta["config"])
        meta["progress"].pop("losses", None)  # per-step losses live in the run's losses.jsonl now
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


# -- the manager --------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores every stateful part of a run. ``describe``: what meta.json records of
    the run (config, vocabulary, text spec, precision, sharding); ``states``: global Stateful parts
    (identical on every rank), each under its key in meta.json; ``rank_states``: per-rank parts,
    in the rank's file; ``data``: the data position, restored only when its signature matches."""

    def __init__(
        self,
        root: Path,
        keep: int,
        *,
        dense: DenseState,
        tables: TableState,
        data: DataPosition,
        states: dict[str, Stateful],
        describe: dict,
        rank: int,
        world_size: int,
        seed: int,
        log=print,
    ):
        self.root, self.keep = Path(root), keep
        self.dense, self.tables, self.data = dense, tables, data
        self.states, self.describe = states, describe
        self.rank_states = {"rng": RNGState(), "data": data}
        self.rank, self.world_size, self.seed, self.log = rank, world_size, seed, log

    def topology(self) -> tuple:
        return self.world_size, self.dense.zero_stage, self.describe["precision"]

    def save(self, step: int, protect_step: int = -1) -> Path:
        """Writes the checkpoint of ``step`` (every rank takes part), moves ``latest`` to it and
        prunes old ones, never the one of ``protect_step`` (the best so far)."""
        rank = self.rank
        name = checkpoint_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RANKS).mkdir(parents=True)
        _barrier()
        self.dense.save(tmp, rank)
        self.tables.save(tmp)
        torch.save({k: s.state_dict() for k, s in self.rank_states.items()}, tmp / RANKS / f"rank_{rank:05d}.pt")
        _barrier()
        names = _broadcast(
            sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) if rank == 0 else None, rank
        )
        digests = _share(names, rank, self.world_size, lambda n: _fsync_and_hash(tmp / n))
        if rank == 0:
            record = {
                "format_version": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "world_size": self.world_size,
                "zero_stage": self.dense.zero_stage,
                # The item table's plan (the first table: the code table of a model without ID rows).
                "sparse_plan": self.tables.tables.shard_plan(next(iter(self.tables.tables.specs))),
                **self.describe,
                **self.dense.meta(),
                "data_signature": self.data.signature,
                **{key: state.state_dict() for key, state in self.states.items()},
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
            self._prune(protect_step)
        _barrier()
        return final

    def _prune(self, protect_step: int) -> None:
        keep = {checkpoint_name(protect_step)} if protect_step >= 0 else set()
        for i, path in enumerate(list_checkpoints(self.root)):
            if i >= self.keep and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def resume(self, spec: str, cfg, vocab: dict) -> Path | None:
        """``--resume auto|PATH``: continue from a checkpoint, exactly when the topology and data
        settings are unchanged, otherwise converted (resharded) with the data restarting at the
        next epoch boundary. Returns the checkpoint, or None when there is none to resume."""
        found = resolve(spec, self.root, self.rank, self.world_size, self.log)
        if found is None:
            self.log(f"no checkpoint in {self.root}; starting from scratch")
            return None
        path, meta = found
        for change in check_compatible(meta, cfg, vocab, str(path)):
            self.log(f"resuming with a changed setting: {change}")
        self.dense.check(path)
        saved_topology = (meta["world_size"], meta["zero_stage"], meta["precision"])
        same_dense = saved_topology == self.topology()
        self.dense.load(path, meta, convert=not same_dense)
        self.tables.load(path, meta["format_version"])
        for key, state in self.states.items():
            if key in meta:
                state.load_state_dict(meta[key])
            else:  # a part added after the checkpoint's version (loss_normaliser): it starts fresh
                self.log(f"{path} has no {key}; it starts fresh")
        progress = self.data.progress
        message = f"resumed from {path} at step {progress.step} (epoch {progress.epoch}, batch {progress.batch})"
        if not same_dense or (meta["world_size"], meta["sharding"]) != (self.world_size, self.describe["sharding"]):
            message += (
                f", resharded from {meta['world_size']} to {self.world_size} ranks (ZeRO stage {meta['zero_stage']} "
                f"-> {self.dense.zero_stage}, {meta['precision']} -> {self.describe['precision']}, table "
                f"{meta['sharding']} -> {self.describe['sharding']})"
            )
        if meta["data_signature"] == self.data.signature:
            state = self._rank_file(path)
            try:
                for key, part in self.rank_states.items():
                    part.load_state_dict(state[key])
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
            self.log(message)
            return path
        # Another world size or loader: RNG streams and data positions have no counterpart.
        RNGState.reseed(self.seed, progress.step, self.rank)
        if progress.batch:
            progress.epoch, progress.batch = progress.epoch + 1, 0
        before, now = meta["data_signature"], self.data.signature
        self.log(
            f"{message}; the data settings changed ({before['world_size']} ranks x batch {before['batch_size']} x "
            f"{before['num_workers']} workers -> {now['world_size']} x {now['batch_size']} x {now['num_workers']}), "
            f"so the data restarts at the next epoch boundary: epoch {progress.epoch}"
        )
        return path

    def _rank_file(self, path: Path) -> dict:
        file = Path(path) / RANKS / f"rank_{self.rank:05d}.pt"
        if not file.exists():
            raise CheckpointError(f"{path}: missing rank file {file.relative_to(path)}")
        return torch.load(file, weights_only=False)

    def load_weights(self, path: Path) -> None:
        """Only the model weights (dense and tables) of ``path``: the best checkpoint's, say."""
        self.dense.load_weights(Path(path))
        self.tables.load(Path(path), read_meta(path)["format_version"], weights_only=True)


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
