"""Offline jobs on an artifact: evaluation on prepared shards (the serving path measured the way
training measures), and batch scoring of many users into Parquet.

These jobs read data/'s shard reader, imported inside the job only: the online path never loads
it. Scoring splits its input into parts (a shard each, or a fixed number of users of an event
file); worker processes and torchrun ranks take whole parts; every part is written to a temporary
name and renamed, and a rerun skips the parts already there.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from data import schema
from metrics import DEFAULT_KS, RankingMetrics, ranks_from_top_k
from serve.recommender import Recommender

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"
# How long a rank waits for the others: at the start for all of them to arrive, at the end for the
# slowest one's parts. torchrun stops every rank as soon as one fails, so only a hung rank makes
# the others wait this long.
RANK_TIMEOUT = timedelta(hours=6)


class ScoringError(ValueError):
    pass


def evaluate_artifact(
    rec: Recommender, shards: str | Path, split: str = "test", batch_size: int | None = None, num_workers: int = 1
) -> dict:
    """HR@k and NDCG@k of the artifact over a split, full ranking, with the training evaluator's
    settings stored in the artifact (cut-offs, seen-item filtering, batch size) and the metrics
    module's tie rule, through the serving ranker's top-K lists. A model that generates semantic
    IDs ranks by a beam search of ``rec.beam_width``, whose lists certify ranks below
    ``beam_width - 1`` only: its cut-offs are those below the beam width, as in training."""
    from data.loader import LoaderConfig, iterate_epoch, make_loader

    settings = rec.config.get("evaluation", {})
    ks = tuple(settings.get("ks", DEFAULT_KS))
    filter_seen = settings.get("filter_seen", True)
    loader_cfg = LoaderConfig(
        split=split,
        batch_size=batch_size or settings.get("batch_size", 512),
        max_len=rec.max_len,
        num_workers=num_workers,
        with_seen=filter_seen,
    )
    dataset, loader = make_loader(str(shards), loader_cfg, 0, 1)
    cutoff = max(ks)
    if rec.beam_width is not None:
        cutoff = rec.beam_width - 1
        ks = tuple(k for k in ks if k <= cutoff)
    metrics, cold = RankingMetrics(max_rank=cutoff), []
    for batch in iterate_epoch(dataset, loader, epoch=0):
        hidden = rec.encode(batch["items"], batch["lengths"], batch.get("actions"), batch.get("gaps"))
        targets = batch["target_items"].numpy()
        exclude = None
        if filter_seen:
            seen = np.split(batch["seen_items"].numpy(), np.cumsum(batch["seen_lengths"].numpy())[:-1])
            exclude = [s[s != t] for s, t in zip(seen, targets, strict=True)]  # the target stays a candidate
        # One candidate more than the largest cut-off: a list certifies ranks below its last place.
        scores, top = rec.top_k(hidden, cutoff + 1, exclude)
        metrics.update(ranks_from_top_k(top, scores, batch["target_items"]), batch["weights"])
        cold.append((rec.vocab.popularity[targets] == 0).numpy()[(batch["weights"] > 0).numpy()])
    cold = np.concatenate(cold) if cold else np.zeros(0, dtype=bool)
    result = metrics.compute(ks)
    if cold.any():  # targets without training events (cold items) apart from the rest
        for name, chosen in (("cold", cold), ("warm", ~cold)):
            group = RankingMetrics(max_rank=cutoff)
            group.update(torch.from_numpy(metrics.ranks[chosen]))
            result[name] = group.compute(ks)
    return result


# -- scoring ---------------------------------------------------------------------------------------


@dataclass
class Part:
    """One unit of scoring work: a shard of prepared data, or a slice of users of an event file."""

    number: int
    shard: tuple[str, dict] | None = None  # (directory, manifest entry)
    samples: tuple[int, int] = (0, 0)  # the shard's samples [first, last) that this part scores
    users: list | None = None  # raw user IDs, for event input
    offsets: np.ndarray | None = None
    items: np.ndarray | None = None
    actions: np.ndarray | None = None
    gaps: np.ndarray | None = None

    @property
    def name(self) -> str:
        return f"part-{self.number:05d}.parquet"


def _events_parts(paths: list[Path], rec: Recommender, columns: dict, part_users: int) -> tuple[list[Part], dict]:
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = []
    for path in paths:
        table = _read_events(path)
        for role in ("user", "item"):
            if columns[role] not in table.column_names:
                raise ScoringError(f"{path}: no {role} column {columns[role]!r} (columns: {table.column_names})")
        keep = {
            role: columns[role] for role in ("user", "item", "time", "action") if columns[role] in table.column_names
        }
        tables.append(table.select(list(keep.values())).rename_columns(list(keep)))
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as e:
        raise ScoringError(f"the input files do not share column types: {e}") from None
    order = [("user", "ascending")] + ([("time", "ascending")] if "time" in table.column_names else [])
    table = table.take(pc.sort_indices(table, sort_keys=order))
    users = table["user"].to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, dtype=np.int64)
    offsets = np.r_[starts, len(users)]
    items = rec.vocab.indices(table["item"].to_numpy(zero_copy_only=False))
    actions = gaps = None
    if "action" in table.column_names and rec.uses_actions:
        values, inverse = np.unique(
            table["action"].cast(pa.string()).to_numpy(zero_copy_only=False), return_inverse=True
        )
        actions = np.array([rec.action_index(v) for v in values], dtype=np.int64)[inverse]
    if "time" in table.column_names and rec.uses_gaps:
        time = table["time"]
        if pa.types.is_timestamp(time.type):
            time = time.cast(pa.timestamp("s")).cast(pa.int64())
        ts = time.cast(pa.float64()).to_numpy()
        gaps = schema.gap_buckets(np.diff(ts, prepend=0.0)).astype(np.int64)
        gaps[starts] = schema.UNK
    unknown = int((items < 0).sum())
    parts = []
    for number, first in enumerate(range(0, len(starts), part_users)):
        last = min(len(starts), first + part_users)
        lo, hi = offsets[first], offsets[last]
        parts.append(
            Part(
                number,
                users=users[starts[first:last]].tolist(),
                offsets=offsets[first : last + 1] - lo,
                items=items[lo:hi],
                actions=actions[lo:hi] if actions is not None else None,
                gaps=gaps[lo:hi] if gaps is not None else None,
            )
        )
    return parts, {"events": int(len(items)), "unknown_item_events": unknown}


def _read_events(path: Path):
    import pyarrow as pa

    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix in (".csv", ".tsv", ".csv.gz", ".tsv.gz"):
            import pyarrow.csv as pcsv

            delimiter = "\t" if suffix.startswith(".tsv") else ","
            return pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter=delimiter))
        if suffix in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pjson

            return pjson.read_json(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ScoringError(f"{path}: cannot be read: {e}") from None
    raise ScoringError(f"{path}: unknown event file type {suffix!r} (expected .parquet, .csv, .tsv or .jsonl)")


def _shard_parts(directory: Path, rec: Recommender, part_users: int) -> tuple[list[Part], dict, str]:
    import pyarrow.parquet as pq

    from data.shards import load_manifest

    manifest = load_manifest(directory)
    # Shards hold table indices, not raw IDs: they must come from the artifact's vocabulary.
    items = pq.read_table(directory / "items.parquet", columns=["index", "raw_id"])
    index, raw = items["index"].to_numpy(), items["raw_id"].to_numpy(zero_copy_only=False)
    inside = index < rec.items.rows
    differs = ~inside.copy()
    differs[inside] = rec.vocab.raw_by_index[index[inside]] != (
        raw[inside] if rec.vocab.integer else raw[inside].astype(str)
    )
    if differs.any():
        at = int(np.flatnonzero(differs)[0])
        raise ScoringError(
            f"{directory}: prepared with another item vocabulary than the artifact (index {index[at]} is item "
            f"{raw[at]!r} there); prepare the events with --vocab-from the training shards, or pass event files"
        )
    parts = []
    for entry in manifest["shards"]:
        for first in range(0, max(entry["samples"], 1), part_users):
            last = min(entry["samples"], first + part_users)
            parts.append(Part(len(parts), shard=(str(directory), entry), samples=(first, last)))
    digest = hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()
    return parts, {"shards": len(manifest["shards"])}, digest


# One recommender per worker process, loaded by the pool's initializer.
_worker_rec: Recommender | None = None


def _init_worker(artifact: str, threads: int, search: str, beam_width: int | None) -> None:
    global _worker_rec
    torch.set_num_threads(threads)
    _worker_rec = Recommender.load(artifact, verify=False, search=search, beam_width=beam_width)


def _histories(part: Part, rec: Recommender):
    """(raw user IDs, [(items, actions, gaps)]) of a part, each history as table indices."""
    if part.shard is None:
        histories = []
        for b in range(len(part.users)):
            lo, hi = part.offsets[b], part.offsets[b + 1]
            known = part.items[lo:hi] >= 0
            histories.append(
                tuple(None if x is None else x[lo:hi][known] for x in (part.items, part.actions, part.gaps))
            )
        return part.users, histories
    import pyarrow.parquet as pq

    from data.loader import shard_samples
    from data.tar import load_npy

    directory, entry = part.shard
    user_ids = pq.read_table(Path(directory) / "users.parquet", columns=["index", "raw_id"])
    raw_users = dict(zip(user_ids["index"].to_pylist(), user_ids["raw_id"].to_pylist(), strict=True))
    users, histories = [], []
    first, last = part.samples
    for position, sample in enumerate(shard_samples(Path(directory), entry)):
        if not first <= position < last:
            continue
        user, window = schema.parse_key(sample["__key__"])
        if window:
            continue  # older windows of a long history; the most recent one (w000) is the model's input
        events = np.concatenate([load_npy(sample[f"{s}.npy"]) for s in schema.SEGMENTS])
        if not len(events):
            continue
        users.append(raw_users.get(user, user))
        names = events.dtype.names
        histories.append(tuple(events[f].astype(np.int64) if f in names else None for f in ("item", "action", "gap")))
    return users, histories


def _score_part(task: tuple[Part, str, int, bool, int]) -> tuple[str, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    part, out, k, exclude_seen, batch_size = task
    rec = _worker_rec
    users, histories = _histories(part, rec)
    top_items, top_scores = [None] * len(histories), [None] * len(histories)
    # Batches of similar lengths: padding every batch to its longest history wastes less.
    order = sorted(range(len(histories)), key=lambda b: min(len(histories[b][0]), rec.max_len))
    for first in range(0, len(order), batch_size):
        positions = order[first : first + batch_size]
        batch = [histories[b] for b in positions]
        exclude = [np.unique(h[0]) if exclude_seen else np.zeros(0, dtype=np.int64) for h in batch]
        scores, items = rec.rank(batch, k, exclude, batch_size=batch_size)
        for b, position in enumerate(positions):
            found = torch.isfinite(scores[b])
            top_items[position] = rec.vocab.raw(items[b][found].numpy())
            top_scores[position] = scores[b][found].numpy().astype(np.float32)
    table = pa.table({"user": users, "items": top_items, "scores": pa.array(top_scores, type=pa.list_(pa.float32()))})
    target = Path(out) / part.name
    tmp = target.with_name(f".{part.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, target)
    return part.name, len(users)


def score(
    artifact: str | Path,
    inputs: list[Path],
    out: Path,
    k: int = 100,
    workers: int = 1,
    exclude_seen: bool = True,
    part_users: int = 100_000,
    batch_size: int = 256,
    columns: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    search: str = "auto",
    beam_width: int | None = None,
) -> dict:
    """Top-``k`` for every user of ``inputs`` (one prepared shard directory, or event files) into
    the Parquet dataset directory ``out`` (user, items, scores), one file per part. Under torchrun
    (``WORLD_SIZE`` > 1) each rank takes every ``WORLD_SIZE``-th part; rank 0 claims (with
    ``overwrite``: clears) ``out`` before any rank writes to it, and writes ``_SUCCESS`` once every
    rank is done. ``search`` and ``beam_width``: as for ``Recommender.load``."""
    if not 1 <= k <= 10_000 or workers < 1 or part_users < 1 or batch_size < 1:
        raise ScoringError("--k must be in [1, 10000]; --workers, part size and batch size must be >= 1")
    load = {"search": search, "beam_width": beam_width}
    with _Ranks.join(log) as ranks:
        rec, parts, counts, job = ranks.run(_plan, artifact, inputs, k, exclude_seen, part_users, columns, load)
        ranks.in_turn(_claim, out, job, overwrite and ranks.rank == 0)
        mine = [p for p in parts if p.number % ranks.world == ranks.rank]
        tasks, users = ranks.run(
            _score_parts, rec, artifact, mine, out, k, exclude_seen, batch_size, workers, progress, log, load
        )
        done = ranks.in_turn(_finish, out, parts, {**job, **counts}, ranks.rank == 0)
    return {"parts": tasks, "users": users, "complete": done, **counts}


class _Ranks:
    """The torchrun ranks of one scoring job (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``), over a gloo process group. A single process is a job of one rank."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    @classmethod
    @contextmanager
    def join(cls, log):
        ranks = cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
        if ranks.world == 1:
            yield ranks
            return
        import torch.distributed as dist

        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise ScoringError(
                f"WORLD_SIZE={ranks.world} without {' and '.join(missing)}: start the ranks with torchrun"
            )
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        log(f"rank {ranks.rank} of {ranks.world}: joining the other ranks at {where}")
        store, _, _ = next(dist.rendezvous("env://", ranks.rank, ranks.world, timeout=RANK_TIMEOUT))
        # Every key under the launcher's restart count, as training does (train.distributed): a
        # restarted job must not read the failed attempt's addresses from torchrun's store.
        store = dist.PrefixStore(f"lmrec-score/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("gloo", store=store, rank=ranks.rank, world_size=ranks.world, timeout=RANK_TIMEOUT)
        try:
            yield ranks
        finally:
            dist.destroy_process_group()

    def run(self, step, *args):
        """``step(*args)`` on every rank, returning once all ranks have run it. When it fails on
        any rank it fails on all of them, so that no rank goes on to wait for one that gave up."""
        if self.world == 1:
            return step(*args)
        import torch.distributed as dist

        try:
            result, error = step(*args), None
        except Exception as e:
            result, error = None, e
        errors = [None] * self.world
        dist.all_gather_object(errors, None if error is None else str(error))
        if error is not None:
            raise error
        for rank, message in enumerate(errors):
            if message is not None:
                raise ScoringError(f"rank {rank} failed: {message}")
        return result

    def in_turn(self, step, *args):
        """``step(*args)`` on rank 0 first, then (once it is done there) on the other ranks."""
        first = self.run(step if self.rank == 0 else _nothing, *args)
        rest = self.run(_nothing if self.rank == 0 else step, *args)
        return first if self.rank == 0 else rest


def _nothing(*args) -> None:
    return None


def _plan(artifact, inputs: list, k: int, exclude_seen: bool, part_users: int, columns: dict | None, load: dict):
    """(recommender, parts, input counts, job description) of a scoring job."""
    rec = Recommender.load(artifact, **load)
    inputs = [Path(p) for p in inputs]
    for path in inputs:
        if not path.exists():
            raise ScoringError(f"{path}: no such input")
    if len(inputs) == 1 and (inputs[0] / "manifest.json").exists():
        parts, counts, fingerprint = _shard_parts(inputs[0], rec, part_users)
    else:
        if any(p.is_dir() for p in inputs):
            raise ScoringError(f"{[str(p) for p in inputs if p.is_dir()]}: a directory without manifest.json")
        columns = {"user": "user", "item": "item", "time": "timestamp", "action": "action", **(columns or {})}
        parts, counts = _events_parts(inputs, rec, columns, part_users)
        fingerprint = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in inputs]
    job = {
        "artifact": rec.version,
        "input": fingerprint,
        "k": k,
        "exclude_seen": exclude_seen,
        "search": "exact" if rec.index is None else "index",  # an index's results differ from exact ones
        "part_users": part_users,
        "parts": len(parts),
    }
    if rec.beam_width is not None:  # so does another beam's
        job["beam_width"] = rec.beam_width
    return rec, parts, counts, job


