"""Dynamic batching for `--task serve`: a bounded queue in front of one worker thread that owns the model.

    python main.py --task serve        every chat completion is a Job in this queue

Requests that arrive while a batch runs wait (up to max_queue of them; more are refused at once, and the
server answers 503 with Retry-After; one still waiting at its deadline is answered 504 then); when the batch
ends, the worker takes the oldest waiting request and every other waiting one with the same sampling settings
and the same model (adapter, or the base without one), up to per_device_eval_batch_size, into one generate()
call: a batch never mixes adapters. Work that changes the model (an adapter reload) is a call() run on the same
thread between batches, so a running batch finishes on the adapter it started with. Each row still ends on its
own (max_tokens, stop strings, deadline, a client that left). transformers' generate() cannot add rows to a
running batch, so batches form between calls (no continuous batching; vLLM/SGLang do that, README: Serving).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from generation import Row

logger = logging.getLogger(__name__)
_unique = itertools.count()


@dataclass(eq=False)  # a job is itself: the queue finds and removes it by identity
class Job:
    row: Row
    temperature: float
    top_p: float
    seed: int | None
    served: object                      # serve.Served: .name, .engine and .adapter (read when the batch runs)
    confidences: bool                   # VLM: compute field confidences after generation
    explicit_max_tokens: bool           # the client set max_tokens (refused, not shortened, past the context)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    notes: dict | None = None
    error: BaseException | None = None
    _key: tuple = field(default=())

    def __post_init__(self):
        # A seeded request runs alone, so its answer depends on its seed only (not on its batch neighbours).
        seed = ("seed", next(_unique)) if self.seed is not None else None
        self._key = (self.served.name, self.temperature, self.top_p if self.temperature > 0 else None, seed)

    def resolve(self) -> None:
        self.loop.call_soon_threadsafe(lambda: self.future.done() or self.future.set_result(self))


class ThreadStopped(RuntimeError):
    """The generation thread has stopped: requests still waiting are answered with it (503)."""


class Scheduler:
    """Owns the model: every generate() runs on its thread, one batch at a time."""

    def __init__(self, max_batch: int, max_queue: int):
        self.max_batch, self.max_queue = max_batch, max_queue
        self.pending: deque[Job] = deque()
        self.calls: deque[tuple] = deque()  # (function, concurrent Future): run between batches
        self.cond = threading.Condition()
        self.running = 0
        self.stopping = False
        self.batches = self.served = self.cancelled = 0  # counters for /health
        self.failure: str | None = None  # why the generation thread stopped, if it ever does
        self.thread = threading.Thread(target=self._loop, name="generation", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    @property
    def healthy(self) -> bool:
        return self.failure is None and self.thread.is_alive()

    def submit(self, job: Job) -> bool:
        """Queue the job; False when the queue is full or the generation thread has stopped (the caller answers
        503)."""
        with self.cond:
            if self.stopping or not self.healthy or len(self.pending) >= self.max_queue:
                return False
            self.pending.append(job)
            self.cond.notify()
        if job.row.deadline != float("inf"):
            delay = max(0.0, job.row.deadline - time.monotonic())

            def arm():  # on the job's event loop; the timer goes when the job ends, not request_timeout later
                timer = job.loop.call_later(delay, self.expire, job)
                job.future.add_done_callback(lambda _: timer.cancel())

            job.loop.call_soon_threadsafe(arm)
        return True

    def expire(self, job: Job) -> None:
        """A request still waiting when its deadline passes is answered now (504), not when its turn comes; one
        that is running stops at its next token (generation checks the deadline)."""
        with self.cond:
            if job not in self.pending:
                return
            self.pending.remove(job)
        job.row.finish_reason = "timeout"
        job.resolve()

    def call(self, fn):
        """Run fn() on the generation thread before the next batch; a concurrent Future of its result."""
        from concurrent.futures import Future

        future = Future()
        with self.cond:
            if self.stopping or not self.healthy:
                future.set_exception(ThreadStopped(self.failure or "stopping"))
                return future
            self.calls.append((fn, future))
            self.cond.notify()
        return future

    def _calls(self) -> None:
        while True:
            with self.cond:
                if not self.calls:
                    return
                fn, future = self.calls.popleft()
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - the caller gets it; the thread goes on
                future.set_exception(e)

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.pending and not self.calls and not self.stopping:
                self.cond.wait()
        self._calls()
        with self.cond:
            if not self.pending:
                return [] if not self.stopping else None
            key = self.pending[0]._key
            batch = [j for j in self.pending if j._key == key][:self.max_batch]
            for j in batch:
                self.pending.remove(j)
            self.running = len(batch)
            return batch

    def _loop(self) -> None:
        """Batches until stopped. Whatever one batch raises answers its requests, and the thread goes on; should
        the thread end anyway, /health says so and every waiting request is answered."""
        try:
            while (batch := self._take()) is not None:
                if not batch:
                    continue
                try:
                    self._run(batch)
                except Exception as e:  # noqa: BLE001 - a bug in one batch must not stop the server
                    logger.exception("a batch of %d failed", len(batch))
                    for job in batch:
                        job.error = job.error or e
                finally:
                    self.running = 0
                    self.served += len(batch)
                    self.cancelled += sum(j.row.finish_reason == "cancelled" for j in batch)
                    for job in batch:
                        job.resolve()
        except BaseException as e:
            self.failure = f"{type(e).__name__}: {e}"[:300]
            logger.critical("the generation thread stopped: %s", self.failure)
            raise
        finally:
            with self.cond:
                self.failure = self.failure or ("stopped" if self.stopping else "ended")
                left, self.pending = list(self.pending), deque()
                calls, self.calls = list(self.calls), deque()
            for _, future in calls:
                future.set_exception(ThreadStopped(self.failure))
            for job in left:
                job.error = ThreadStopped(self.failure)
                job.resolve()

    def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:  # requests whose client left, or whose time ran out, while they waited
            if job.row.cancelled.is_set():
                job.row.finish_reason = "cancelled"
            elif now > job.row.deadline:
                job.row.finish_reason = "timeout"
            else:
                live.append(job)
        if not live:
            return
        first = live[0]
        served = first.served
        engine, adapter = served.engine, served.adapter  # read now: a reload between batches changes them
        try:
            engine.generate_rows([j.row for j in live], temperature=first.temperature, top_p=first.top_p,
                                 seed=first.seed, adapter=adapter)
            for job in live:
                if job.confidences and job.row.finish_reason in ("stop", "length"):
                    job.notes = engine.confidences(job.row, adapter=adapter)
                    job.notes.update(served.flags(job.notes))
        except Exception as e:  # noqa: BLE001 - one failed batch answers its requests with 500, the server goes on
            logger.exception("generation failed for a batch of %d", len(live))
            for job in live:
                job.error = e
        self.batches += 1
