"""WebDataset tar shards and their checksummed manifest.

``ShardWriter`` writes one tar per block of samples while hashing the bytes as they go out, so
the sha256 in the manifest costs no second read. Shards are standard tar files that
``webdataset.WebDataset`` reads as they are (a test checks it). Everything is written into a temporary
directory that ``atomic_output_dir`` renames into place only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.schema import SCHEMA_VERSION, SEGMENTS
from data.tar import end_of_archive, member, npy_bytes

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"


class ShardWriter:
    """Writes samples into one ustar shard, hashing bytes on their way to disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._sha256 = hashlib.sha256()
        self._bytes = 0
        self.samples = 0

    def _emit(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        self._bytes += len(chunk)
        self._file.write(chunk)

    def write(self, key: str, segments: dict[str, np.ndarray]) -> None:
        self._emit(b"".join(member(f"{key}.{name}.npy", npy_bytes(segments[name])) for name in SEGMENTS))
        self.samples += 1

    def close(self) -> dict:
        self._emit(end_of_archive())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {
            "name": self.path.name,
            "samples": self.samples,
            "bytes": self._bytes,
            "sha256": self._sha256.hexdigest(),
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


def write_text_atomic(path: Path, text: str) -> None:
    """Written under a temporary name, fsynced, then renamed: readers see the old or the new file."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))


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
        raise DataError(
            f"{path}: schema version {version}, this lmrec reads version {SCHEMA_VERSION}; prepare the data again"
        )
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
