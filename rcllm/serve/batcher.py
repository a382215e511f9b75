"""The node's engine thread: requests that queue while it is busy are ranked as one batch.

torch modules and the hot tier are driven from this one thread only. Ranking requests are
taken in arrival order; when the thread frees up it takes every ranking request waiting, up to
``max_batch``, and runs their :class:`~rcllm.engine.job.RankJob` through
:meth:`NodeRunner.run_many` (one batched forward). Other
work (admitting replicated blocks) runs alone, in its place in the queue. ``max_batch=1`` is
one request at a time.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from rcllm.engine.job import RankJob
from rcllm.serve.runner import NodeRunner


class EngineBatcher:
    def __init__(self, runner: NodeRunner, max_batch: int = 8, name: str = "engine"):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.runner = runner
        self.max_batch = max_batch
        self._queue: collections.deque = collections.deque()  # ("rank", job, future) | ("call", (fn, args), future)
        self._ready = threading.Condition()
        self._closing = False
        self.batches = 0  # batched forwards run
        self.batched_requests = 0  # ranking requests they held
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def rank(self, job: RankJob) -> Future:
        """A future for the job's response (or its RequestError), as ``runner.run(job)`` gives."""
        return self._put("rank", job)

    def call(self, fn: Callable[..., Any], *args) -> Future:
        """A future for ``fn(*args)`` run on the engine thread, alone."""
        return self._put("call", (fn, args))

    def _put(self, kind: str, payload) -> Future:
        future: Future = Future()
        with self._ready:
            if self._closing:
                raise RuntimeError("the engine thread is shutting down")
            self._queue.append((kind, payload, future))
            self._ready.notify()
        return future

    def shutdown(self) -> None:
        """Finish everything queued, then stop the thread."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()

    @property
    def mean_batch(self) -> float:
        return self.batched_requests / self.batches if self.batches else 0.0

    def _take(self) -> list | None:
        with self._ready:
            while not self._queue and not self._closing:
                self._ready.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            taken = [first]
            if first[0] == "rank":
                while self._queue and self._queue[0][0] == "rank" and len(taken) < self.max_batch:
                    taken.append(self._queue.popleft())
            return taken

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            futures = [f for _, _, f in taken if f.set_running_or_notify_cancel()]
            live = [t for t in taken if t[2] in futures]
            if not live:
                continue
            try:
                if live[0][0] == "call":
                    fn, args = live[0][1]
                    live[0][2].set_result(fn(*args))
                    continue
                self.runner.run_many([job for _, job, _ in live])
                self.batches += 1
                self.batched_requests += len(live)
                for _, job, future in live:
                    if job.error is not None:
                        future.set_exception(job.error)
                    else:
                        future.set_result(job.response)
            except BaseException as e:  # noqa: BLE001 - every waiter must hear about it; the thread goes on
                for _, _, future in live:
                    if not future.done():
                        future.set_exception(e)
