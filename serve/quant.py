"""Quantization of an artifact's tensors, in numpy so that export can stream a table block by block.

- Item tables, row-wise and asymmetric: each row keeps a scale and an offset (its minimum), so a
  row of small values is not crushed by another row's large ones. int8 uses 256 levels, int4 16
  levels packed two to a byte. The error of every value is at most half its row's scale.
- Dense linear weights, per output channel and symmetric: ``q = round(w / scale)`` with
  ``scale = max|w_row| / 127``; the error is at most half the channel's scale.
"""

from __future__ import annotations

import numpy as np


def _row_range(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    low = x.min(axis=1)
    scale = (x.max(axis=1) - low) / (levels - 1)
    # A constant row has no range: any positive scale reproduces it exactly from the offset.
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, low.astype(np.float32)


def quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes int8 (V, D), scale float32 (V,), offset float32 (V,))."""
    x = np.asarray(x, dtype=np.float32)
    scale, offset = _row_range(x, 256)
    codes = np.rint((x - offset[:, None]) / scale[:, None]).clip(0, 255) - 128
    return codes.astype(np.int8), scale, offset


def dequantize_rows_int8(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float32) + 128.0) * scale[:, None] + offset[:, None]


def quantize_rows_int4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 (V, ceil(D / 2)), two 4-bit levels per byte, low nibble first; scale; offset)."""
    x = np.asarray(x, dtype=np.float32)
    scale, offset = _row_range(x, 16)
    levels = np.rint((x - offset[:, None]) / scale[:, None]).clip(0, 15).astype(np.uint8)
    if levels.shape[1] % 2:
        levels = np.pad(levels, ((0, 0), (0, 1)))
    return levels[:, 0::2] | (levels[:, 1::2] << 4), scale, offset


def dequantize_rows_int4(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, dim: int) -> np.ndarray:
    levels = np.empty((codes.shape[0], codes.shape[1] * 2), dtype=np.float32)
    levels[:, 0::2] = codes & 0x0F
    levels[:, 1::2] = codes >> 4
    return levels[:, :dim] * scale[:, None] + offset[:, None]


def quantize_channels_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 (out, in), scale float32 (out,)) for a linear layer's (out, in) weight."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.abs(w).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.rint(w / scale[:, None]).clip(-127, 127).astype(np.int8), scale


def dequantize_channels_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale[:, None]
