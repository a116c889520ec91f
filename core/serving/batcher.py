"""Dynamic batching: concurrent requests are coalesced into batches run on
threads of their own, so the event loop keeps reading requests while batches run.

A job is one request's rows (already tokenized, padded to its own longest row).
A batcher thread takes the jobs waiting when it is free, waits at most `max_wait_ms`
for more while requests are still being read (`arriving`), up to
`max_batch_size` rows; when more rows wait than fit, it takes the oldest job and
those closest to it in length, so that a batch pads little. The batch is then
cut, in order of length, into the runtime calls that cost least by the cost
measured at warm-up (CallCost): one call on a GPU, where a call's fixed cost
dominates, several of similar lengths on a CPU, where every padded token costs.
Each call is padded to its own longest row, and each job gets its slice of the
logits. A job whose request gave up, or whose deadline passed, is not started.
On a CPU, as many calls run at once as the runtime has threads, one thread each
(Batcher); a call that is all the work there is takes every thread.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from mk.core.console import log
from mk.core.errors import first_line


class QueueFull(Exception):
    """More rows wait than the queue holds: the caller answers 503."""


class DeadlineExceeded(Exception):
    """The job's deadline passed before a batch took it: the caller answers 504."""


class InferenceFailed(Exception):
    """The runtime raised on the batch this job was in: the caller answers 500."""


@dataclass
class Job:
    inputs: dict[str, np.ndarray]  # [rows, width] each
    deadline: float                # time.monotonic() after which it is not started
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(init=False)
    started: bool = field(default=False, init=False)  # taken by a batcher thread (set under its lock)

    def __post_init__(self):
        self.future = self.loop.create_future()

    @property
    def rows(self) -> int:
        return self.inputs["input_ids"].shape[0]

    @property
    def width(self) -> int:
        return self.inputs["input_ids"].shape[1]

    def finish(self, result=None, error: Exception | None = None) -> None:
        def _set():
            if not self.future.done():  # the request may have given up already
                self.future.set_exception(error) if error else self.future.set_result(result)
        self.loop.call_soon_threadsafe(_set)


@dataclass(frozen=True)
class CallCost:
    """What one runtime call costs: a fixed part (launching the graph, waking the
    threads) and a part per token of the padded batch, fitted to two calls timed
    at warm-up. Real traffic is short texts of mixed lengths: a batch of them padded
    to its longest row does 1.6x the work of its real tokens, which a CPU pays in full."""
    fixed_s: float
    per_token_s: float

    @classmethod
    def measure(cls, runtime, small: dict[str, np.ndarray], large: dict[str, np.ndarray], repeats: int = 3):
        """Fit to the median times of a small and a large call (warmed up already)."""
        def seconds(inputs):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                runtime(inputs)
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        small_t, large_t = seconds(small), seconds(large)
        small_n, large_n = small["input_ids"].size, large["input_ids"].size
        if large_n <= small_n:  # nothing to fit a per-token part to: calls are never cut
            return cls(small_t, 0.0)
        per_token = max(large_t - small_t, 0.0) / (large_n - small_n)
        return cls(max(small_t - per_token * small_n, 0.0), per_token)

    def calls(self, jobs: list[Job]) -> list[list[Job]]:
        """The jobs sorted by length and cut into the runs that cost least in total
        (each run one call, padded to its longest job), shortest first."""
        if not jobs:
            return []
        jobs = sorted(jobs, key=lambda j: j.width)
        # a run never needs to start between two jobs of one width: only where the width grows
        starts = [i for i in range(len(jobs)) if i == 0 or jobs[i].width != jobs[i - 1].width]
        rows = list(itertools.accumulate((j.rows for j in jobs), initial=0))  # ints: numpy scalars are 5x slower
        ends = starts[1:] + [len(jobs)]
        best, cut = {0: 0.0}, {}
        for end in ends:
            width = jobs[end - 1].width
            best[end], cut[end] = min((best[s] + self.fixed_s + self.per_token_s * (rows[end] - rows[s]) * width, s)
                                      for s in starts if s < end)
        runs, end = [], len(jobs)
        while end:
            runs.append(jobs[cut[end]:end])
            end = cut[end]
        return runs[::-1]


def pad_batch(jobs: list[Job], pad_id: int) -> dict[str, np.ndarray]:
    """The jobs' rows stacked, padded to the longest row of the batch."""
    width = max(j.width for j in jobs)
    rows = sum(j.rows for j in jobs)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if any(k in j.inputs for j in jobs)]
    out = {k: np.full((rows, width), pad_id if k == "input_ids" else 0, dtype=np.int64) for k in keys}
    r = 0
    for j in jobs:
        for k in keys:
            if k in j.inputs:
                out[k][r:r + j.rows, :j.width] = j.inputs[k]
        r += j.rows
    return out


