"""Stored user sessions: what incremental serving keeps of a user between requests.

A client names a ``user`` and sends, with ``seq`` (the position of the request's first event in
the user's stream: 0 for the whole history), only the events since its last call. The server
keeps the user's model window (item, action and gap indices), every known item the user has had
(seen-item filtering), the key/value cache of the window and the last hidden state, so a new
event costs one position of the model instead of the whole history.

The store is per process and bounded in bytes; the least recently used sessions leave first. A
user it does not hold (evicted, restarted, reloaded, or another worker's) is a miss that the
client answers by sending the full history with ``seq`` 0.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from model.inference import KVCache

DEFAULT_CAPACITY_BYTES = 256 << 20


class SessionMiss(LookupError):
    """Stored sessions that cannot take a request's events: ``missing`` maps user -> the number of
    events the server holds for them (0: none)."""

    def __init__(self, missing: dict):
        self.missing = missing
        parts = [
            f"{user!r}: {'no stored session' if held == 0 else f'{held} events stored'}"
            for user, held in missing.items()
        ]
        super().__init__(f"send the full history (seq 0) for {', '.join(parts)}")


@dataclass
class Session:
    items: np.ndarray  # the model's window: the newest known item indices, at most max_len
    actions: np.ndarray  # their action indices (0: none given)
    gaps: np.ndarray  # their time-gap buckets (0: none given)
    seen: np.ndarray  # every known item of the stream, sorted and unique (seen-item filtering)
    events: int  # events of the stream applied, known or not: the next request's seq
    known: int  # known events of the stream (more than the window: it was truncated)
    last_timestamp: float  # of the last event applied (NaN: none given)
    cache: KVCache | None  # of the window; None when the model has no cached forward or no known event
    hidden: torch.Tensor | None  # the hidden state after the window's last event

    nbytes: int = field(init=False)  # a session is not changed once stored: counted once

    def __post_init__(self):
        arrays = sum(a.nbytes for a in (self.items, self.actions, self.gaps, self.seen))
        tensors = (self.cache.nbytes if self.cache is not None else 0) + (
            self.hidden.numel() * self.hidden.element_size() if self.hidden is not None else 0
        )
        self.nbytes = arrays + tensors + 256  # the objects around them, roughly


class SessionStore:
    """Sessions by user, least recently used evicted first, at most ``capacity`` bytes."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY_BYTES):
        if capacity < 0:
            raise ValueError(f"session store capacity must be >= 0 bytes, got {capacity}")
        self.capacity = capacity
        self._sessions: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, user) -> Session | None:
        with self._lock:
            session = self._sessions.get(user)
            if session is None:
                self.misses += 1
                return None
            self.hits += 1
            self._sessions.move_to_end(user)
            return session

    def put(self, user, session: Session) -> None:
        with self._lock:
            old = self._sessions.pop(user, None)
            if old is not None:
                self.bytes -= old.nbytes
            if session.nbytes > self.capacity:
                return  # larger than the whole store: the user's next incremental request misses
            self._sessions[user] = session
            self.bytes += session.nbytes
            while self.bytes > self.capacity:
                _, evicted = self._sessions.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
