"""What semantic-ID generative retrieval costs as the catalog grows, beside the ID model.

Synthetic throughout: V items get random semantic IDs, L = data.semantic_ids.default_levels(V)
levels of 256 codes plus the dedup level of width 256 (``dedup_suffixes``: each item's rank
among the items sharing its L codes), so every tuple is unique. The model is configs/ml-1m.yaml's
(llama, hidden 64, 2 layers, 200-event window, batch 64); the semantic-ID model is that recipe
with ``item_id=false, item_semantic_ids=true, semantic_id_head=true`` (configs/ml-1m-semantic.yaml).
Its peer everywhere is the ID model of the same recipe, measured in the same run. Every
measurement runs in a fresh process (one per model and size), so that peak memory is its own.

Sections (``--only`` picks some; the JSON keeps the others):

- ``train``: one training step (item lookup, forward, loss, backward with TorchRec's fused sparse
  update, dense AdamW step with the recipe's gradient clipping), as Trainer.train_step does it but
  on one gloo rank without DeepSpeed: the semantic-ID model (``loss.main=semantic_id``, the code
  table in TorchRec via ItemEmbeddings) against the ID model with the sampled softmax (1,024
  uniform + 1,024 in-batch negatives), 64 histories of 200 events of random items. Median step
  time after warm-up, and each process's peak RSS from model build on (the synthetic inputs are
  built before the peak is reset; the catalog's codes they leave are counted). The ID table is
  fp16 from ``--fp16-from`` items on, as benchmarks/catalog_scale.py runs it.
- ``serve``: one request, model only, on ``--serve-threads`` threads: the lean encode of a
  200-event history (LeanDecoder; the semantic model's input tokens pooled from its code rows)
  and beam 20 / top 10 over the trie of V leaves (model.semantic.beam_search, the call
  Recommender.top_k makes, the history excluded as seen), against the ID model's exact top 10 of
  V int8 rows (Recommender.top_k of an in-memory int8 table: the compiled kernel, or resident
  float rows for small tables, as serving ranks). p50/p99 over ``--requests`` requests, and the
  trie's build time and memory (and the ID table's load time and memory beside them).
- ``beam``: the same request at V = 10^6 and ML-1M's 3,416 items with beam 5 to 100 (top 10; a
  beam below 10 searches 10 wide, reported as the effective beam), and the share of the time in
  the encode. The goal (the issue's): beam 20, top 10, a 200-event history at p50 <= 10 ms.

Before anything runs, each process's peak memory is estimated (``estimate_bytes``; the JSON
records it beside the measured peak) and a size that cannot fit in this machine's memory is
refused with a message; one that does not fit in the memory available at its turn is skipped.
At 10^8 items the estimates are 9 GB (semantic training), 17 GB (ID training, fp16 table: fp32
would be 25.6 GB), 16 GB (the trie's build: its packed sort key, the sort and the node arrays)
and 13 GB (the int8 ID table): on a 24 GiB machine, run it with nothing else running. Where the ID model's training could not run at the largest size,
benchmarks/results/catalog_scale.json's 10^8-item run is cited (2 ranks, fp16 table). Writes
benchmarks/results/semantic_cost.json and prints markdown tables for the README.

    python benchmarks/semantic_cost.py [--sizes 1e4,1e6,1e8] [--only train,serve,beam] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from benchmarks.serve import HISTORY_LEN, _percentiles, _proc_status  # noqa: E402

SECTIONS = ("train", "serve", "beam")
RECIPE = ROOT / "configs" / "ml-1m.yaml"
SEMANTIC = [
    "model.item_id=false",
    "model.item_semantic_ids=true",
    "model.semantic_id_head=true",
    "loss.main=semantic_id",
]
ID_SAMPLED = ["loss.main=sampled", "loss.num_negatives=1024", "loss.in_batch_negatives=1024"]
CODES = 256  # codes per level, the dedup level's width too
ML1M_ITEMS = 3416
BEAMS = (5, 10, 20, 50, 100)
K = 10
GOAL = {"beam": 20, "k": K, "history_len": HISTORY_LEN, "p50_ms_max": 10.0}
GENERATION_BLOCK = 1 << 20
# Per-process memory besides what scales with the catalog (imports, model, a step's activations),
# measured at 10^4 items with a margin.
BASE_BYTES = {"train": 2.0e9, "serve": 0.7e9}
# On what grows with the catalog: the trie's estimate fell 7 % short of its measured peak at 10^7.
MARGIN = 1.1
RESERVE_BYTES = 1.0e9  # of the machine's memory: the kernel and the parent process


# -- synthetic catalogs ---------------------------------------------------------------------------


def semantic_width(items: int) -> int:
    """Code columns of an item: the k-means levels and the dedup level."""
    from data.semantic_ids import default_levels

    return default_levels(items, CODES) + 1


def synthetic_codes(items: int, seed: int = 0):
    """(codes (items + RESERVED, L + 1) int16 tensor, level sizes): random k-means levels and the
    dedup level the library assigns; the reserved rows (padding, unknown) are -1."""
    import numpy as np
    import torch

    from data.semantic_ids import dedup_suffixes
    from model.items import RESERVED

    width = semantic_width(items)
    rng = np.random.default_rng(seed)
    codes = np.full((items + RESERVED, width), -1, dtype=np.int16)
    for start in range(0, items, GENERATION_BLOCK):
        stop = min(items, start + GENERATION_BLOCK)
        codes[RESERVED + start : RESERVED + stop, :-1] = rng.integers(0, CODES, (stop - start, width - 1), np.int16)
    codes[RESERVED:, -1] = dedup_suffixes(codes[RESERVED:, :-1], CODES)
    return torch.from_numpy(codes), [CODES] * width


def synthetic_histories(items: int, count: int, length: int, seed: int = 1):
    """``count`` histories of ``length`` distinct item indices, (count, length) int64."""
    import numpy as np
    import torch

    from model.items import RESERVED

    rng = np.random.default_rng(seed)
    rows = [rng.choice(items, size=length, replace=False) + RESERVED for _ in range(count)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def model_config(semantic: bool, items: int, level_sizes: list[int]):
    """(training config, RecommenderConfig) of the recipe for ``items`` items (+ the reserved rows)."""
    from model.config import RecommenderConfig
    from model.items import RESERVED
    from train.config import load_config

    cfg = load_config(RECIPE, SEMANTIC if semantic else ID_SAMPLED)
    vocab = {"items": items + RESERVED, "actions": 0, "gaps": 0}  # ML-1M's shards have neither
    ids = {"level_sizes": level_sizes} if semantic else None
    return cfg, RecommenderConfig.build(cfg.model, vocab, semantic_ids=ids)


# -- memory ----------------------------------------------------------------------------------------


def _trie_nodes(items: int, width: int) -> list[int]:
    """Nodes per depth of the trie of random codes, at most: every prefix taken up to the catalog's size."""
    return [min(items, CODES**depth) for depth in range(1, width)] + [items]


