"""The dynamic batcher on a real (tiny) runtime: padding to the batch's own
longest row, length bucketing, and a failing batch failing only its requests."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mk.core.serving.batcher import Batcher, InferenceFailed, Job, pad_batch
from mk.core.serving.metrics import Metrics


@pytest.fixture(scope="module")
def runtime(tiny_model):
    from mk.core.runtime import load_runtime

    return load_runtime(tiny_model, device="cpu", threads=1)


def rows(n: int, width: int, first: int = 1000) -> dict[str, np.ndarray]:
    return {"input_ids": np.full((n, width), first, dtype=np.int64),
            "attention_mask": np.ones((n, width), dtype=np.int64)}


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
        with b.cond:  # the worker waits on this lock: the queue is ours to fill and take from
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