def _score_parts(
    rec, artifact, parts: list[Part], out: Path, k, exclude_seen, batch_size, workers, progress, log, load
):
    """Scores the ``parts`` not written yet: (parts scored, users scored)."""
    from tqdm import tqdm

    todo = [p for p in parts if not (out / p.name).exists()]
    if len(todo) < len(parts):
        log(f"{len(parts) - len(todo)} of {len(parts)} parts already scored in {out}; skipping them")
    tasks = [(p, str(out), k, exclude_seen, batch_size) for p in todo]
    users = 0
    bar = tqdm(total=len(tasks), unit="part", disable=not progress, desc="scoring")
    if workers == 1:
        global _worker_rec
        _worker_rec = rec
        for task in tasks:
            users += _score_part(task)[1]
            bar.update()
            bar.set_postfix_str(f"{users / max(bar.format_dict['elapsed'], 1e-9):,.0f} users/s")
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        with context.Pool(
            workers, initializer=_init_worker, initargs=(str(artifact), threads, load["search"], load["beam_width"])
        ) as pool:
            for _, n in pool.imap_unordered(_score_part, tasks):
                users += n
                bar.update()
                bar.set_postfix_str(f"{users / max(bar.format_dict['elapsed'], 1e-9):,.0f} users/s")
    bar.close()
    return len(tasks), users


def _finish(out: Path, parts: list[Part], summary: dict, write: bool) -> bool:
    """Whether every part is there; with ``write``, marks the output complete with ``_SUCCESS``."""
    done = all((out / p.name).exists() for p in parts)
    if done and write:
        (out / SUCCESS_FILE).write_text(json.dumps(summary) + "\n")
    return done


def _claim(out: Path, job: dict, overwrite: bool) -> None:
    """Creates ``out`` for this job, or checks that the parts already there come from the same job."""
    import shutil

    path = out / JOB_FILE
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != json.loads(json.dumps(job)):
            changed = sorted(key for key in job if previous.get(key) != json.loads(json.dumps(job[key])))
            raise ScoringError(
                f"{out}: holds parts of another scoring job (different {', '.join(changed)}); "
                "pass --overwrite or choose another --out"
            )
        return
    tmp = path.with_name(f".{JOB_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(job, indent=2) + "\n")
    os.replace(tmp, path)