def estimate_bytes(kind: str, model: str, items: int, fp16_from: int) -> int:
    """A process's peak memory, from what it holds per item (the JSON records the measured peak
    beside each estimate)."""
    width = semantic_width(items)
    # The codes' generation: int16 codes, the dedup's sorted copy and comparison, four int64 arrays.
    generation = items * (5 * width + 32)
    if kind == "train" and model == "semantic":
        # int16 codes turned int32 as training loads them, counts, has_id.
        held = items * (2 * width + 4 * width + 5)
    elif kind == "train":
        # The table, row-wise Adagrad's fp32 per row, counts and has_id.
        held = items * (64 * (2 if items >= fp16_from else 4) + 4 + 5)
    elif model == "semantic":
        # The int16 codes, then CodeTrie.build's peak (in its __post_init__): the packed sort key,
        # the sort's values and indices, the coded items, their codes in tuple order, the change
        # flags, item -> leaf and its arange, every depth's node codes and leaf ranges, and the
        # child ranges. The catalog comes after.
        nodes = _trie_nodes(items, width)
        held = items * (4 * width + 57) + 16 * sum(nodes) + 8 * (1 + sum(nodes[:-2]))
    else:
        # int8 rows, scale and offset, the ranking's per-row factors and norms (and their
        # temporaries), the vocabulary's per-row arrays.
        held = items * (64 + 8 + 8 + 4 + 12 + 12)
    return int(BASE_BYTES[kind] + MARGIN * max(generation, held))


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _fresh_peak() -> int:
    """Starts this process's peak-RSS count (VmHWM) afresh and returns the RSS now: what follows
    is measured, not the synthetic inputs' generation."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        # Freed generation buffers that the allocator keeps would count as the measured part's.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status(os.getpid())["VmRSS"]


def _memory(rss_before: int) -> dict:
    status = _proc_status(os.getpid())
    return {
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": status["VmHWM"],
        "peak_over_before_bytes": status["VmHWM"] - rss_before,
        "rss_end_bytes": status["VmRSS"],
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# -- workers (one process each) ---------------------------------------------------------------------


def _train_step(model, tables, catalog, objective, optimizer, grad_clip: float, items, lengths) -> None:
    """One optimizer step as Trainer.train_step takes it (without DeepSpeed, one rank)."""
    import torch

    from train.objectives import StepBatch, StepItems

    inputs, targets = items[:, :-1], items[:, 1:]
    input_lengths = (lengths - 1).clamp(min=0)
    positions = torch.arange(inputs.shape[1])[None, :] < input_lengths[:, None]
    weights = torch.ones(int(positions.sum()))
    total = weights.sum()
    step = StepBatch(inputs, input_lengths, positions, targets[positions], weights, total, None, total)
    samples = objective.sample(step)
    wanted = [
        inputs.reshape(-1),
        *([step.targets] if objective.scores_targets else []),
        *objective.extra_items(samples),
    ]
    ids = torch.unique(torch.cat(wanted))
    vectors = StepItems(model.item_encoder(ids, tables, catalog), ids)
    hidden = model(vectors(inputs), input_lengths)[positions].float()
    loss = objective(step, hidden, vectors, samples)
    loss.backward()  # also the tables' fused sparse update
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_worker(spec: dict) -> dict:
    import torch
    import torch.distributed as dist

    from model.items import RESERVED, ItemCatalog, item_tables
    from model.modeling import SequenceRecommender
    from train.distributed import compute_cleanup, compute_init
    from train.embeddings import ItemEmbeddings
    from train.objectives import ObjectiveContext, build_loss

    torch.set_num_threads(spec["threads"])
    items, semantic = spec["items"], spec["model"] == "semantic"
    codes, level_sizes = synthetic_codes(items) if semantic else (None, [])
    if codes is not None:
        codes = codes.to(torch.int32)  # as train.items.load_semantic_codes hands them to training
    counts = torch.ones(items + RESERVED, dtype=torch.int32)
    counts[:RESERVED] = 0
    batch_size, window = spec["batch_size"], spec["max_len"] + 1
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(RESERVED, items + RESERVED, (batch_size, window), generator=generator) for _ in range(4)]
    lengths = torch.full((batch_size,), window)
    # After the inputs: the allocator settings training runs with keep freed memory resident.
    env = compute_init(seed=0)
    rss_before = _fresh_peak()

    started = time.perf_counter()
    dtype = "fp16" if not semantic and items >= spec["fp16_from"] else "fp32"
    cfg, config = model_config(semantic, items, level_sizes)
    specs = item_tables(config)
    optim = cfg.optim
    tables = ItemEmbeddings(
        specs, env, cfg.parallel.sharding, optim.sparse_optimizer, optim.sparse_lr, cfg.schedule.seed, dtype
    )
    torch.manual_seed(cfg.schedule.seed)
    model = SequenceRecommender(config)
    model.train()
    catalog = ItemCatalog(counts, semantic_codes=codes)
    objective = build_loss(
        ObjectiveContext(cfg.loss, model, tables, catalog, torch.zeros(1, dtype=torch.bool), config.num_items,
                         env.device, dist.group.WORLD)
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    build_seconds = time.perf_counter() - started

    seconds = []
    for i in range(spec["warmup"] + spec["steps"]):
        started = time.perf_counter()
        _train_step(model, tables, catalog, objective, optimizer, optim.grad_clip, batches[i % len(batches)], lengths)
        seconds.append(time.perf_counter() - started)
    timed = seconds[spec["warmup"] :]
    median = statistics.median(timed)
    result = {
        "items": items,
        "loss": cfg.loss.main,
        "tables": {t.name: {"rows": t.rows, "dim": t.dim} for t in specs},
        "table_dtype": dtype,
        "table_bytes": sum(t.rows * t.dim for t in specs) * (2 if dtype == "fp16" else 4),
        "catalog_codes_bytes": 0 if codes is None else codes.numel() * codes.element_size(),
        "build_seconds": round(build_seconds, 2),
        "step_ms_median": round(median * 1e3, 2),
        "step_ms_min": round(min(timed) * 1e3, 2),
        "step_ms_max": round(max(timed) * 1e3, 2),
        "tokens_per_second": round(batch_size * spec["max_len"] / median),
        **_memory(rss_before),
    }
    if semantic:
        result["level_sizes"] = level_sizes
    compute_cleanup()
    return result


def _time_requests(histories, encode, searches: list, requests: int, seconds: float, warmup: int) -> list[dict]:
    """Percentiles of each request's encode, search and their sum, for each of ``searches``.
    Every request is answered once per search, in turn, so that other load on the machine falls
    on all of them alike."""
    for i in range(warmup):
        history = histories[i % len(histories)]
        for search in searches:
            search(encode(history), history)
    timings = [{"encode": [], "search": [], "total": []} for _ in searches]
    deadline = time.perf_counter() + seconds
    for i in range(requests):
        history = histories[i % len(histories)]
        for search, parts in zip(searches, timings):
            started = time.perf_counter()
            hidden = encode(history)
            encoded = time.perf_counter()
            search(hidden, history)
            done = time.perf_counter()
            parts["encode"].append((encoded - started) * 1e3)
            parts["search"].append((done - encoded) * 1e3)
            parts["total"].append((done - started) * 1e3)
        if time.perf_counter() > deadline and i + 1 >= min(requests, 20):
            break
    out = []
    for parts in timings:
        out.append({name: _percentiles(ms) for name, ms in parts.items()})
        out[-1]["encode_share"] = round(sum(parts["encode"]) / sum(parts["total"]), 3)
    return out


def _trie_bytes(trie) -> int:
    tensors = [*trie.codes, *trie.first, *trie.child_first, trie.leaf_items, trie.item_leaf]
    return sum(t.numel() * t.element_size() for t in tensors)


def serve_semantic_worker(spec: dict) -> dict:
    import torch

    from model.inference import LeanDecoder
    from model.items import RESERVED, SEMANTIC_TABLE, ItemCatalog, PlainItemTables
    from model.modeling import SequenceRecommender
    from model.semantic import CodeTrie, beam_search
    from train.embeddings import INIT_STD

    torch.set_num_threads(spec["threads"])
    items = spec["items"]
    codes, level_sizes = synthetic_codes(items)
    histories = synthetic_histories(items, spec["histories"], HISTORY_LEN)
    rss_before = _fresh_peak()
    started = time.perf_counter()
    trie = CodeTrie.build(codes, level_sizes)
    build_seconds = time.perf_counter() - started
    gc.collect()
    trie_memory = _memory(rss_before)

    _, config = model_config(True, items, level_sizes)
    torch.manual_seed(0)
    model = SequenceRecommender(config).eval()
    lean = LeanDecoder(model)
    tables = PlainItemTables(
        {SEMANTIC_TABLE: torch.randn(sum(level_sizes), config.architecture.hidden_size) * INIT_STD}
    )
    counts = torch.ones(items + RESERVED, dtype=torch.int8)
    counts[:RESERVED] = 0
    catalog = ItemCatalog(counts, semantic_codes=codes)
    lengths = torch.tensor([HISTORY_LEN])

    @torch.inference_mode()
    def encode(history):
        # The item vectors of a model without ID rows: its code rows, pooled (model.items).
        vectors = model.item_encoder(history, tables, catalog)
        return lean.encode(model.tokens(vectors[None]), lengths)

    found = dict.fromkeys(spec["beams"], K)

    def searcher(beam: int):
        def search(hidden, history):
            # Serving excludes the seen history, which also prunes the search (model.semantic._Live).
            scores, _ = beam_search(model.code_decoder, trie, hidden, beam, K, [history.numpy()])
            found[beam] = min(found[beam], int(torch.isfinite(scores).sum()))

        return search

    searches = [searcher(beam) for beam in spec["beams"]]
    timed = _time_requests(histories, encode, searches, spec["requests"], spec["seconds"], spec["warmup"])
    runs = [
        {"beam": beam, "effective_beam": max(beam, K), "fewest_items_returned": found[beam], **t}
        for beam, t in zip(spec["beams"], timed)
    ]
    memory = _memory(rss_before)
    return {
        "items": items,
        "level_sizes": level_sizes,
        "trie": {
            "build_seconds": round(build_seconds, 2),
            "bytes": _trie_bytes(trie),
            "nodes_per_depth": [len(c) for c in trie.codes],
            "codes_bytes": codes.numel() * codes.element_size(),
            **trie_memory,
        },
        "runs": runs,
        "peak_rss_bytes": memory["peak_rss_bytes"],
        "rss_end_bytes": memory["rss_end_bytes"],
    }


def serve_id_worker(spec: dict) -> dict:
    import numpy as np
    import pyarrow as pa
    import torch

    from model.items import RESERVED
    from model.modeling import SequenceRecommender
    from serve.artifact import OFFSET, SCALE
    from serve.quant import quantize_rows_int8
    from serve.recommender import BLOCK_ROWS, Recommender

    torch.set_num_threads(spec["threads"])
    items = spec["items"]
    rows = items + RESERVED
    _, config = model_config(False, items, [])
    dim = config.architecture.hidden_size
    codes = np.empty((rows, dim), dtype=np.int8)
    scale, offset = np.empty(rows, dtype=np.float32), np.empty(rows, dtype=np.float32)
    generator = np.random.default_rng(0)
    # Every block is one block of quantized normal rows with its columns shuffled: rows as i.i.d.
    # as drawn ones, with the same scales and offsets, where drawing and quantizing 10^8 rows
    # takes minutes.
    first = quantize_rows_int8(generator.standard_normal((min(rows, GENERATION_BLOCK), dim), dtype=np.float32))
    for start in range(0, rows, GENERATION_BLOCK):
        n = min(rows - start, GENERATION_BLOCK)
        codes[start : start + n] = first[0][:n, generator.permutation(dim)]
        scale[start : start + n], offset[start : start + n] = first[1][:n], first[2][:n]
    torch.manual_seed(0)
    dense = {k: v.numpy() for k, v in SequenceRecommender(config).state_dict().items()}
    artifact_config = {
        "model": config.model,
        "vocab": config.vocab,
        "quant": "int8",
        "items": {"rows": rows, "dim": dim},
    }
    # Raw IDs play no part in ranking: one vocabulary row keeps its per-item arrays out of the figures.
    vocab = pa.table({"index": [RESERVED], "raw_id": [RESERVED], "count": [1]})
    histories = synthetic_histories(items, spec["histories"], HISTORY_LEN)
    rss_before = _fresh_peak()
    started = time.perf_counter()
    tensors = {"items": codes, "items" + SCALE: scale, "items" + OFFSET: offset}
    rec = Recommender(ROOT, {}, artifact_config, dense, tensors, vocab, BLOCK_ROWS)
    load_seconds = time.perf_counter() - started
    gc.collect()
    load_memory = _memory(rss_before)
    lengths = torch.tensor([HISTORY_LEN])
    found = [K]

    def encode(history):
        return rec.encode(history[None], lengths)

    def search(hidden, history):
        scores, _ = rec.top_k(hidden, K, [history.numpy()])
        found[0] = min(found[0], int(torch.isfinite(scores).sum()))

    (timed,) = _time_requests(histories, encode, [search], spec["requests"], spec["seconds"], spec["warmup"])
    path = "int8 kernel (serve/topk.c)" if rec.items.candidates is not None else "float rows per block"
    return {
        "items": items,
        "ranking": "resident float rows" if rec.items.resident is not None else path,
        "table": {
            "load_seconds": round(load_seconds, 2),
            "bytes": codes.nbytes + scale.nbytes + offset.nbytes,
            **load_memory,
        },
        "fewest_items_returned": found[0],
        **timed,
    }


WORKERS = {("train", "semantic"): train_worker, ("train", "id"): train_worker,
           ("serve", "semantic"): serve_semantic_worker, ("serve", "id"): serve_id_worker}  # fmt: skip


# -- the parent ---------------------------------------------------------------------------------------


def _run_worker(spec: dict, timeout: float) -> dict:
    """``spec`` in a process of its own: its result, or why there is none."""
    with tempfile.TemporaryDirectory(prefix="lmrec-semantic-cost-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--result", str(result)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        started = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {timeout:.0f} s"}
        if done.returncode != 0 or not result.exists():
            killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
            return {"error": f"exit code {done.returncode}{killed}: {(done.stdout + done.stderr)[-2000:]}"}
        out = json.loads(result.read_text())
        out["process_seconds"] = round(time.perf_counter() - started, 1)
        return out


def _planned(kind: str, model: str, items: int, args) -> dict | str:
    """The worker's spec, or why it cannot run on this machine at all."""
    need = estimate_bytes(kind, model, items, args.fp16_from)
    total = _meminfo("MemTotal")
    if need > total - RESERVE_BYTES:
        return (
            f"{kind} {model} at {items:,} items needs ~{need / 1e9:.1f} GB, more than this machine's "
            f"{total / 1e9:.1f} GB allow"
        )
    return {"kind": kind, "model": model, "items": items, "estimate_bytes": need}


