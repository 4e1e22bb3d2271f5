"""Exact top-K over an int8 item table in one pass at about the speed of reading it.

The table is read once by a small compiled kernel (serve/topk.c) that scores every row against an
int8 copy of each query with integer dot products (AVX-512 VNNI where the CPU has it) and keeps,
per query, only the rows that can still be among the exact top k. The copy's error is bounded:
with ``q = qscale * q8 + e``, the approximate score of row i differs from the exact
``alpha_i (q . c_i) + beta_i sum(q)`` by ``alpha_i (e . c_i)``, at most ``|alpha_i| |c_i| |e|``
(Cauchy-Schwarz), which the kernel takes per 16-row tile (the largest ``|alpha_i| |c_i|`` of the
tile, computed at load) plus a float-rounding slack. A row whose upper bound is below the k-th
best lower bound cannot be in the top k; the few rows left are rescored exactly by the caller, so
the result is the float scoring's (ties aside) whatever the data.

The kernel is compiled for the host CPU on first use (the C compiler the install needs anyway)
into the cache directory, keyed by its source, the compiler flags and the CPU; without a compiler
the caller ranks with the float block path instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("topk.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
MIN_ROWS_PER_THREAD = 1 << 16  # below this a second thread costs more than it saves
TILE = 16  # the kernel's row tile: one error bound each


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmrec" / "kernels"
    return Path(os.environ.get("LMREC_KERNEL_CACHE", default))


def _cpu_fingerprint() -> str:
    """The CPU's feature flags: a cache shared by hosts of different CPUs keeps one build each."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compile_kernel(extra_flags: tuple[str, ...] = ()) -> Path:
    """The kernel's shared library for this CPU, compiled once into cache_dir(); raises
    OSError when no C compiler works."""
    compiler = os.environ.get("CC", "cc")
    flags = (*FLAGS, *extra_flags)
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), *map(str.encode, flags), _cpu_fingerprint().encode()]))
    library = cache_dir() / f"topk-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Compiled beside its final name and renamed: processes starting together never load half a file.
    fd, staged = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *flags, "-o", staged, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise OSError(f"{compiler} could not compile {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(staged, library)
    except (OSError, subprocess.SubprocessError) as e:
        Path(staged).unlink(missing_ok=True)
        raise OSError(str(e)) from None
    return library


def load_kernel(library: Path):
    lib = ctypes.CDLL(str(library))
    function = lib.lmrec_topk_candidates
    pointer, count = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, count, count, count, pointer, pointer, pointer, count, pointer, count, pointer]
    function.argtypes += [pointer, pointer, pointer, pointer, count, pointer, pointer, pointer, pointer, pointer]
    function.argtypes += [pointer, count, pointer]
    function.restype = count
    return function


@functools.cache
def kernel():
    """The compiled kernel, or None (with one warning) when this host cannot compile it."""
    try:
        return load_kernel(compile_kernel())
    except OSError as e:
        warnings.warn(f"exact int8 top-K falls back to float blocks: {e}", RuntimeWarning, stacklevel=2)
        return None


def _address(array: np.ndarray) -> int:
    return array.ctypes.data


