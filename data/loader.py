"""Streaming shards into padded batches, split disjointly and completely over ranks and workers.

Every (rank, dataloader worker) pair is a *slot*. Each epoch the shard list is shuffled with a
seed derived from (seed, epoch). Shard i goes to slot i % slots when that keeps the slots within
5 % of each other; otherwise (few or uneven shards) every slot reads every shard and keeps the
eligible samples whose running index is congruent to its slot. Either way each sample lands in
exactly one slot, and every slot's sample count is known from the manifest before reading.

Collectives hang when ranks run different numbers of steps, so every rank yields exactly
``steps_per_epoch`` batches: a rank with fewer real batches appends zero-weight padding batches
(``weights`` all 0). Real samples are never dropped, so evaluation covers each user exactly once.

Each batch carries its slot and the slot's batch counter. ``iterate_epoch(..., skip=k)`` resumes an
epoch after its first k batches in exactly the order an uninterrupted epoch would have had.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import schema
from data.errors import DataError
from data.shards import load_manifest
from data.tar import iter_members, load_npy


@dataclass
class LoaderConfig:
    split: str = "train"
    batch_size: int = 64
    max_len: int = 200  # model input length; training reads max_len + 1 events for the shift
    shuffle: bool = True
    shuffle_buffer: int = 2048
    seed: int = 0
    num_workers: int = 2
    with_seen: bool = False  # also yield each user's whole history (for filtering seen items)
    # Batch histories of similar length together: each run of shuffle_buffer samples (rounded to
    # whole batches) is sorted by length and cut into batches, which then go out in an order drawn
    # from (seed, epoch, run), the same on every slot. So the j-th batch of every rank holds the
    # same length quantile of its run: ranks do about equal work per step, and none waits.
    length_buckets: bool = False

    def __post_init__(self):
        if self.split not in schema.SPLITS:
            raise DataError(f"split must be one of {schema.SPLITS}, got {self.split!r}")
        if self.batch_size < 1 or self.max_len < 1 or self.num_workers < 0:
            raise DataError("batch_size and max_len must be >= 1 and num_workers >= 0")


@dataclass
class SlotPlan:
    shards: list[int]  # indices into manifest["shards"], in reading order
    stride: int  # 1 when the slot owns whole shards; the slot count when slots share shards
    offset: int
    samples: int
    batches: int
    padding: int = 0  # zero-weight batches appended to equalise steps across ranks


@dataclass
class EpochPlan:
    slots: list[SlotPlan]
    steps_per_epoch: int  # batches every rank yields
    real_batches: list[int] = field(default_factory=list)  # per rank


def plan_epoch(manifest: dict, cfg: LoaderConfig, world_size: int, epoch: int) -> EpochPlan:
    workers = max(cfg.num_workers, 1)
    n_slots = world_size * workers
    counts = [s["splits"][cfg.split] for s in manifest["shards"]]
    order = list(range(len(counts)))
    if cfg.shuffle and cfg.split == "train":
        order = list(np.random.default_rng([cfg.seed, epoch]).permutation(len(counts)))

    def whole_shards() -> list[SlotPlan]:
        plans = []
        for slot in range(n_slots):
            mine = [int(i) for i in order[slot::n_slots]]
            plans.append(SlotPlan(mine, 1, 0, sum(counts[i] for i in mine), 0))
        return plans

    def strided() -> list[SlotPlan]:
        total = sum(counts)
        return [
            SlotPlan([int(i) for i in order], n_slots, slot, max(0, math.ceil((total - slot) / n_slots)), 0)
            for slot in range(n_slots)
        ]

    slots = strided()
    if len(order) >= n_slots:
        # Whole shards read less, but with few or uneven shards some slots would idle on
        # padding batches: keep them only when they cost at most 5 % more steps.
        candidate = whole_shards()
        if max(s.samples for s in candidate) <= 1.05 * max(s.samples for s in slots):
            slots = candidate
    for s in slots:
        s.batches = math.ceil(s.samples / cfg.batch_size)
    per_rank = [sum(s.batches for s in slots[r * workers : (r + 1) * workers]) for r in range(world_size)]
    steps = max(per_rank) if per_rank else 0
    for r in range(world_size):
        missing = steps - per_rank[r]
        for k in range(missing):
            slots[r * workers + k % workers].padding += 1
    return EpochPlan(slots, steps, per_rank)


class SequenceDataset(IterableDataset):
    """Yields collated batches for one rank; wrap it with ``make_loader``."""

    def __init__(
        self,
        directory: Path,
        cfg: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        manifest: dict | None = None,
    ):
        self.directory = Path(directory)
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.manifest = manifest or load_manifest(self.directory)
        self.features = self.manifest["features"]
        self.epoch = 0
        self.start_batches: dict[int, int] = {}

    def set_epoch(self, epoch: int, start_batches: dict[int, int] | None = None) -> None:
        self.epoch = epoch
        self.start_batches = dict(start_batches or {})

    def plan(self) -> EpochPlan:
        return plan_epoch(self.manifest, self.cfg, self.world_size, self.epoch)

    def __len__(self) -> int:
        return self.plan().steps_per_epoch

    # -- reading ---------------------------------------------------------------------------

    def _samples(self, shard_index: int):
        yield from shard_samples(self.directory, self.manifest["shards"][shard_index])

    def _slot_samples(self, slot: SlotPlan):
        split = self.cfg.split
        seen = 0
        for shard in slot.shards:
            for sample in self._samples(shard):
                try:
                    train = load_npy(sample["train.npy"])
                    valid = load_npy(sample["valid.npy"]) if split != "train" or self.cfg.with_seen else None
                    test = load_npy(sample["test.npy"]) if split == "test" else None
                except Exception as e:
                    path = self.directory / self.manifest["shards"][shard]["name"]
                    raise DataError(
                        f"shard {path} is corrupt: sample {sample.get('__key__')} does not decode ({e.__class__.__name__})"
                    ) from None
                ok = schema.eligible(
                    split, len(train), len(valid) if valid is not None else 0, len(test) if test is not None else 0
                )
                if not ok:
                    continue
                if slot.stride > 1:
                    seen += 1
                    if (seen - 1) % slot.stride != slot.offset:
                        continue
                yield sample["__key__"], train, valid, test

    def _shuffled(self, samples, slot_index: int):
        if not (self.cfg.shuffle and self.cfg.split == "train"):
            yield from samples
            return
        # Python's generator costs a fraction of numpy's per draw, and it is just as reproducible.
        rng = random.Random(f"{self.cfg.seed}/{self.epoch}/{slot_index}")
        buffer = []
        for s in samples:
            buffer.append(s)
            if len(buffer) >= self.cfg.shuffle_buffer:
                yield _swap_pop(buffer, rng.randrange(len(buffer)))
        while buffer:
            yield _swap_pop(buffer, rng.randrange(len(buffer)))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(self.cfg.num_workers, 1):
            raise DataError(
                f"LoaderConfig.num_workers={self.cfg.num_workers} but the DataLoader runs {workers} workers"
            )
        slot_index = self.rank * workers + worker
        plan = self.plan()
        slot = plan.slots[slot_index]
        skip = self.start_batches.get(slot_index, 0)
        counter = 0
        for batch in self._batches(self._shuffled(self._slot_samples(slot), slot_index)):
            if counter >= skip:
                yield self._collate(batch, slot_index, counter)
            counter += 1
        if counter != slot.batches:
            raise DataError(f"slot {slot_index} read {counter} batches, the manifest promised {slot.batches}")
        for _ in range(slot.padding):
            if counter >= skip:
                yield self._padding_batch(slot_index, counter)
            counter += 1

    def _batches(self, samples):
        """Lists of samples, ``batch_size`` each but the last: as they come, or length-bucketed.
        Either way a slot with n samples yields ceil(n / batch_size) batches, as planned."""
        size = self.cfg.batch_size
        if not self.cfg.length_buckets:
            yield from _chunks(samples, size)
            return
        keep = self.cfg.max_len + 1 if self.cfg.split == "train" else self.cfg.max_len
        run_size = size * max(1, self.cfg.shuffle_buffer // size)
        for run, group in enumerate(_chunks(samples, run_size)):
            # Stable sort: equal lengths keep the shuffled order.
            group.sort(key=lambda s: min(len(s[1]) + (len(s[2]) if s[3] is not None else 0), keep))
            batches = list(_chunks(group, size))
            random.Random(f"{self.cfg.seed}/{self.epoch}/buckets/{run}").shuffle(batches)
            yield from batches

    # -- collation -------------------------------------------------------------------------

    def _collate(self, samples, slot: int, counter: int) -> dict:
        split, max_len = self.cfg.split, self.cfg.max_len
        keep = max_len + 1 if split == "train" else max_len
        histories, targets = [], []
        for _, train, valid, test in samples:
            if split == "train":
                histories.append(train[-keep:])
            elif split == "valid":
                histories.append(train[-keep:])
                targets.append(valid[0])
            else:
                history = np.concatenate([train, valid]) if len(valid) else train
                histories.append(history[-keep:])
                targets.append(test[0])
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        width = int(lengths.max())
        batch = {
            "users": torch.tensor([schema.parse_key(s[0])[0] for s in samples], dtype=torch.int64),
            "lengths": torch.from_numpy(lengths),
            "weights": torch.ones(len(samples), dtype=torch.float32),
            "slot": slot,
            "slot_batch": counter,
        }
        flat = np.concatenate(histories)
        rows = np.repeat(np.arange(len(samples)), lengths)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        for feature in self.features:
            dtype = np.float32 if feature == "weight" else np.int64
            padded = np.zeros((len(samples), width), dtype=dtype)
            padded[rows, cols] = flat[feature]
            batch[_plural(feature)] = torch.from_numpy(padded)
            if targets:
                batch[f"target_{_plural(feature)}"] = torch.from_numpy(
                    np.array([t[feature] for t in targets], dtype=dtype)
                )
        if self.cfg.with_seen:
            seen = [np.concatenate([s[1]["item"], s[2]["item"]]) if split == "test" else s[1]["item"] for s in samples]
            batch["seen_lengths"] = torch.tensor([len(x) for x in seen], dtype=torch.int64)
            batch["seen_items"] = torch.from_numpy(np.concatenate(seen).astype(np.int64))
        return batch

    def _padding_batch(self, slot: int, counter: int) -> dict:
        batch = {
            "users": torch.full((1,), -1, dtype=torch.int64),
            "lengths": torch.ones(1, dtype=torch.int64),
            "weights": torch.zeros(1, dtype=torch.float32),
            "slot": slot,
            "slot_batch": counter,
        }
        for feature in self.features:
            dtype = torch.float32 if feature == "weight" else torch.int64
            width = 2 if self.cfg.split == "train" else 1
            batch[_plural(feature)] = torch.zeros((1, width), dtype=dtype)
            if self.cfg.split != "train":
                batch[f"target_{_plural(feature)}"] = torch.zeros(1, dtype=dtype)
        if self.cfg.with_seen:
            batch["seen_lengths"] = torch.zeros(1, dtype=torch.int64)
            batch["seen_items"] = torch.zeros(0, dtype=torch.int64)
        return batch


def shard_samples(directory: Path, entry: dict):
    """Raw samples ({"__key__": ..., "train.npy": bytes, ...}) of one shard listed in a manifest,
    checked against the manifest's sample count."""
    path = Path(directory) / entry["name"]
    read = 0
    sample: dict = {}
    try:
        for name, data in iter_members(path):
            key, _, ext = name.partition(".")
            if sample and key != sample["__key__"]:
                read += 1
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[ext] = data
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing") from None
    except (OSError, ValueError) as e:
        raise DataError(f"shard {path} is corrupt or truncated after {read} samples: {e}") from None
    if sample:
        read += 1
        yield sample
    if read != entry["samples"]:
        raise DataError(
            f"shard {path} holds {read} samples, the manifest says {entry['samples']}: truncated or replaced"
        )


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _swap_pop(items: list, index: int):
    items[index], items[-1] = items[-1], items[index]
    return items.pop()


