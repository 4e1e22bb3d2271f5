"""serve.tensorfile: safetensors written block by block."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from serve.tensorfile import BlockWriter


def test_blocks_in_any_order_make_an_ordinary_safetensors_file(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 3)).astype(np.float32)
    codes = rng.integers(-128, 128, size=(10, 4)).astype(np.int8)
    path = tmp_path / "t.safetensors"
    with BlockWriter(path, {"table": (np.float32, table.shape), "codes": (np.int8, codes.shape)}, {"k": 1}) as out:
        for start in (8, 0, 4):
            out.write("codes", start, codes[start : start + 4])
            out.write("table", start, table[start : start + 4])
    loaded = load_file(str(path))
    np.testing.assert_array_equal(loaded["table"], table)
    np.testing.assert_array_equal(loaded["codes"], codes)


def test_missing_rows_and_misfit_blocks_are_errors(tmp_path):
    declared = {"x": (np.float32, (4, 2))}
    with pytest.raises(ValueError, match="rows written / expected"), BlockWriter(tmp_path / "a", declared) as out:
        out.write("x", 0, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="do not fit"), BlockWriter(tmp_path / "b", declared) as out:
        out.write("x", 3, np.zeros((2, 2)))


def test_read_rows_and_map_tensors_return_what_was_written(tmp_path):
    from serve.tensorfile import map_tensors, read_rows

    table = np.arange(70, dtype=np.float32).reshape(10, 7)
    codes = np.arange(30, dtype=np.int8).reshape(10, 3)
    with BlockWriter(tmp_path / "t.safetensors", {"a": (np.float32, (10, 7)), "b": (np.int8, (10, 3))}) as w:
        w.write("a", 0, table)
        w.write("b", 0, codes)
    np.testing.assert_array_equal(read_rows(tmp_path / "t.safetensors", "a", 3, 8), table[3:8])
    np.testing.assert_array_equal(read_rows(tmp_path / "t.safetensors", "b", 8, 20), codes[8:])
    mapped = map_tensors(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(mapped["a"], table)
    np.testing.assert_array_equal(mapped["b"], codes)