class Int8Candidates:
    """Rows of an int8 table (codes (V, D), score = alpha * (q . codes) + beta * sum(q)) that can be
    in each query's exact top k. ``first`` rows are never candidates (the reserved rows)."""

    def __init__(self, function, codes: np.ndarray, alpha: np.ndarray, beta: np.ndarray, norms: np.ndarray, first: int):
        """``norms``: each row's code norm |c_i|."""
        self.function, self.codes, self.alpha, self.beta, self.first = function, codes, alpha, beta, first
        self.rows, self.dim = codes.shape
        # Per tile, the largest |alpha_i| |c_i|: times |e| it bounds each row's approximation error.
        bound = np.abs(alpha) * norms
        bound = np.pad(bound, (0, -len(bound) % TILE))
        self.tile_bound = np.ascontiguousarray(bound.reshape(-1, TILE).max(axis=1), dtype=np.float32)
        # Rounding rises with the largest terms: |alpha_i (q . c_i)| <= max(tile_bound) |q|, |beta_i sum(q)|.
        self.bound_max = float(self.tile_bound.max(initial=0.0))
        self.beta_max = float(np.abs(beta).max(initial=0.0))
        # A few ulps per summed term, for the approximation and for the exact rescoring alike.
        self.rounding = 8 * self.dim * 2.0**-24
        self._pool: ThreadPoolExecutor | None = None

    def _ranges(self) -> list[tuple[int, int]]:
        threads = max(1, min(torch.get_num_threads(), (self.rows - self.first) // MIN_ROWS_PER_THREAD))
        step = -(-(self.rows - self.first) // threads // TILE) * TILE
        bounds = [self.first + i * step for i in range(threads)] + [self.rows]
        return [(bounds[i], min(self.rows, bounds[i + 1])) for i in range(threads) if bounds[i] < self.rows]

    def candidates(self, query: torch.Tensor, k: int, exclude: list[np.ndarray]) -> list[np.ndarray | None]:
        """Per query: candidate rows, or None when more rows than the kernel keeps were too close
        to call (the caller ranks that query another way)."""
        call = KernelCall(self, query, k, exclude)
        ranges = self._ranges()
        if len(ranges) == 1:
            return call.merge([call.run(*ranges[0])])
        if self._pool is None or self._pool._max_workers < len(ranges):
            self._pool = ThreadPoolExecutor(len(ranges), thread_name_prefix="lmrec-topk")
        return call.merge(list(self._pool.map(lambda bounds: call.run(*bounds), ranges)))


class KernelCall:
    """One search's kernel arguments: the int8 queries, their error margins and the exclusions."""

    def __init__(self, table: Int8Candidates, query: torch.Tensor, k: int, exclude: list[np.ndarray]):
        self.table, self.k = table, k
        query = query.detach().float().contiguous().numpy()
        self.nq, dim = query.shape
        self.stride = -(-dim // 64) * 64
        qmax = np.abs(query).max(axis=1)
        self.qscale = np.where(qmax > 0, qmax / 127.0, 1.0).astype(np.float32)
        self.q8 = np.zeros((self.nq, self.stride), dtype=np.int8)
        self.q8[:, :dim] = np.rint(query / self.qscale[:, None]).clip(-127, 127)
        self.q8_sum = self.q8.sum(axis=1, dtype=np.int32)
        self.qsum = query.sum(axis=1, dtype=np.float32)
        residual = query.astype(np.float64) - self.qscale[:, None].astype(np.float64) * self.q8[:, :dim]
        self.qerror = (np.linalg.norm(residual, axis=1) * (1 + 1e-6)).astype(np.float32)
        qnorm = np.linalg.norm(query.astype(np.float64), axis=1)
        self.slack = (table.rounding * (table.bound_max * qnorm + table.beta_max * np.abs(self.qsum))).astype(
            np.float32
        )
        sorted_exclude = [np.unique(np.asarray(e, dtype=np.int64)) for e in exclude]
        self.offsets = np.zeros(self.nq + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([len(e) for e in sorted_exclude])
        self.exclude = np.concatenate([np.zeros(0, dtype=np.int64), *sorted_exclude])
        self.cap = 16 * k + 256

    def run(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows [start, stop): (candidate rows (nq, cap), lower and upper bounds of their exact
        scores, counts (nq,), -1 for a query whose candidates did not fit)."""
        t, nq, k, cap = self.table, self.nq, self.k, self.cap
        heaps = np.empty((nq, k), dtype=np.float32)
        rows = np.empty((nq, cap), dtype=np.int64)
        lower, upper = np.empty((nq, cap), dtype=np.float32), np.empty((nq, cap), dtype=np.float32)
        counts = np.empty(nq, dtype=np.int64)
        status = t.function(
            _address(t.codes), t.dim, start, stop, _address(t.alpha), _address(t.beta), _address(t.tile_bound), nq,
            _address(self.q8), self.stride, _address(self.q8_sum), _address(self.qscale), _address(self.qsum),
            _address(self.qerror), _address(self.slack), k, _address(self.exclude), _address(self.offsets),
            _address(heaps), _address(rows), _address(lower), _address(upper), cap, _address(counts),
        )  # fmt: skip
        if status < 0:
            raise MemoryError("the top-K kernel could not allocate its buffers")
        return rows, lower, upper, counts

    def merge(self, parts: list[tuple]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for b in range(self.nq):
            counts = [part[3][b] for part in parts]
            if min(counts) < 0:
                out.append(None)
                continue
            rows, lower, upper = (
                np.concatenate([part[i][b, :c] for part, c in zip(parts, counts, strict=True)]) for i in range(3)
            )
            if len(lower) > self.k:
                # Every part's k best lower bounds are among its candidates: this is the k-th best overall.
                kth = np.partition(lower, len(lower) - self.k)[len(lower) - self.k]
                rows = rows[upper >= kth]
            out.append(rows)
        return out