def _measure(plan: dict | str, args, **spec) -> dict:
    if isinstance(plan, str):
        return {"skipped": plan}
    available = _meminfo("MemAvailable")
    if plan["estimate_bytes"] > available:
        return {
            "skipped": f"needs ~{plan['estimate_bytes'] / 1e9:.1f} GB, {available / 1e9:.1f} GB available now",
            "estimate_bytes": plan["estimate_bytes"],
        }
    print(f"  {plan['kind']} {plan['model']} at {plan['items']:,} items", flush=True)
    out = _run_worker({**plan, **spec}, args.timeout)
    out["estimate_bytes"] = plan["estimate_bytes"]
    if "error" in out:
        print(f"    ERROR {out['error'][-500:]}", flush=True)
    return out


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def section_train(args, sizes: list[int]) -> dict:
    from train.config import load_config

    recipe = load_config(RECIPE)
    result: dict = {
        "recipe": str(RECIPE.relative_to(ROOT)),
        "semantic_overrides": SEMANTIC,
        "id_overrides": ID_SAMPLED,
        "batch_size": recipe.data.batch_size,
        "max_len": recipe.model.max_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.train_threads,
        "ranks": 1,
        "runs": [],
    }
    spec = {"steps": args.steps, "warmup": args.warmup, "threads": args.train_threads,
            "batch_size": recipe.data.batch_size, "max_len": recipe.model.max_len, "fp16_from": args.fp16_from}  # fmt: skip
    for items in sizes:
        run = {"items": items}
        for model in ("semantic", "id"):
            run[model] = _measure(_planned("train", model, items, args), args, **spec)
        run["semantic_vs_id_step"] = _ratio(run["semantic"].get("step_ms_median"), run["id"].get("step_ms_median"))
        run["semantic_vs_id_peak_rss"] = _ratio(run["semantic"].get("peak_rss_bytes"), run["id"].get("peak_rss_bytes"))
        result["runs"].append(run)
    ran = [r["items"] for r in result["runs"] if "step_ms_median" in r["id"]]
    result["id_largest_items_run"] = max(ran, default=None)
    if max(ran, default=0) < max(sizes):
        result["id_at_larger_sizes"] = _catalog_scale_citation()
    return result


