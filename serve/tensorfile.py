"""Safetensors files written a row block at a time, for tables larger than memory.

Every tensor is declared up front (the safetensors header holds all shapes and offsets), then
row blocks of any tensor are written in any order at their place in the file. ``close`` checks
that every row was written and fsyncs. The result is an ordinary safetensors file: ``safe_open``
reads it, and ``get_slice`` reads it back a block at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
}


class BlockWriter:
    def __init__(
        self, path: str | Path, tensors: dict[str, tuple[np.dtype, tuple[int, ...]]], metadata: dict | None = None
    ):
        self.path = Path(path)
        self._layout: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        header: dict = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}}
        offset = 0
        for name, (dtype, shape) in tensors.items():
            dtype = np.dtype(dtype)
            if dtype not in _DTYPES:
                raise ValueError(f"{name}: dtype {dtype} is not supported")
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._layout[name] = (dtype, tuple(shape), offset)
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._data_start = 8 + len(text)
        self._rows = {name: 0 for name in tensors}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, len(text).to_bytes(8, "little") + text, 0)
        os.ftruncate(self._fd, self._data_start + offset)

    def write(self, name: str, start: int, block: np.ndarray) -> None:
        """Rows [start, start + len(block)) of tensor ``name``."""
        dtype, shape, offset = self._layout[name]
        block = np.ascontiguousarray(block, dtype=dtype)
        if block.shape[1:] != shape[1:] or start < 0 or start + len(block) > shape[0]:
            raise ValueError(f"{name}: rows {start}..{start + len(block)} of shape {block.shape} do not fit {shape}")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        os.pwrite(self._fd, block.tobytes(), self._data_start + offset + start * row_bytes)
        self._rows[name] += len(block)

    def close(self) -> None:
        try:
            missing = {n: (r, self._layout[n][1][0]) for n, r in self._rows.items() if r != self._layout[n][1][0]}
            if missing:
                raise ValueError(f"{self.path}: rows written / expected: {missing}")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            os.close(self._fd)


_NUMPY = {code: dtype for dtype, code in _DTYPES.items()}


def _layout(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, absolute byte offset), validated against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
    start = 8 + length
    layout = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _NUMPY.get(info.get("dtype"))
        shape = tuple(info.get("shape", ()))
        begin, end = info.get("data_offsets", (0, -1))
        if dtype is None or end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or start + end > size:
            raise ValueError(f"{path}: tensor {name!r} has an unsupported dtype or lies outside the file")
        layout[name] = (dtype, shape, start + begin)
    return layout


def map_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a copy-on-write memory map: nothing is read until
    used, pages are shared between processes serving the same file, and the arrays are writable
    (torch wants that) without ever writing to the file."""
    path = Path(path)
    tensors = {}
    for name, (dtype, shape, offset) in _layout(path).items():
        if int(np.prod(shape, dtype=np.int64)) == 0:
            tensors[name] = np.zeros(shape, dtype=dtype)
        else:
            tensors[name] = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)
    return tensors


def read_rows(path: str | Path, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of one tensor, read into fresh memory. Unlike slicing a memory map, the
    file's pages do not stay in the process, so streaming a table larger than memory stays small."""
    path = Path(path)
    layout = _layout(path)
    if name not in layout:
        raise ValueError(f"{path}: no tensor {name!r}")
    dtype, shape, offset = layout[name]
    stop = min(stop, shape[0])
    row = int(np.prod(shape[1:], dtype=np.int64))
    with open(path, "rb") as f:
        f.seek(offset + start * row * dtype.itemsize)
        block = np.fromfile(f, dtype=dtype, count=(stop - start) * row)
    return block.reshape(stop - start, *shape[1:])
