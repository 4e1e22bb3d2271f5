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
