"""WebDataset tar shards and their checksummed manifest.

``ShardWriter`` writes one tar per block of samples while hashing the bytes as they go out, so
the sha256 in the manifest costs no second read. Everything is written into a temporary
directory that ``atomic_output_dir`` renames into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import webdataset as wds

from data.errors import DataError
from data.schema import SCHEMA_VERSION, SEGMENTS

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"


class _HashingFile(io.RawIOBase):
    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)

    def close(self) -> None:
        if not self.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        super().close()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class ShardWriter:
    """Writes samples (``{"__key__": str, "train.npy": bytes, ...}``) into one tar shard."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = _HashingFile(self.path)
        # mtime fixed so that the same data gives byte-identical shards (and checksums).
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0)
        self.samples = 0

    def write(self, key: str, segments: dict[str, np.ndarray]) -> None:
        sample = {"__key__": key}
        for name in SEGMENTS:
            sample[f"{name}.npy"] = npy_bytes(segments[name])
        self._tar.write(sample)
        self.samples += 1

    def close(self) -> dict:
        self._tar.close()
        self._file.close()
        return {
            "name": self.path.name,
            "samples": self.samples,
            "bytes": self._file.size,
            "sha256": self._file.sha256.hexdigest(),
        }


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool):
    """Yields a temporary sibling of ``out``; renames it to ``out`` if the block succeeds and
    removes it if not, so a half-written directory never looks complete."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


def load_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise DataError(f"{directory}: no {MANIFEST} (not a prepared shard directory, or preparation did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {version}, this lmrec reads version {SCHEMA_VERSION}; prepare the data again")
    return manifest


def verify_shards(directory: Path, manifest: dict) -> list[str]:
    """Checks every shard and vocabulary file against the manifest; returns the problems found."""
    problems = []
    entries = [(s["name"], s["sha256"]) for s in manifest["shards"]] + list(manifest.get("files", {}).items())
    for name, expected in entries:
        path = Path(directory) / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif (actual := sha256_file(path)) != expected:
            problems.append(f"{path}: sha256 {actual[:16]}... does not match the manifest's {expected[:16]}...")
    return problems