def _catalog_scale_citation() -> dict | None:
    """The ID model's training at 10^8 items from benchmarks/catalog_scale.py, where it could run."""
    path = RESULTS / "catalog_scale.json"
    if not path.exists():
        return None
    for run in json.loads(path.read_text())["runs"]:
        if run["items"] >= 10**8:
            return {
                "file": str(path.relative_to(ROOT)),
                "setup": "2 gloo ranks, the table row-wise sharded, batch 64 per rank, real histories of 20-80 events",
                "items": run["items"],
                "table_dtype": run["table_dtype"],
                "step_ms_median": round(run["step_seconds_median"] * 1e3, 1),
                "rank0_peak_rss_bytes": run["rank0_peak_rss_bytes"],
                "note": "not comparable with this section's step times (other batch contents and world size)",
            }
    return None


def _serve_spec(args, beams) -> dict:
    return {"threads": args.serve_threads, "beams": list(beams), "requests": args.requests, "seconds": args.seconds,
            "warmup": args.request_warmup, "histories": args.histories}  # fmt: skip


def _goal(p50: float | None) -> bool | None:
    return None if p50 is None else p50 <= GOAL["p50_ms_max"]


def _verdicts(results: dict) -> list[dict]:
    """The goal's beam at every catalog measured, from both latency sections."""
    out = []
    for section in ("serve", "beam"):
        for run in results.get(section, {}).get("runs", []):
            for beam in run["semantic"].get("runs", []):
                if beam["beam"] == GOAL["beam"]:
                    p50 = beam["total"]["p50_ms"]
                    out.append({"section": section, "items": run["items"], "p50_ms": p50, "met": _goal(p50)})
    return out


