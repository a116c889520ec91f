"""The dynamic batcher on a real (tiny) runtime: padding to the batch's own
longest row, length bucketing, cutting a batch into the calls that cost least,
and a failing batch failing only its requests."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from mk.core.serving.batcher import Batcher, CallCost, DeadlineExceeded, InferenceFailed, Job, pad_batch
from mk.core.serving.metrics import Metrics


@pytest.fixture(scope="module")
def runtime(tiny_model):
    from mk.core.runtime import load_runtime

    return load_runtime(tiny_model, device="cpu", threads=1)


def rows(n: int, width: int, first: int = 1000) -> dict[str, np.ndarray]:
    return {"input_ids": np.full((n, width), first, dtype=np.int64),
            "attention_mask": np.ones((n, width), dtype=np.int64)}


async def answered_as_one_batch(b: Batcher, jobs: list[Job], runtime) -> None:
    """Submit the jobs as one batch; each gets the runtime's own logits for its rows."""
    with b.cond:  # the batcher takes nothing until all of them wait
        for j in jobs:
            b.submit(j)
    for j in jobs:
        assert np.allclose(await asyncio.wait_for(j.future, 30), runtime(j.inputs), atol=1e-5)


def test_a_batch_is_padded_to_its_own_longest_row():
    loop = asyncio.new_event_loop()
    try:
        batch = pad_batch([Job(rows(2, 3), 0, loop), Job(rows(1, 5), 0, loop)], pad_id=0)
    finally:
        loop.close()
    assert batch["input_ids"].shape == (3, 5)
    assert batch["attention_mask"].sum(axis=1).tolist() == [3, 3, 5]
    assert (batch["input_ids"][:2, 3:] == 0).all()


def test_inputs_of_similar_length_go_together(runtime):
    loop = asyncio.new_event_loop()
    b = Batcher(runtime, 0, max_batch_size=4, max_wait_ms=0, max_queue=100, metrics=Metrics("m", {}))
    try:
        with b.cond:  # the batcher threads wait on this lock: the queue is ours to fill and take from
            widths = [10, 60, 12, 58, 11, 61]
            b.queue = [Job(rows(1, w), float("inf"), loop) for w in widths]
            b.queued_rows = len(widths)
            first = [j.width for j in b._take()]
            second = [j.width for j in b._take()]
            b.queued_rows = 0
        assert sorted(first) == [10, 11, 12, 58] and sorted(second) == [60, 61]  # the oldest, then its neighbours
    finally:
        b.stop()
        loop.close()


def test_a_failing_batch_fails_only_its_requests(runtime):
    async def scenario():
        b = Batcher(runtime, 0, max_batch_size=8, max_wait_ms=0, max_queue=100, metrics=Metrics("m", {}))
        loop = asyncio.get_running_loop()
        try:
            bad = Job(rows(1, 4, first=10**6), float("inf"), loop)  # past the embedding table: the runtime raises
            b.submit(bad)
            with pytest.raises(InferenceFailed, match="inference failed"):
                await asyncio.wait_for(bad.future, 30)
            good = Job(rows(2, 4), float("inf"), loop)
            b.submit(good)
            logits = await asyncio.wait_for(good.future, 30)
            assert logits.shape == (2, 3) and np.allclose(logits, runtime(rows(2, 4)), atol=1e-5)
        finally:
            b.stop()
    asyncio.run(scenario())


@pytest.mark.parametrize("fixed, per_token, expected", [
    (1.0, 0.0, [[10, 11, 12, 58, 60, 60]]),           # a GPU: a call costs the same whatever its padding
    (0.0, 1.0, [[10], [11], [12], [58], [60, 60]]),   # no fixed cost: every width its own call, ties together
    (10.0, 1.0, [[10, 11, 12], [58, 60, 60]]),         # both: similar lengths together (236 against 370 for one call)
])
def test_a_batch_is_cut_into_the_calls_that_cost_least(fixed, per_token, expected):
    loop = asyncio.new_event_loop()
    try:
        jobs = [Job(rows(1, w), 0, loop) for w in (60, 10, 58, 12, 60, 11)]
        calls = CallCost(fixed, per_token).calls(jobs)
    finally:
        loop.close()
    assert [[j.width for j in call] for call in calls] == expected


