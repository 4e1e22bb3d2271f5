"""serve.quant: every dequantized value lies within half a quantization step of the original."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from serve.quant import (
    dequantize_channels_int8,
    dequantize_rows_int4,
    dequantize_rows_int8,
    quantize_channels_int8,
    quantize_rows_int4,
    quantize_rows_int8,
)

values = st.floats(-1e3, 1e3, allow_nan=False, width=32)
matrices = st.tuples(st.integers(1, 8), st.integers(1, 17)).flatmap(
    lambda shape: arrays(np.float32, shape, elements=values)
)


def _within_half_step(x, restored, scale):
    # Half a step, plus float32 rounding of values up to 1e3.
    slack = 0.5 * scale[:, None] + 1e-4 * (1 + np.abs(x))
    assert np.all(np.abs(restored - x) <= slack)


@settings(max_examples=200, deadline=None)
@given(matrices)
def test_row_wise_int8(x):
    codes, scale, offset = quantize_rows_int8(x)
    assert codes.dtype == np.int8 and codes.shape == x.shape
    _within_half_step(x, dequantize_rows_int8(codes, scale, offset), scale)


@settings(max_examples=200, deadline=None)
@given(matrices)
def test_row_wise_int4_packs_two_per_byte(x):
    codes, scale, offset = quantize_rows_int4(x)
    assert codes.dtype == np.uint8 and codes.shape == (x.shape[0], (x.shape[1] + 1) // 2)
    _within_half_step(x, dequantize_rows_int4(codes, scale, offset, x.shape[1]), scale)


@settings(max_examples=200, deadline=None)
@given(matrices)
def test_per_channel_int8(w):
    codes, scale = quantize_channels_int8(w)
    assert codes.dtype == np.int8 and np.abs(codes.astype(int)).max() <= 127
    _within_half_step(w, dequantize_channels_int8(codes, scale), scale)


def test_constant_rows_are_exact_and_steps_are_small_for_real_ranges():
    x = np.array([[0.5, 0.5, 0.5], [-1.0, 0.0, 1.0]], dtype=np.float32)
    codes, scale, offset = quantize_rows_int8(x)
    restored = dequantize_rows_int8(codes, scale, offset)
    assert np.array_equal(restored[0], x[0])
    assert scale[1] == np.float32(2.0 / 255)
    np.testing.assert_allclose(restored[1], x[1], atol=1.0 / 255)