def section_serve(args, sizes: list[int]) -> dict:
    result: dict = {"beam": GOAL["beam"], "k": K, "history_len": HISTORY_LEN, "threads": args.serve_threads,
                    "requests": args.requests, "runs": []}  # fmt: skip
    spec = _serve_spec(args, [GOAL["beam"]])
    for items in sizes:
        run = {"items": items}
        for model in ("semantic", "id"):
            run[model] = _measure(_planned("serve", model, items, args), args, **spec)
        semantic = run["semantic"]["runs"][0]["total"]["p50_ms"] if "runs" in run["semantic"] else None
        run["semantic_vs_id_p50"] = _ratio(semantic, run["id"].get("total", {}).get("p50_ms"))
        run["goal_met"] = _goal(semantic)
        result["runs"].append(run)
    return result


def section_beam(args) -> dict:
    result: dict = {"k": K, "beams": list(BEAMS), "history_len": HISTORY_LEN, "threads": args.serve_threads,
                    "requests": args.requests, "runs": []}  # fmt: skip
    spec = _serve_spec(args, BEAMS)
    for items in (ML1M_ITEMS, args.beam_items):
        run = {"items": items}
        for model in ("semantic", "id"):
            run[model] = _measure(_planned("serve", model, items, args), args, **spec)
        peer = run["id"].get("total", {}).get("p50_ms")
        for beam in run["semantic"].get("runs", []):
            beam["vs_id_p50"] = _ratio(beam["total"]["p50_ms"], peer)
        result["runs"].append(run)
    return result


