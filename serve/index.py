"""An approximate nearest-neighbour index of an artifact's item table, for catalogs of millions.

``lmrec export ... --index SPEC`` builds it from the stored (dequantized) rows with FAISS and
writes it into the artifact as ``index.faiss``, listed and checksummed in the manifest like every
other file; ``config.json`` records its kind and parameters under ``index``. It ranks by the
model's own similarity: inner product of the normalized vectors (cosine; the temperature does not
change the order) when the model normalizes, plain inner product otherwise.

A query fetches ``rerank * k`` neighbours plus as many as it excludes, drops the excluded ones
and rescores the rest exactly (the caller), so the scores returned are the model's; when fewer
than k neighbours are left the query is ranked exactly instead. FAISS is imported only when an
index is built or loaded.

SPEC is a kind with optional parameters, ``kind[:name=value,...]``:

- ``ivf-sq8``: inverted lists of 8-bit scalar-quantized vectors. ``nlist`` (lists; default
  sqrt(items) rounded up to a power of two), ``nprobe`` (lists searched; default nlist / 128),
  ``train`` (vectors the lists are trained on; default 64 per list).
- ``ivf-pq``: the same lists with product-quantized vectors, 8 bits per sub-vector: ``m``
  (sub-vectors; default dim / 4) besides the IVF parameters.
- ``hnsw``: a graph over the full vectors: ``m`` (links per node; default 32),
  ``ef_construction`` (default 80), ``ef_search`` (default 128).

All kinds take ``rerank`` (neighbours fetched per result; default 4).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.schema import FIRST_INDEX
from serve.artifact import ArtifactError

FILE = "index.faiss"
KINDS = ("ivf-sq8", "ivf-pq", "hnsw")
SEARCHES = ("auto", "exact", "index")  # auto: the index when the artifact has one
BUILD_ROWS = 1 << 18  # rows dequantized and added at a time
PARAMETERS = {
    "ivf-sq8": ("nlist", "nprobe", "train", "rerank"),
    "ivf-pq": ("nlist", "nprobe", "train", "m", "rerank"),
    "hnsw": ("m", "ef_construction", "ef_search", "rerank"),
}


@dataclass
class IndexSpec:
    kind: str
    nlist: int | None = None
    nprobe: int | None = None
    train: int | None = None
    m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    rerank: int = 4

    @classmethod
    def parse(cls, text: str) -> IndexSpec:
        """``kind[:name=value,...]``; a bad spec is one line naming what is wrong."""
        kind, _, rest = text.partition(":")
        if kind not in KINDS:
            raise ArtifactError(f"--index {text!r}: the kind must be one of {', '.join(KINDS)}")
        values = {}
        for part in filter(None, rest.split(",")):
            name, _, value = part.partition("=")
            if name not in PARAMETERS[kind]:
                raise ArtifactError(f"--index {text!r}: {kind} takes {', '.join(PARAMETERS[kind])}, not {name!r}")
            if not value.isdigit() or int(value) < 1:
                raise ArtifactError(f"--index {text!r}: {name} must be a positive integer, got {value!r}")
            values[name] = int(value)
        return cls(kind, **values)

    def resolved(self, rows: int, dim: int) -> IndexSpec:
        """The spec with every default filled in for a table of ``rows`` items of width ``dim``."""
        spec = IndexSpec(**asdict(self))
        if spec.kind.startswith("ivf"):
            spec.nlist = min(spec.nlist or 1 << max(0, math.ceil(math.log2(math.sqrt(rows)))), rows)
            spec.nprobe = min(spec.nprobe or max(1, spec.nlist // 128), spec.nlist)
            spec.train = min(spec.train or 64 * spec.nlist, rows)
        if spec.kind == "ivf-pq":
            spec.m = spec.m or max(1, dim // 4)
            if dim % spec.m:
                raise ArtifactError(f"--index ivf-pq: m={spec.m} must divide the item width {dim}")
        if spec.kind == "hnsw":
            spec.m = spec.m or 32
            spec.ef_construction = spec.ef_construction or 80
            spec.ef_search = spec.ef_search or 128
        return spec

    def to_config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ArtifactError("an item index needs FAISS: pip install faiss-cpu (or load with search='exact')") from None
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def _vectors(table, start: int, stop: int) -> np.ndarray:
    """Rows as the model compares them: stored values, normalized when the model normalizes."""
    rows = table.dequantize(start, stop)
    return np.ascontiguousarray((F.normalize(rows, dim=-1) if table.normalize else rows).numpy(), dtype=np.float32)


def build(table, spec: IndexSpec, directory: Path, log=print) -> dict:
    """Builds the index of ``table`` (a serve.recommender.ItemTable) into ``directory``/index.faiss;
    returns its config entry."""
    faiss = _faiss()
    rows = table.rows - FIRST_INDEX
    if rows < 1:
        raise ArtifactError("--index: the item table has no items")
    spec = spec.resolved(rows, table.dim)
    started = time.perf_counter()
    metric = faiss.METRIC_INNER_PRODUCT
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(table.dim, spec.m, metric)
        index.hnsw.efConstruction = spec.ef_construction
    else:
        quantizer = faiss.IndexFlatIP(table.dim)
        if spec.kind == "ivf-sq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, table.dim, spec.nlist, faiss.ScalarQuantizer.QT_8bit, metric
            )
        else:
            index = faiss.IndexIVFPQ(quantizer, table.dim, spec.nlist, spec.m, 8, metric)
        index.own_fields = True
        quantizer.this.disown()
        sample = np.sort(np.random.default_rng(0).choice(rows, size=spec.train, replace=False)) + FIRST_INDEX
        vectors = table.lookup(torch.from_numpy(sample))
        index.train(np.ascontiguousarray((F.normalize(vectors, dim=-1) if table.normalize else vectors).numpy()))
    for start in range(FIRST_INDEX, table.rows, BUILD_ROWS):
        index.add(_vectors(table, start, min(table.rows, start + BUILD_ROWS)))
    seconds = time.perf_counter() - started
    faiss.write_index(index, str(Path(directory) / FILE))
    log(
        f"built a {spec.kind} index of {rows:,} items in {seconds:.1f} s ({(Path(directory) / FILE).stat().st_size:,} bytes)"
    )
    return {"file": FILE, "rows": table.rows, "metric": "inner_product", "normalized": table.normalize,
            **spec.to_config(), "build_seconds": round(seconds, 1)}  # fmt: skip


def extend(source: Path, table, old_rows: int, directory: Path, entry: dict) -> dict:
    """The index of ``source`` with rows [old_rows, table.rows) of ``table`` added, into
    ``directory``; returns the updated config entry."""
    faiss = _faiss()
    index = faiss.read_index(str(Path(source) / entry["file"]))
    for start in range(old_rows, table.rows, BUILD_ROWS):
        index.add(_vectors(table, start, min(table.rows, start + BUILD_ROWS)))
    faiss.write_index(index, str(Path(directory) / entry["file"]))
    return {**entry, "rows": table.rows}


class ItemIndex:
    """A loaded index: neighbours of queries, minus each query's excluded rows."""

    def __init__(self, path: Path, entry: dict):
        self.path, self.entry = Path(path), entry
        knob = "nprobe" if str(entry.get("kind")).startswith("ivf") else "ef_search"
        if entry.get("kind") not in KINDS or any(key not in entry for key in ("file", "rows", "rerank", knob)):
            raise ArtifactError(f"{self.path / 'config.json'}: 'index' needs kind, file, rows, rerank and {knob}")
        faiss = _faiss()
        file = self.path / entry["file"]
        try:
            # Inverted lists stay in the file's pages, like the item table.
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if entry["kind"].startswith("ivf") else 0
            self.index = faiss.read_index(str(file), flags)
        except RuntimeError as e:
            raise ArtifactError(
                f"{file}: cannot be read as a FAISS index ({str(e).strip().splitlines()[-1]})"
            ) from None
        if self.index.ntotal != entry["rows"] - FIRST_INDEX:
            raise ArtifactError(f"{file}: {self.index.ntotal} items, config.json says {entry['rows'] - FIRST_INDEX}")
        self.rerank = entry["rerank"]
        if knob == "nprobe":
            self.index.nprobe = entry["nprobe"]
        else:
            self.index.hnsw.efSearch = entry["ef_search"]

    def candidates(self, query: torch.Tensor, k: int, exclude: list[np.ndarray]) -> list[np.ndarray | None]:
        """Per query, its neighbours' rows without the excluded ones; None when fewer than k are
        left (the caller ranks that query exactly)."""
        fetch = min(self.index.ntotal, self.rerank * k + max(len(e) for e in exclude))
        _, found = self.index.search(np.ascontiguousarray(query.float().numpy()), fetch)
        out: list[np.ndarray | None] = []
        for b, ids in enumerate(found):
            rows = ids[ids >= 0] + FIRST_INDEX
            if len(exclude[b]):
                rows = rows[~np.isin(rows, exclude[b])]
            out.append(rows if len(rows) >= k else None)
        return out
