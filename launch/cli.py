"""The ``lmrec`` command line. Subcommands import their packages lazily, so that ``lmrec serve``
never loads the training stack and ``lmrec data`` never loads torch's distributed side."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
import typing
from pathlib import Path

SOURCES = ("events", "sasrec", "sequences", "movielens", "recbole", "amazon", "synthetic")


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------
# lmrec data ...


def _event_columns(args):
    from data.readers import ColumnMap

    return ColumnMap(
        user=args.user_col,
        item=args.item_col,
        timestamp=args.time_col or None,
        action=args.action_col,
        rating=args.rating_col,
        weight=args.weight_col,
    )


def _read_source(args):
    from data import readers

    if args.source != "synthetic" and args.input is None:
        raise readers.DataError(f"--source {args.source} needs --input PATH")
    if args.source == "events":
        return readers.read_events(args.input, _event_columns(args), args.format, args.on_bad_rows)
    if args.source == "sasrec":
        return readers.read_sasrec(args.input, args.item_map, args.items, args.on_bad_rows)
    if args.source == "sequences":
        return readers.read_sequences(args.input, args.on_bad_rows)
    if args.source == "movielens":
        return readers.read_movielens(args.input, args.on_bad_rows)
    if args.source == "recbole":
        return readers.read_recbole(args.input, args.on_bad_rows)
    if args.source == "amazon":
        return readers.read_amazon(args.input, args.meta, args.on_bad_rows)
    from data.synthetic import SyntheticSpec, generate

    return generate(
        SyntheticSpec(
            users=args.users,
            items=args.num_items,
            events_per_user=args.events_per_user,
            seed=args.synthetic_seed,
        )
    )


def cmd_data_prepare(args) -> int:
    from data.config import PrepareConfig
    from data.prepare import prepare, summary_rows

    cfg = _config_from_options(PrepareConfig, args)
    source_args = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("func", "progress", "timings")
    }
    source = {"name": args.source, "args": source_args}
    started = time.perf_counter()
    if cfg.engine == "memory":
        raw = _read_source(args)
        read_seconds = time.perf_counter() - started
        report = prepare(raw, cfg, source)
    else:
        read_seconds = 0.0  # the engines read as part of their work (their "read" phase)
        report = _prepare_with_engine(args, cfg, source)
    print(f"prepared {cfg.out} in {read_seconds + report.seconds:.1f} s")
    if args.timings:
        print("timings: " + json.dumps({"read": round(read_seconds, 3), **report.phases}))
    print(_table(summary_rows(report.manifest)))
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _prepare_with_engine(args, cfg, source):
    """--engine duckdb / spark: they read event files (or a Spark table) themselves, in chunks."""
    from data import readers

    if args.source != "events":
        raise readers.DataError(
            f"--engine {cfg.engine} reads --source events (Parquet, CSV or TSV files or directories); "
            f"--source {args.source} is prepared in memory (--engine memory)"
        )
    if (args.input is None) == (getattr(args, "table", None) is None):
        raise readers.DataError("--source events needs --input PATH or, with --engine spark, --table NAME")
    columns = _event_columns(args)
    if cfg.engine == "duckdb":
        if args.table is not None:
            raise readers.DataError("--table needs --engine spark (it names a table in Spark's catalog)")
        from data.outofcore import prepare_out_of_core

        return prepare_out_of_core(args.input, columns, args.format, args.on_bad_rows, cfg, source)
    from data.spark import prepare_spark

    return prepare_spark(args.input, args.table, columns, args.format, args.on_bad_rows, cfg, source)


def cmd_data_inspect(args) -> int:
    from data.prepare import summary_rows
    from data.shards import load_manifest, verify_shards

    manifest = load_manifest(args.dir)
    print(f"{args.dir}: lmrec shards, schema version {manifest['schema_version']}, source {manifest['source']['name']}")
    print(_table(summary_rows(manifest)))
    if args.verify:
        problems = verify_shards(args.dir, manifest)
        checked = len(manifest["shards"]) + len(manifest.get("files", {}))
        if problems:
            print("\n".join(f"FAILED {p}" for p in problems))
            return 1
        print(f"verified: {checked} files match their sha256")
    return 0


def _model_item_vectors(source: Path, shards: Path, block: int = 1 << 16):
    """(V, D) float32 item rows of a trained model, read a block at a time, and what they came from."""
    import numpy as np

    from data.shards import load_manifest
    from serve.artifact import ArtifactError
    from train.checkpoint import CheckpointError
    from train.saved_model import SourceError, load_source

    size = load_manifest(shards)["vocab"]["items"]
    try:
        trained = load_source(source, shards)
        if trained.num_items != size:
            raise UsageError(
                f"--from-model {source}: {trained.num_items:,} item rows, but {shards} has {size:,} item indices; "
                "the model was not trained on this vocabulary"
            )
        first = trained.rows(0, min(size, block)).float().numpy()
        vectors = np.empty((size, first.shape[1]), dtype=np.float32)
        vectors[: len(first)] = first
        for start in range(len(first), size, block):
            vectors[start : start + block] = trained.rows(start, min(size, start + block)).float().numpy()
    except (SourceError, CheckpointError, ArtifactError) as e:
        raise UsageError(f"--from-model {source}: {e}") from None
    return vectors, {"path": str(source), "kind": trained.kind, "step": trained.training.get("step")}


def cmd_data_semantic_ids(args) -> int:
    from data.semantic_ids import build_semantic_ids

    started = time.perf_counter()
    vectors = info = None
    if args.from_model is not None:
        vectors, info = _model_item_vectors(args.from_model, args.shards)
    entry = build_semantic_ids(
        args.shards, args.levels, args.codes, args.seed, vectors, info, args.model_weight, args.overwrite
    )
    collisions = entry["collisions"]
    print(
        f"semantic IDs for {args.shards}: {entry['levels']} levels x {entry['codes']} codes + a dedup level; "
        f"largest collision group {collisions['max_group']} ({collisions['items_with_suffix']:,} items with a "
        f"suffix); {time.perf_counter() - started:.1f} s"
    )
    return 0


def cmd_data_fetch(args) -> int:
    from data.readers import fetch_ml100k

    print(fetch_ml100k(args.cache))
    return 0


def _add_config_options(cls, groups: dict) -> None:
    """One option per field of the dataclass ``cls``, from the field's metadata: ``help``,
    ``group`` (a key of ``groups``), and optionally ``flag``, ``negated`` and ``choices``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        target, flag = groups[meta["group"]], meta.get("flag", "--" + f.name.replace("_", "-"))
        kind = hints[f.name]
        if kind is bool:
            action = "store_false" if meta.get("negated") else "store_true"
            target.add_argument(flag, dest=f.name, action=action, help=meta["help"])
            continue
        scalar = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
        required = {"required": True} if f.default is dataclasses.MISSING else {"default": f.default}
        target.add_argument(flag, dest=f.name, type=scalar, choices=meta.get("choices"), help=meta["help"], **required)