# -- report ------------------------------------------------------------------------------------------


def _gb(value) -> str:
    return f"{value / 1e9:.2f}" if value else "-"


def _mb(value) -> str:
    return f"{value / 1e6:,.0f}" if value is not None else "-"


def _ms(value) -> str:
    return f"{value:.2f}" if value is not None else "-"


def _why(entry: dict) -> str:
    return "skipped" if "skipped" in entry else "error" if "error" in entry else "-"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def tables(results: dict) -> str:
    out = []
    train = results.get("train")
    if train and "runs" in train:
        rows = []
        for r in train["runs"]:
            s, i = r["semantic"], r["id"]
            rows.append([f"{r['items']:,}", _ms(s.get("step_ms_median")) if "step_ms_median" in s else _why(s),
                         _ms(i.get("step_ms_median")) if "step_ms_median" in i else _why(i),
                         _ms(r["semantic_vs_id_step"]), _gb(s.get("peak_rss_bytes")), _gb(i.get("peak_rss_bytes")),
                         i.get("table_dtype", "-")])  # fmt: skip
        out.append(
            f"Training step, 1 rank, {train['threads']} threads, batch {train['batch_size']} x {train['max_len']} events"
        )
        out.append(_markdown(["items", "semantic ms", "ID ms (sampled)", "semantic / ID", "semantic peak RSS GB",
                              "ID peak RSS GB", "ID table"], rows))  # fmt: skip
    serve = results.get("serve")
    if serve and "runs" in serve:
        rows = []
        for r in serve["runs"]:
            s, i = r["semantic"], r["id"]
            beam = s["runs"][0] if "runs" in s else None
            rows.append([
                f"{r['items']:,}",
                f"{_ms(beam['total']['p50_ms'])} / {_ms(beam['total']['p99_ms'])}" if beam else _why(s),
                f"{_ms(beam['encode']['p50_ms'])} / {_ms(beam['search']['p50_ms'])}" if beam else "-",
                f"{_ms(i['total']['p50_ms'])} / {_ms(i['total']['p99_ms'])}" if "total" in i else _why(i),
                _ms(r["semantic_vs_id_p50"]),
                f"{s['trie']['build_seconds']:.1f}" if beam else "-",
                f"{_mb(s['trie']['bytes'])} / {_mb(s['trie']['peak_over_before_bytes'])}" if beam else "-",
                f"{_mb(i['table']['bytes'])} / {i['table']['load_seconds']:.1f}" if "table" in i else "-",
                {True: "met", False: "missed", None: "-"}[r["goal_met"]],
            ])  # fmt: skip
        out.append(f"\nServing, model only, 1 history of 200 events, top {K}, beam {serve['beam']}, "
                   f"{serve['threads']} thread(s)")  # fmt: skip
        out.append(_markdown(["items", "semantic p50 / p99 ms", "encode / search p50 ms", "ID exact p50 / p99 ms",
                              "semantic / ID p50", "trie build s", "trie MB / build peak MB", "ID table MB / load s",
                              f"p50 <= {GOAL['p50_ms_max']:g} ms"], rows))  # fmt: skip
    beam = results.get("beam")
    if beam and "runs" in beam:
        rows = []
        for r in beam["runs"]:
            peer = r["id"].get("total", {}).get("p50_ms")
            for b in r["semantic"].get("runs", []):
                rows.append([f"{r['items']:,}", str(b["beam"]), str(b["effective_beam"]), _ms(b["total"]["p50_ms"]),
                             _ms(b["total"]["p99_ms"]), f"{b['encode_share']:.0%}", _ms(peer), _ms(b["vs_id_p50"])])  # fmt: skip
            if "runs" not in r["semantic"]:
                rows.append([f"{r['items']:,}", _why(r["semantic"]), "", "", "", "", _ms(peer), ""])
        out.append(f"\nLatency against the beam, top {K}, {beam['threads']} thread(s)")
        out.append(_markdown(["items", "beam", "effective beam", "p50 ms", "p99 ms", "encode share", "ID exact p50 ms",
                              "semantic / ID p50"], rows))  # fmt: skip
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="catalog sizes of train and serve (default 1e4,1e6,1e8; --quick: 1e4,1e5)")
    parser.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}; the JSON keeps the others")
    parser.add_argument("--quick", action="store_true", help="small sizes, few steps and requests (a smoke test)")
    parser.add_argument(
        "--beam-items", type=float, help="the large catalog of the beam section (default 1e6; --quick 1e5)"
    )
    parser.add_argument("--steps", type=int, help="timed training steps (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, help="training steps before timing (default 3; --quick 1)")
    parser.add_argument("--requests", type=int, help="timed requests per measurement (default 200; --quick 30)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget of one latency measurement")
    parser.add_argument("--train-threads", type=int, default=os.cpu_count())
    parser.add_argument("--serve-threads", type=int, default=1, help="as `lmrec serve --threads 1`")
    parser.add_argument("--fp16-from", type=int, default=50_000_000, help="ID tables fp16 from this many items on")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per process")
    parser.add_argument("--out", type=Path, default=RESULTS / "semantic_cost.json")
    parser.add_argument("--histories", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--request-warmup", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        Path(args.result).write_text(json.dumps(WORKERS[spec["kind"], spec["model"]](spec)))
        return

    quick = args.quick
    sizes = sorted(int(float(s)) for s in (args.sizes or ("1e4,1e5" if quick else "1e4,1e6,1e8")).split(","))
    args.beam_items = int(args.beam_items or (1e5 if quick else 1e6))
    args.steps = args.steps or (3 if quick else 10)
    args.warmup = args.warmup or (1 if quick else 3)
    args.requests = args.requests or (30 if quick else 200)
    sections = list(SECTIONS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")

    import torch

    results: dict = {}
    if args.only and args.out.exists():
        results = json.loads(args.out.read_text())  # keep the sections not run this time
        if results.get("quick") != quick:
            results = {}  # figures of a smoke test and of a full run do not go in one file
    results |= {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, {_meminfo('MemTotal') / 2**30:.1f} GiB, torch {torch.__version__}",
        "torch_threads": {"train": args.train_threads, "serve": args.serve_threads},
        "quick": quick,
        "goal": {**GOAL, "what": "beam 20, top-10, a 200-event history: p50 <= 10 ms on this CPU (model only)"},
        "command": " ".join(sys.argv),
    }
    catalogs = {"train": ("train", sizes), "serve": ("serve", sizes), "beam": ("serve", [ML1M_ITEMS, args.beam_items])}
    for name in sections:  # said before anything runs, not an hour into the run
        kind, items = catalogs[name]
        for plan in (_planned(kind, model, n, args) for n in items for model in ("semantic", "id")):
            if isinstance(plan, str):
                print(f"{name}: refused: {plan}", flush=True)
    run = {"train": lambda: section_train(args, sizes), "serve": lambda: section_serve(args, sizes),
           "beam": lambda: section_beam(args)}  # fmt: skip
    for name in sections:
        print(f"== {name}", flush=True)
        started, load = time.perf_counter(), os.getloadavg()
        section = run[name]()
        section["section_seconds"] = round(time.perf_counter() - started, 1)
        section["load_average_before"] = [round(x, 2) for x in load]  # other work on the machine
        section["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        results[name] = section
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    results["goal"]["verdicts"] = verdicts = _verdicts(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(tables(results))
    said = [f"{v['section']} {v['items']:,}: {v['p50_ms']:.2f} ms, {'met' if v['met'] else 'missed'}" for v in verdicts]
    print(f"\ngoal (beam {GOAL['beam']}, top {K}, p50 <= {GOAL['p50_ms_max']:g} ms): " + "; ".join(said))
    print(f"\nwrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