def test_the_cost_of_a_call_is_measured_and_a_split_batch_answers_each_job(runtime):
    cost = CallCost.measure(runtime, rows(1, 4), rows(64, 128))  # 2,048 times the tokens: costs more
    assert cost.per_token_s > 0
    assert CallCost.measure(runtime, rows(2, 8), rows(2, 8)).per_token_s == 0  # one size: nothing to fit

    async def scenario():
        b = Batcher(runtime, 0, max_batch_size=8, max_wait_ms=0, max_queue=100, metrics=Metrics("m", {}))
        b.cost = CallCost(0.0, 1.0)  # every width its own call
        loop = asyncio.get_running_loop()
        jobs = [Job(rows(1, w, first=1000 + w), float("inf"), loop) for w in (3, 9, 5)] + [
            Job(rows(2, 9), float("inf"), loop)]
        try:
            await answered_as_one_batch(b, jobs, runtime)
        finally:
            b.stop()
        return b.metrics
    metrics = asyncio.run(scenario())
    calls = metrics.batch_size.collect()[0].samples
    assert {s.value for s in calls if s.name.endswith("_count")} == {3}  # widths 3, 5 and 9: three calls


def test_a_job_whose_deadline_passes_during_an_earlier_call_is_not_started(runtime):
    calls = []

    def slow(batch):  # the first call takes longer than the second job may wait
        calls.append(batch["input_ids"].shape)
        time.sleep(0.3)
        return runtime(batch)

    async def scenario():
        b = Batcher(slow, 0, max_batch_size=8, max_wait_ms=0, max_queue=100, metrics=Metrics("m", {}))
        b.cost = CallCost(0.0, 1.0)  # every width its own call, the shortest first
        loop = asyncio.get_running_loop()
        first, late = Job(rows(1, 3), float("inf"), loop), Job(rows(1, 9), time.monotonic() + 0.15, loop)
        try:
            with b.cond:
                b.submit(first)
                b.submit(late)
            assert (await asyncio.wait_for(first.future, 30)).shape == (1, 3)
            with pytest.raises(DeadlineExceeded):
                await asyncio.wait_for(late.future, 30)
        finally:
            b.stop()
    asyncio.run(scenario())
    assert calls == [(1, 3)]  # the late job never reached the runtime


def test_calls_that_overlap_run_on_one_thread_each_and_a_lone_call_on_all(tiny_model):
    from mk.core.runtime import load_runtime

    wide, narrow = load_runtime(tiny_model, device="cpu", threads=2), load_runtime(tiny_model, device="cpu", threads=1)
    used: list[str] = []
    running, most = [0], [0]
    lock = threading.Lock()

    def counted(name, runtime):
        def call(batch):
            with lock:
                used.append(name)
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.05)  # long enough for the other thread to start its call meanwhile
            try:
                return runtime(batch)
            finally:
                with lock:
                    running[0] -= 1
        return call

    async def scenario():
        b = Batcher(counted("wide", wide), 0, max_batch_size=16, max_wait_ms=0, max_queue=100,
                    metrics=Metrics("m", {}), narrow=counted("narrow", narrow), parallel=2)
        b.cost = CallCost(0.0, 1.0)  # every width its own call
        loop = asyncio.get_running_loop()
        try:
            lone = Job(rows(1, 4), float("inf"), loop)
            b.submit(lone)
            assert np.allclose(await asyncio.wait_for(lone.future, 30), wide(lone.inputs), atol=1e-5)
            assert used == ["wide"]  # all there was to do: every thread on it
            # one batch of four widths: four calls, which the two threads share
            await answered_as_one_batch(b, [Job(rows(1, w, first=1000 + w), float("inf"), loop) for w in (3, 5, 7, 9)],
                                        wide)
        finally:
            b.stop()
    asyncio.run(scenario())
    assert used[1:].count("narrow") >= 3 and most[0] == 2, used  # beside another call, on one thread


def test_the_calls_of_a_cut_batch_start_together_on_idle_threads(runtime):
    starts: list[float] = []

    def slow(batch):
        starts.append(time.monotonic())
        time.sleep(0.3)
        return runtime(batch)

    async def scenario():
        # three threads wait for a request still arriving, up to 400 ms from when each woke: the first
        # takes the three jobs and cuts them into three calls, which the others start at once instead
        # of waiting out their own 400 ms
        b = Batcher(slow, 0, max_batch_size=8, max_wait_ms=400, max_queue=100, metrics=Metrics("m", {}),
                    narrow=slow, parallel=3)
        b.cost = CallCost(0.0, 1.0)  # every width its own call
        b.arriving = 1
        loop = asyncio.get_running_loop()
        jobs = [Job(rows(1, w), float("inf"), loop) for w in (3, 5, 7)]
        try:
            b.submit(jobs[0])
            await asyncio.sleep(0.2)
            b.submit(jobs[1])
            b.submit(jobs[2])
            for j in jobs:
                assert np.allclose(await asyncio.wait_for(j.future, 30), runtime(j.inputs), atol=1e-5)
        finally:
            b.arriving = 0
            b.stop()
    asyncio.run(scenario())
    assert len(starts) == 3 and max(starts) - min(starts) < 0.1, [s - starts[0] for s in starts]