def _config_from_options(cls, args):
    """The dataclass ``cls`` from the options ``_add_config_options`` made, validated by data.typed."""
    from data.errors import DataError
    from data.typed import TypedConfigError, parse

    try:
        return parse(cls, {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    except TypedConfigError as e:
        raise DataError(str(e)) from None


def _add_data(sub) -> None:
    from data.config import PrepareConfig

    data = sub.add_parser("data", help="prepare and inspect shards").add_subparsers(dest="data_cmd", required=True)

    p = data.add_parser("prepare", help="raw interaction logs -> WebDataset shards")
    p.add_argument("--source", choices=SOURCES, required=True)
    p.add_argument("--input", type=Path, help="file or directory (not needed for synthetic)")
    p.add_argument("--table", help="--engine spark: read the events from this table of Spark's catalog")
    p.add_argument("--on-bad-rows", choices=("fail", "skip"), default="fail")
    g = p.add_argument_group("generic events (--source events)")
    g.add_argument("--format", choices=("csv", "tsv", "parquet", "jsonl"), help="default: from the extension")
    g.add_argument("--user-col", default="user_id")
    g.add_argument("--item-col", default="item_id")
    g.add_argument("--time-col", default="timestamp", help="'' if the file has none (row order = time)")
    g.add_argument("--action-col")
    g.add_argument("--rating-col")
    g.add_argument("--weight-col")
    text = p.add_argument_group("item text")
    text.add_argument("--item-map", type=Path, help="sasrec: 'sasrec_id original_id' lines")
    text.add_argument("--items", type=Path, help="sasrec: MovieLens movies.dat with titles and genres")
    text.add_argument("--meta", type=Path, help="amazon: metadata JSON lines")
    g = p.add_argument_group("synthetic")
    g.add_argument("--users", type=int, default=10_000)
    g.add_argument("--num-items", type=int, default=5_000)
    g.add_argument("--events-per-user", type=float, default=50.0)
    g.add_argument("--synthetic-seed", type=int, default=0)
    processing = p.add_argument_group("processing")
    engine = p.add_argument_group("engine (memory: Polars; duckdb: out of core; spark: a Spark cluster)")
    _add_config_options(PrepareConfig, {None: p, "processing": processing, "item text": text, "engine": engine})
    processing.add_argument("--timings", action="store_true", help="print the seconds spent in each phase")
    p.set_defaults(func=cmd_data_prepare)

    p = data.add_parser("inspect", help="print a manifest's statistics")
    p.add_argument("dir", type=Path)
    p.add_argument("--verify", action="store_true", help="check every file's sha256")
    p.set_defaults(func=cmd_data_inspect)

    p = data.add_parser(
        "semantic-ids",
        help="semantic IDs for every item: residual k-means (FAISS) over its text vector, optionally with a model's",
    )
    p.add_argument("shards", type=Path, help="a shard directory prepared with --item-text")
    p.add_argument(
        "--from-model",
        type=Path,
        metavar="MODEL",
        help="also quantise the item rows of a model trained on these shards (a saved model, checkpoint or artifact)",
    )
    p.add_argument(
        "--levels",
        type=int,
        help="k-means levels before the dedup level; default: one to spare, with 256 codes 10^4 items -> 3, "
        "10^5 to 10^7 -> 4, 10^8 -> 5",
    )
    p.add_argument("--codes", type=int, default=256, help="centroids per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-weight", type=float, default=1.0, help="length of the model part against the text's 1")
    p.add_argument("--overwrite", action="store_true", help="replace the shards' semantic IDs")
    p.set_defaults(func=cmd_data_semantic_ids)

    p = data.add_parser("fetch-ml100k", help="download the embedded default data set (MovieLens-100k)")
    p.add_argument("--cache", type=Path, default=Path(".cache"))
    p.set_defaults(func=cmd_data_fetch)


class UsageError(Exception):
    """A bad configuration, reported as one line before anything is built."""


def cmd_train(args) -> int:
    from train.checkpoint import CheckpointError
    from train.config import ConfigError
    from train.saved_model import SourceError
    from train.train import main as train_main

    try:
        train_main(args.config, args.set, args.resume, args.init_from)
    except (ConfigError, CheckpointError, SourceError) as e:
        raise UsageError(str(e)) from None
    return 0


def cmd_checkpoint_consolidate(args) -> int:
    from train.checkpoint import CheckpointError
    from train.saved_model import SourceError, consolidate

    try:
        consolidate(args.checkpoint, args.out)
    except (CheckpointError, SourceError) as e:
        raise UsageError(str(e)) from None
    return 0


def cmd_checkpoint_list(args) -> int:
    from train.checkpoint import CheckpointError, list_checkpoints, read_meta, verify

    found = list_checkpoints(args.dir)
    if not found:
        raise UsageError(f"{args.dir}: no checkpoints")
    for path in found:
        try:
            meta = verify(path) if args.verify else read_meta(path)
            p = meta["progress"]
            status = "ok" if args.verify else "-"
            print(
                f"{path.name}  step {p['step']}  epoch {p['epoch']} batch {p['batch']}  world {meta['world_size']}  "
                f"ZeRO {meta['zero_stage']}  best valid NDCG@10 {p['best_ndcg']:.4f}  {status}"
            )
        except CheckpointError as e:
            print(f"{path.name}  BROKEN: {e}")
    return 0


def cmd_eval(args) -> int:
    from serve import artifact

    if (args.source / artifact.MANIFEST).exists():
        # An artifact is measured through the serving code; no training code is loaded.
        from serve.offline import evaluate_artifact
        from serve.recommender import Recommender

        try:
            rec = Recommender.load(args.source)
            result = evaluate_artifact(rec, args.shards or rec.config["shards"], args.split)
        except (artifact.ArtifactError, FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
        groups = {k: result.pop(k) for k in ("cold", "warm") if k in result}
        print(f"{'metric':<10}{'artifact':>10}")
        for key, value in result.items():
            print(f"{key:<10}{value:>10.4f}" if key != "users" else f"{key:<10}{value:>10}")
        for name, values in groups.items():
            print(
                f"{name} targets ({values['users']} users): HR@10 {values['HR@10']:.4f}, NDCG@10 {values['NDCG@10']:.4f}"
            )
        return 0
    from train.checkpoint import CheckpointError
    from train.evaluate import evaluate_source, metrics_table

    try:
        result = evaluate_source(args.source, args.split, args.shards)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(metrics_table(result))
    return 0


def cmd_export(args) -> int:
    if args.add_items:
        if args.index:
            raise UsageError("--index and --add-items: the added items go into the artifact's own index, if it has one")
        # Adding items works on an artifact alone: no training code is loaded.
        from serve.artifact import ArtifactError
        from serve.catalog import add_items

        try:
            add_items(args.source, args.add_items, args.out, overwrite=args.overwrite)
        except ArtifactError as e:
            raise UsageError(str(e)) from None
        return 0
    from train.export import ExportError, export

    try:
        export(
            args.source,
            args.out,
            args.quant,
            args.shards,
            evaluate=not args.no_eval,
            overwrite=args.overwrite,
            index=args.index,
        )
    except ExportError as e:
        raise UsageError(str(e)) from None
    return 0


def cmd_serve(args) -> int:
    from serve.artifact import ArtifactError
    from serve.http import ServeOptions, run

    if args.workers < 1:
        raise UsageError("--workers must be >= 1")
    for flag, value in (("--batch-window-ms", args.batch_window_ms), ("--session-store-mb", args.session_store_mb)):
        if value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if args.max_batch_users < 1:
        raise UsageError(f"--max-batch-users must be >= 1, got {args.max_batch_users}")
    _check_beam_width(args.beam_width)
    options = ServeOptions(
        max_body=args.max_body,
        threads=args.threads,
        batch_window=args.batch_window_ms / 1000,
        max_batch_users=args.max_batch_users,
        session_bytes=int(args.session_store_mb * (1 << 20)),
        search=args.search,
        beam_width=args.beam_width,
    )
    try:
        run(args.artifact, args.host, args.port, args.workers, args.token_file, options)
    except (ArtifactError, ValueError) as e:
        raise UsageError(str(e)) from None
    return 0


def _beam_width_argument(p) -> None:
    p.add_argument(
        "--beam-width",
        type=int,
        help="semantic-ID models: the beam of the constrained beam search (default: the artifact's, its training "
        "evaluation's); wider finds more of the most probable items, at more cost per request",
    )


def _check_beam_width(beam_width: int | None) -> None:
    if beam_width is not None and beam_width < 1:
        raise UsageError(f"--beam-width must be >= 1, got {beam_width}")


def cmd_score(args) -> int:
    from serve.artifact import ArtifactError
    from serve.offline import ScoringError, score

    _check_beam_width(args.beam_width)
    columns = {"user": args.user_col, "item": args.item_col, "time": args.time_col, "action": args.action_col}
    try:
        summary = score(
            args.artifact,
            args.input,
            args.out,
            k=args.k,
            workers=args.workers,
            exclude_seen=not args.include_seen,
            part_users=args.part_users,
            batch_size=args.batch_size,
            columns=columns,
            overwrite=args.overwrite,
            progress=not args.quiet,
            search=args.search,
            beam_width=args.beam_width,
        )
    except (ArtifactError, ScoringError) as e:
        raise UsageError(str(e)) from None
    state = "complete" if summary["complete"] else "incomplete: parts are missing (run it again to score them)"
    print(f"scored {summary['users']:,} users in {summary['parts']} parts into {args.out}; output {state}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (one process, or under torchrun / the deepspeed launcher)")
    p.add_argument("--config", help="YAML recipe, e.g. configs/ml-100k.yaml")
    p.add_argument("--set", action="append", default=[], metavar="A.B=VALUE", help="override a config field")
    p.add_argument(
        "--init-from",
        metavar="MODEL_OR_ARTIFACT",
        help="start from a trained model (RUN/best, a checkpoint or an artifact). Data prepared with --vocab-from "
        "its shards continue it (the daily retrain): known items keep their rows, and from a checkpoint their sparse "
        "optimizer state; new items start from the initialiser (or their text). Another catalog: backbone and text "
        "paths carry over, item rows start afresh. Either way the dense optimizer starts fresh and the "
        "learning-rate schedule restarts with its warm-up; a checkpoint found by --resume takes precedence",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from a checkpoint: auto = the newest good one in checkpoint.dir (none: start fresh); "
        "PATH = a checkpoint or a checkpoint directory",
    )
    p.set_defaults(func=cmd_train)

    checkpoint = sub.add_parser("checkpoint", help="list and consolidate training checkpoints").add_subparsers(
        dest="checkpoint_cmd", required=True
    )
    p = checkpoint.add_parser("consolidate", help="a checkpoint as a saved model (dense weights + full item table)")
    p.add_argument(
        "checkpoint", type=Path, help="a checkpoint (runs/x/checkpoints/step_000000120) or a checkpoint directory"
    )
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_checkpoint_consolidate)
    p = checkpoint.add_parser("list", help="the checkpoints in a directory, newest first")
    p.add_argument("dir", type=Path, help="e.g. runs/x/checkpoints")
    p.add_argument("--verify", action="store_true", help="check every file's sha256")
    p.set_defaults(func=cmd_checkpoint_list)

    p = sub.add_parser("eval", help="evaluate a trained model or a serving artifact on a split, in one process")
    p.add_argument(
        "source",
        type=Path,
        help="a saved model (RUN/best), a run, a checkpoint or checkpoint directory, or a serving artifact "
        "(evaluated through the serving code)",
    )
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--shards", help="default: the shards the model was trained on")
    p.set_defaults(func=cmd_eval)


def _add_serve(sub) -> None:
    p = sub.add_parser("export", help="a trained model into a quantized serving artifact")
    p.add_argument(
        "source",
        type=Path,
        help="a saved model (RUN/best), a run, a checkpoint or checkpoint directory; an artifact with --add-items",
    )
    p.add_argument(
        "--add-items",
        type=Path,
        metavar="ITEMS",
        help="add the items of this file (item, title, genres, description; .parquet/.csv/.jsonl) to the artifact "
        "SOURCE from their text alone, writing a new artifact to --out",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quant", choices=("int8", "int4", "fp16", "fp32"), default="int8")
    p.add_argument("--shards", type=Path, help="for the item vocabulary; default: the shards it was trained on")
    p.add_argument("--no-eval", action="store_true", help="skip measuring the artifact on the test split")
    p.add_argument(
        "--index",
        metavar="SPEC",
        help="also build an approximate item index (FAISS) into the artifact: ivf-sq8, ivf-pq or hnsw, with "
        "optional parameters, e.g. ivf-sq8:nlist=4096,nprobe=128 (defaults and parameters: serve/index.py)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="HTTP recommendations from an artifact")
    p.add_argument("artifact", type=Path)
    p.add_argument(
        "--search",
        choices=("auto", "exact", "index"),
        default="auto",
        help="rank with the artifact's approximate item index (auto: when it has one) or score every item (exact)",
    )
    _beam_width_argument(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument(
        "--threads", type=int, help="torch threads per worker (default: the worker's share of the cores, less one)"
    )
    p.add_argument("--token-file", type=Path, help="require 'Authorization: Bearer <token>' on /v1")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body, bytes")
    p.add_argument(
        "--batch-window-ms", type=float, default=2.0,
        help="under load, how long a batch waits for more concurrent requests (an idle server never waits)",
    )  # fmt: skip
    p.add_argument("--max-batch-users", type=int, default=1024, help="users scored in one model batch at most")
    p.add_argument(
        "--session-store-mb", type=float, default=256,
        help="memory for stored user sessions (incremental requests with user + seq), per worker",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("score", help="offline top-K for every user of shards or event files, into Parquet")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--input", type=Path, nargs="+", required=True, help="a prepared shard directory or event files")
    p.add_argument("--out", type=Path, required=True, help="a directory of part-NNNNN.parquet files")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--workers", type=int, default=1, help="worker processes (each takes whole parts)")
    p.add_argument(
        "--part-users", type=int, default=100_000, help="users (samples) per part: the unit of work and of resumption"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--include-seen", action="store_true", help="also recommend items already in the history")
    p.add_argument(
        "--search",
        choices=("auto", "exact", "index"),
        default="auto",
        help="rank with the artifact's approximate item index (auto: when it has one) or score every item (exact)",
    )
    _beam_width_argument(p)
    p.add_argument("--user-col", default="user")
    p.add_argument("--item-col", default="item")
    p.add_argument("--time-col", default="timestamp", help="seconds or a timestamp type; used when present")
    p.add_argument("--action-col", default="action", help="used when present")
    p.add_argument("--overwrite", action="store_true", help="discard parts of an earlier, different job")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_score)


def _run_launcher(command: list[str], endpoint: str | None = None) -> int:
    """Runs a launcher, passing SIGTERM/SIGINT on (preemption reaches the ranks) and turning a
    rendezvous timeout into one line that names the endpoint."""
    import signal
    import subprocess
    import threading

    print(f"lmrec launch: {shlex.join(command)}", flush=True)
    # torchrun sets one OpenMP thread per process when none is set, and prints a banner saying
    # so; lmrec sets the same itself (override it with OMP_NUM_THREADS).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    timed_out = threading.Event()

    def relay():
        for line in process.stderr:
            sys.stderr.write(line)
            if "RendezvousTimeoutError" in line:
                timed_out.set()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    previous = {
        sig: signal.signal(sig, lambda signum, frame: process.send_signal(signum))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reader.join(timeout=5)
    if code != 0 and timed_out.is_set():
        raise UsageError(
            f"the rendezvous at {endpoint} did not complete: not every node joined in time "
            "(check --nnodes, --master and that every node was started)"
        )
    return code


def cmd_launch_local(args) -> int:
    from launch.cluster import LaunchError, check_gpus, torchrun_command

    try:
        if args.gpus:
            check_gpus(args.nproc, "--gpus")
        command = torchrun_command(
            args.nproc, args.train_args, args.nnodes, args.node_rank, args.master, args.max_restarts, args.rdzv_timeout
        )
    except LaunchError as e:
        raise UsageError(str(e)) from None
    return _run_launcher(command, args.master)


def cmd_launch_deepspeed(args) -> int:
    from launch.cluster import LaunchError, check_gpus, deepspeed_command

    try:
        if args.gpus:
            check_gpus(args.num_gpus or 0, "--num-gpus")
        command = deepspeed_command(args.hostfile, args.train_args, args.num_gpus, args.node_rank, args.master)
    except LaunchError as e:
        raise UsageError(str(e)) from None
    return _run_launcher(command, args.master)


def cmd_launch_slurm(args) -> int:
    import subprocess

    from launch.cluster import LaunchError, SlurmJob

    try:
        job = SlurmJob(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            cpus_per_task=args.cpus_per_task,
            partition=args.partition,
            time=args.time,
            account=args.account,
            job_name=args.job_name,
            output_root=args.output_root,
            port=args.port,
            preempt_notice_s=args.preempt_notice,
        )
    except LaunchError as e:
        raise UsageError(str(e)) from None
    script = job.render(args.train_args)
    if not args.submit:
        print(script, end="")
        return 0
    Path(args.output_root).mkdir(parents=True, exist_ok=True)  # slurm does not create its log's directory
    command = ["sbatch", "--parsable"] + (["--wait"] if args.wait else [])
    try:
        done = subprocess.run(command, input=script, capture_output=True, text=True)
    except FileNotFoundError:
        raise UsageError("sbatch not found: --submit needs a SLURM client on this machine (or use --dry-run)") from None
    job_id = done.stdout.strip().split(";")[0]
    if job_id:
        print(f"submitted batch job {job_id}", flush=True)
    if done.returncode != 0:
        message = done.stderr.strip() or f"exit status {done.returncode}"
        raise UsageError(f"sbatch {'reports' if job_id else 'rejected the script'}: {message}")
    return 0


def cmd_launch_k8s(args) -> int:
    import yaml

    from launch.cluster import LaunchError, pytorchjob

    try:
        manifest = pytorchjob(
            args.name, args.image, args.nodes, args.gpus_per_node, args.train_args, args.cpus, args.memory,
            args.claim, args.mount, args.grace, args.namespace,
        )  # fmt: skip
    except LaunchError as e:
        raise UsageError(str(e)) from None
    print(yaml.safe_dump(manifest, sort_keys=False), end="")
    return 0


def _add_launch(sub) -> None:
    launch = sub.add_parser("launch", help="start training: torchrun, deepspeed launcher, SLURM, Kubernetes")
    kinds = launch.add_subparsers(dest="launch_cmd", required=True)
    after = "training arguments follow `--`, e.g. -- --config configs/ml-1m.yaml --set schedule.epochs=3"

    p = kinds.add_parser("local", help="torchrun on this node (one node, or one of several)", epilog=after)
    p.add_argument("--nproc", type=int, required=True, help="processes on this node (GPUs, or CPU ranks)")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master", help="HOST:PORT of the c10d rendezvous (required with --nnodes > 1)")
    p.add_argument("--max-restarts", type=int, default=0, help="elastic restarts (resume with --resume auto)")
    p.add_argument("--rdzv-timeout", type=int, default=900, help="seconds to wait for every node to join")
    p.add_argument("--gpus", action="store_true", help="one GPU per process: check that this node has them")
    p.set_defaults(func=cmd_launch_local)

    p = kinds.add_parser("deepspeed", help="the deepspeed launcher over a hostfile", epilog=after)
    p.add_argument("--hostfile", type=Path, required=True, help="lines of 'HOSTNAME slots=N'")
    p.add_argument("--num-gpus", type=int, help="processes per node (on CPU: CPU ranks)")
    p.add_argument("--gpus", action="store_true", help="check that this node has --num-gpus GPUs")
    p.add_argument("--node-rank", type=int, help="run this node's share only, without ssh (--no_ssh)")
    p.add_argument("--master", help="HOST:PORT of rank 0")
    p.set_defaults(func=cmd_launch_deepspeed)

    p = kinds.add_parser("slurm", help="render (and submit) an sbatch script", epilog=after)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: one CPU process per node")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--partition")
    p.add_argument("--time", help="e.g. 04:00:00")
    p.add_argument("--account")
    p.add_argument("--job-name", default="lmrec")
    p.add_argument("--output-root", default="runs/slurm", help="each job writes OUTPUT_ROOT/NAME-JOBID")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    p.add_argument("--preempt-notice", type=int, default=120, help="SIGTERM this many seconds before the end")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script (the default)")
    mode.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
    p.add_argument("--wait", action="store_true", help="with --submit: return when the job ends (sbatch --wait)")
    p.set_defaults(func=cmd_launch_slurm)

    p = kinds.add_parser("k8s", help="print a Kubeflow PyTorchJob manifest", epilog=after)
    p.add_argument("--name", default="lmrec")
    p.add_argument("--image", required=True, help="built from this repository's Dockerfile")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus", help="CPU limit per pod, e.g. 8")
    p.add_argument("--memory", help="memory limit per pod, e.g. 64Gi")
    p.add_argument("--claim", default="lmrec-runs", help="PersistentVolumeClaim shared by all pods")
    p.add_argument("--mount", default="/runs", help="where the claim is mounted; runs write below it")
    p.add_argument("--grace", type=int, default=90, help="termination grace period, > checkpoint deadline")
    p.add_argument("--namespace")
    p.set_defaults(func=cmd_launch_k8s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmrec", description="generative recommenders as causal language models")
    # The deepspeed launcher appends --local_rank=N; the same value is in LOCAL_RANK, which is what we read.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_train(sub)
    _add_serve(sub)
    _add_launch(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if argv[:1] == ["launch"] and "--" in argv:
        at = argv.index("--")
        argv, train_args = argv[:at], argv[at + 1 :]
    args = build_parser().parse_args(argv)
    args.train_args = train_args
    from data.errors import DataError
    from launch import notices

    notices.install()

    try:
        return args.func(args)
    except DataError as e:
        print(f"lmrec: error: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"lmrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
