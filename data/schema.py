"""The sample schema: the one definition that preparation, training, evaluation, scoring and
serving build on. Bump SCHEMA_VERSION whenever anything below changes meaning.

One WebDataset sample per user (or per window of a long history), key ``u{user:09d}w{window:03d}``.
Each sample holds three members, one per segment of that user's time-ordered events:

- ``train.npy``: the history used as model input and as next-item training pairs.
- ``valid.npy``: the validation segment. Its first event is the validation target; the input
  for validation is ``train`` alone.
- ``test.npy``: the test segment. Its first event is the test target; the input for testing is
  ``train`` followed by ``valid``.

Targets are separate members so no reader can feed them as history by accident.

Each member is a 1-D structured array (one row per event) whose fields are the manifest's
``features``, a subset of ``FEATURE_DTYPES`` in this order: ``item`` always; ``action`` when the
source has event types or ratings; ``gap`` when it has timestamps; ``weight`` when it has weights.

Splits:
- ``leave_one_out``: valid = the second-to-last event, test = the last event. Users with fewer
  than 3 events keep everything in ``train`` and are not evaluated.
- ``temporal``: two global times ``valid_start <= test_start``; events before ``valid_start`` are
  ``train``, events in ``[valid_start, test_start)`` are ``valid``, the rest ``test``.

Windows: a ``train`` segment longer than ``window`` events is cut, from its end backwards, into
windows of ``window`` events that overlap by ``window_overlap``. The most recent window (w000)
carries the user's valid and test segments; older windows carry empty ones and only train.

Batches (see data.loader) are right-padded with ``PAD`` and carry ``lengths``.
"""

from __future__ import annotations

import numpy as np

SCHEMA_VERSION = 1

PAD = 0  # index 0 of every vocabulary (items, actions, gaps): padding, never a real value
UNK = 1  # index 1: a value the vocabulary does not know (new item at serving time, unseen action)
FIRST_INDEX = 2  # first index of a real vocabulary entry

SEGMENTS = ("train", "valid", "test")
SPLITS = ("train", "valid", "test")
PADDING_SIDE = "right"

FEATURE_DTYPES = {
    "item": np.int32,
    "action": np.int16,
    "gap": np.int16,
    "weight": np.float32,
}

# Time gaps between consecutive events of a user, in seconds, are bucketed on a log2 scale:
# bucket FIRST_INDEX + floor(log2(1 + gap)), capped, so gaps from one second to decades fit in
# a vocabulary of GAP_VOCAB_SIZE entries. UNK marks the first event of a history (no gap).
GAP_BUCKETS = 40
GAP_VOCAB_SIZE = FIRST_INDEX + GAP_BUCKETS


def gap_buckets(gaps_seconds: np.ndarray) -> np.ndarray:
    """Log-scaled bucket of each gap; negative gaps (clock skew) count as zero."""
    gaps = np.maximum(np.asarray(gaps_seconds, dtype=np.float64), 0.0)
    # frexp's exponent e satisfies 2**(e-1) <= x < 2**e, i.e. floor(log2 x) = e - 1, exactly.
    exponent = np.frexp(1.0 + gaps)[1]
    return np.minimum(exponent + (FIRST_INDEX - 1), GAP_VOCAB_SIZE - 1).astype(np.int16)


def segment_dtype(features: list[str]) -> np.dtype:
    unknown = [f for f in features if f not in FEATURE_DTYPES]
    if unknown or not features or features[0] != "item":
        raise ValueError(f"features must start with 'item' and be among {list(FEATURE_DTYPES)}, got {features}")
    return np.dtype([(f, FEATURE_DTYPES[f]) for f in features])


def sample_key(user: int, window: int) -> str:
    return f"u{user:09d}w{window:03d}"


def parse_key(key: str) -> tuple[int, int]:
    return int(key[1:10]), int(key[11:14])


def eligible(split: str, n_train, n_valid, n_test):
    """Whether a sample with these segment lengths takes part in a split (ints or numpy arrays).

    train needs one input and one next-item label; valid and test need a target and a non-empty
    input. Preparation counts samples per shard with this same function, so the loader can plan
    equal step counts across ranks from the manifest alone.
    """
    if split == "train":
        return n_train >= 2
    if split == "valid":
        return (n_valid >= 1) & (n_train >= 1)
    if split == "test":
        return (n_test >= 1) & (n_train + n_valid >= 1)
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