def _plural(feature: str) -> str:
    return {"item": "items", "action": "actions", "gap": "gaps", "weight": "event_weights"}[feature]


def _round_robin(totals: list[int]) -> list[int]:
    """The order in which a DataLoader returns its workers' batches: worker 0, 1, ..., skipping
    exhausted workers."""
    left, order = list(totals), []
    while any(left):
        for worker, n in enumerate(left):
            if n:
                order.append(worker)
                left[worker] -= 1
    return order


def _epoch_order(dataset: SequenceDataset, epoch: int) -> list[int]:
    workers = max(dataset.cfg.num_workers, 1)
    first_slot = dataset.rank * workers
    dataset.set_epoch(epoch)
    slots = dataset.plan().slots[first_slot : first_slot + workers]
    return _round_robin([s.batches + s.padding for s in slots])


def slot_positions(dataset: SequenceDataset, epoch: int, batches: int) -> dict[int, int]:
    """How many batches each of this rank's slots (its dataloader workers) has delivered after
    the rank's first ``batches`` batches of ``epoch``: its position in the shard stream."""
    workers = max(dataset.cfg.num_workers, 1)
    done = [0] * workers
    for worker in _epoch_order(dataset, epoch)[:batches]:
        done[worker] += 1
    return {dataset.rank * workers + w: n for w, n in enumerate(done)}


