"""Dynamic batching: concurrent requests scored as one batch by one model thread.

A request on an idle server runs at once. Requests that arrive while a batch runs wait in the
queue; when the model thread is free it takes all of them, and, since that means the server is
under load, also those arriving within ``window`` of the oldest one (Triton's queue delay), up to
``max_users`` users. One model thread keeps the cores for the model's own threads and makes the
session store single-writer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

DEFAULT_WINDOW_S = 0.002
DEFAULT_MAX_USERS = 1024


@dataclass
class Job:
    """One request's work: ``size`` users; ``future`` gets the batch function's answer for it."""

    payload: object
    size: int
    arrived: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)


class Batcher:
    """Runs ``run(jobs)`` on batches of submitted jobs in one thread; ``run`` sets every job's
    future. ``observe(users, waits)`` reports each batch's size and its jobs' queue waits."""

    def __init__(
        self,
        run: Callable[[list[Job]], None],
        window: float = DEFAULT_WINDOW_S,
        max_users: int = DEFAULT_MAX_USERS,
        observe: Callable[[int, list[float]], None] | None = None,
    ):
        if window < 0 or max_users < 1:
            raise ValueError(f"batch window must be >= 0 s and max users >= 1, got {window} and {max_users}")
        self.run, self.window, self.max_users, self.observe = run, window, max_users, observe
        self._queue: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._loop, name="lmrec-batcher", daemon=True).start()

    def submit(self, payload, size: int) -> Future:
        job = Job(payload, size)
        self._queue.put(job)
        return job.future

    def _take(self) -> list[Job]:
        first = self._queue.get()
        batch, users = [first], first.size
        under_load = not self._queue.empty()
        deadline = first.arrived + self.window if under_load else 0.0
        while users < self.max_users:
            wait = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(job)
            users += job.size
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            started = time.perf_counter()
            if self.observe is not None:
                self.observe(sum(j.size for j in batch), [started - j.arrived for j in batch])
            try:
                self.run(batch)
            except BaseException as e:  # noqa: BLE001 - every waiting request must hear of it
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