class Batcher:
    """`parallel` threads take the calls in turn. `narrow`, the same model on one
    thread of its own, runs a call while others run; a call alone runs on `runtime`,
    which may use every thread. On a CPU, two calls on one thread each do 1.1-1.7x
    the work of one call on two (its threads wait for each other at every operator;
    scripts/bench_serve_parts.py)."""

    def __init__(self, runtime, pad_id: int, max_batch_size: int, max_wait_ms: float, max_queue: int, metrics,
                 narrow=None, parallel: int = 1):
        self.runtime, self.narrow, self.pad_id, self.metrics = runtime, narrow, pad_id, metrics
        self.max_batch_size, self.max_wait, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        self.cost: CallCost | None = None  # measured at warm-up; until then a batch is one call
        self.queue: list[Job] = []
        self.queued_rows = 0
        self.calls: collections.deque[list[Job]] = collections.deque()  # a batch's calls not yet started
        self.running = 0  # calls in the runtime now
        self.arriving = 0  # requests being read or tokenized: more rows are on their way
        self.cond = threading.Condition()
        self.stopping = False
        self.threads = [threading.Thread(target=self._work, name=f"mk-batcher-{i}", daemon=True)
                        for i in range(parallel)]
        for t in self.threads:
            t.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is stopping")
            if self.queued_rows and self.queued_rows + job.rows > self.max_queue:
                raise QueueFull(f"{self.queued_rows} inputs are waiting; the queue holds {self.max_queue}")
            self.queue.append(job)
            self.queued_rows += job.rows
            self.metrics.queue_depth.set(self.queued_rows)
            self.cond.notify()

    def stop(self) -> None:
        """Run what was accepted, then end the threads."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for t in self.threads:
            t.join()

    def _take(self) -> list[Job]:
        """Jobs for the next batch (called with the lock held)."""
        self.queue = live(self.queue)
        self.queued_rows = sum(j.rows for j in self.queue)
        if self.queued_rows <= self.max_batch_size:
            taken, self.queue = self.queue, []
        else:
            first, rest = self.queue[0], self.queue[1:]
            taken, rows = [first], first.rows
            for j in sorted(rest, key=lambda j: abs(j.width - first.width)):
                if rows + j.rows <= self.max_batch_size:
                    taken.append(j)
                    rows += j.rows
            chosen = set(map(id, taken))
            self.queue = [j for j in self.queue if id(j) not in chosen]
        self.queued_rows -= sum(j.rows for j in taken)
        self.metrics.queue_depth.set(self.queued_rows)
        return taken

    def _next(self):
        """The jobs of the next runtime call (the next call of a batch already cut, or a new
        batch, cut) and the runtime to run it on; counted as running from here."""
        with self.cond:
            while not self.calls:
                while not (self.queue or self.calls or self.stopping):
                    self.cond.wait()
                if self.calls:  # cut by another thread
                    break
                if not self.queue:
                    return None  # stopping, and nothing left
                until = time.monotonic() + self.max_wait
                while self.queued_rows < self.max_batch_size and self.arriving and not (self.stopping or self.calls):
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
                self.calls.extend(self._calls(self._take()))
            jobs = self.calls.popleft()
            for j in jobs:
                j.started = True
            more = len(self.calls) + bool(self.queue)
            if more:
                self.cond.notify(more)  # threads that wait may take the other calls
            alone = not (self.running or self.calls or self.queue)
            self.running += 1
            return jobs, self.runtime if alone or self.narrow is None else self.narrow

    def _work(self) -> None:
        while (taken := self._next()) is not None:
            try:
                self._run(*taken)
            finally:
                with self.cond:
                    self.running -= 1

    def _calls(self, jobs: list[Job]) -> list[list[Job]]:
        if self.cost is None:  # not measured yet: the batch is one call
            return [jobs] if jobs else []
        return self.cost.calls(jobs)

    def _run(self, jobs: list[Job], runtime) -> None:
        jobs = live(jobs)  # the calls before this one took time
        if not jobs:
            return
        batch = pad_batch(jobs, self.pad_id)
        try:
            logits = np.asarray(runtime(batch), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 — this call's requests fail; the server keeps serving
            fail(jobs, e, len(batch["input_ids"]))
            return
        self.metrics.batch(rows=len(logits), tokens=int(np.count_nonzero(batch["attention_mask"])))
        r = 0
        for j in jobs:
            j.finish(logits[r:r + j.rows])
            r += j.rows


def live(jobs: list[Job]) -> list[Job]:
    """The jobs still to run: one whose deadline passed gets its 504, one whose request
    gave up (its future done) is dropped."""
    now = time.monotonic()
    for j in jobs:
        if j.deadline < now:
            j.finish(error=DeadlineExceeded("the request waited past its deadline"))
    return [j for j in jobs if j.deadline >= now and not j.future.done()]


def fail(jobs: list[Job], e: Exception, rows: int) -> None:
    """The runtime raised on a call: each of its requests gets the error (a 500)."""
    log.warning("inference failed on a batch of %d: %s: %s", rows, type(e).__name__, e)
    error = InferenceFailed(f"inference failed: {type(e).__name__}" + (f": {first_line(e)}" if str(e).strip() else ""))
    for j in jobs:
        j.finish(error=error)