def iterate_epoch(dataset: SequenceDataset, loader: DataLoader, epoch: int, skip: int = 0):
    """Yields one epoch of this rank's batches in a fixed order, after skipping ``skip`` batches.

    A DataLoader always starts its round-robin at worker 0, so a resumed epoch would otherwise
    interleave workers differently from the uninterrupted one. The order is planned here instead
    and batches are put back into it (a reorder buffer of at most the prefetch depth).
    """
    workers = max(dataset.cfg.num_workers, 1)
    first_slot = dataset.rank * workers
    order = _epoch_order(dataset, epoch)
    dataset.set_epoch(epoch, slot_positions(dataset, epoch, skip))
    pending: dict[int, list] = {w: [] for w in range(workers)}
    stream = iter(loader)
    for worker in order[skip:]:
        while not pending[worker]:
            batch = next(stream)
            pending[batch["slot"] - first_slot].append(batch)
        yield pending[worker].pop(0)


def _worker_context():
    """Workers start from a forkserver that has imported this module: as cheap as fork per
    epoch, but never forked from a training process whose communication threads may hold locks
    (plain fork from there hung a 2-rank run once in CI)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data.worker_process", "data.loader"])
    return context


def _init_worker(rank_pid: int, worker_id: int) -> None:
    """A preemption SIGTERM reaches the workers too (launchers signal the whole process group),
    but the rank needs them until it has checkpointed at its next step boundary: they ignore it
    (PyTorch installs its own SIGTERM handler in each worker, so this must happen here) and end
    once the rank is gone. PyTorch's own parent check cannot see that: workers are children of
    the forkserver, not of the rank, and orphans would live on holding the launcher's output."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def watch():
        while True:
            time.sleep(1.0)
            try:
                os.kill(rank_pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, name="lmrec-rank-watch", daemon=True).start()


def make_loader(
    directory: Path, cfg: LoaderConfig, rank: int = 0, world_size: int = 1
) -> tuple[SequenceDataset, DataLoader]:
    dataset = SequenceDataset(directory, cfg, rank, world_size)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.num_workers,
        persistent_workers=False,
        # Its own generator: a new iterator must not draw from the global torch RNG, or a run
        # resumed mid-epoch would see different dropout and negatives than an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
        multiprocessing_context=_worker_context() if cfg.num_workers else None,
        worker_init_fn=functools.partial(_init_worker, os.getpid()) if cfg.num_workers else None,
    )
    return dataset, loader
