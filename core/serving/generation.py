"""Serving a causal LM: requests become generation jobs, and concurrent jobs that
sample alike run as one left-padded `CausalLM.generate` call on the batcher's
thread (the one generation path `mk tune` and `mk bench` measure too).

Each row's new tokens are routed, as they come, to its own request: a stream
turns them into text pieces (held back while they could be the start of a stop
string or an unfinished UTF-8 character), and the request's final answer is the
text `generate` returns, so the pieces always add up to the non-streamed text.

A job waits in the same bounded queue as the encoder's (503 past it, 504 when
it is not started before the deadline); once started it runs to its end, which
`max_tokens` and the context bound, or stops early when a streaming client goes
away."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
from starlette.exceptions import HTTPException

from mk.core.artifact import Artifact
from mk.core.runtime.causal_runtime import CausalLM, Sampling, stop_at
from mk.core.serving.batcher import Batcher, DeadlineExceeded, InferenceFailed, Job, fail
from mk.core.serving.metrics import LATENCY_BUCKETS
from mk.core.serving.model import Limits, QueuedModel

TASK = "text-generation"
_arrival = itertools.count()


@dataclass
class Answer:
    """One request's result: its text, why it ended, and its token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class TextStream:
    """One row's text as its tokens arrive: `push(token)` gives the piece that is
    safe to send; `rest(final)` what is left of the final text once it is known."""

    def __init__(self, lm: CausalLM, stop: tuple[str, ...], limit: int):
        self.lm, self.stop, self.limit, self.eos = lm, stop, limit, lm.eos_ids
        self.ids: list[int] = []
        self.sent = 0        # characters sent so far
        self.done = False

    def push(self, token: int) -> str:
        if self.done or token in self.eos or len(self.ids) >= self.limit:
            self.done = True  # later tokens of this row are padding
            return ""
        self.ids.append(token)
        text = self.lm.decode(self.ids)
        cut = stop_at(text, self.stop)
        if cut is not None:
            self.done, safe = True, cut
        else:
            safe = len(text) - self._held(text)
        piece = text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return piece

    def _held(self, text: str) -> int:
        """Characters kept back: an unfinished UTF-8 character (decoded as U+FFFD)
        and the longest ending that a stop string starts with."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            held = max([held] + [k for k in range(1, len(s)) if text.endswith(s[:k])])
        return held

    def rest(self, final: str) -> str:
        return final[self.sent:]


@dataclass
class GenJob(Job):
    """One request (a single row): its prompt, sampling, budget, and its stream."""

    sampling: Sampling = Sampling()
    max_new: int = 16
    stream: TextStream | None = None
    created: float = field(default_factory=time.perf_counter)
    seq: int = field(default_factory=lambda: next(_arrival))
    cancelled: bool = False  # set from the event loop when a streaming client goes away
    pieces: asyncio.Queue = field(init=False)  # text pieces, then None when the job is over

    def __post_init__(self):
        super().__post_init__()
        self.pieces = asyncio.Queue()

    @property
    def prompt(self) -> list[int]:
        return self.inputs["input_ids"][0].tolist()

    @property
    def key(self):
        """Jobs with equal keys can share one generate call. A seeded sampled job runs
        alone: its tokens must not depend on what it was batched with."""
        s = self.sampling
        if s.temperature == 0:
            return ("greedy", s.stop, s.ignore_eos)
        return ("alone", self.seq) if s.seed is not None else ("sampled", s.temperature, s.top_p, s.stop)

    def token(self, token: int) -> None:
        """On the batcher's thread: this row's next token."""
        if self.stream is not None and (piece := self.stream.push(token)):
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, piece)

    def finish(self, result: Answer | None = None, error: Exception | None = None) -> None:
        super().finish(result, error)  # the future is set before the stream reads its end
        if self.stream is not None and result is not None and (rest := self.stream.rest(result.text)):
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, rest)
        self.loop.call_soon_threadsafe(self.pieces.put_nowait, None)


class GenerationBatcher(Batcher):
    """The encoder's batcher (queue bound, waiting for requests still arriving,
    deadlines), with batches made of compatible jobs and run through `generate`."""

    def _take(self) -> list[GenJob]:
        key = self.queue[0].key
        others = [j for j in self.queue if j.key != key]
        if not others:
            return super()._take()
        self.queue = [j for j in self.queue if j.key == key]
        self.queued_rows -= len(others)
        taken = super()._take()
        self.queue = sorted(self.queue + others, key=lambda j: j.seq)
        self.queued_rows += len(others)
        self.metrics.queue_depth.set(self.queued_rows)
        return taken

    def _run(self, jobs: list[GenJob], runtime) -> None:
        steps = [0]

        def on_tokens(ids: list[int]) -> None:
            if steps[0] == 0:
                now = time.perf_counter()
                for j in jobs:
                    self.metrics.ttft.observe(now - j.created)
            steps[0] += 1
            for j, t in zip(jobs, ids):
                j.token(t)

        try:
            out = runtime.generate([j.prompt for j in jobs], jobs[0].sampling, on_tokens,
                                        max_new=[j.max_new for j in jobs],
                                        cancelled=lambda: {i for i, j in enumerate(jobs) if j.cancelled})
        except Exception as e:  # noqa: BLE001 — this batch's requests fail; the server keeps serving
            fail(jobs, e, len(jobs))
            return
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.prompt_tokens.inc(sum(out.prompt_tokens))
        self.metrics.completion_tokens.inc(sum(len(t) for t in out.tokens))
        for i, j in enumerate(jobs):
            j.finish(Answer(out.texts[i], out.finish_reasons[i], out.prompt_tokens[i], len(out.tokens[i])))


def add_metrics(metrics) -> None:
    """What a causal LM's /metrics adds to the encoder's: tokens in and out, time to first token."""
    from prometheus_client import Counter, Histogram

    reg = metrics.registry
    metrics.prompt_tokens = Counter("mk_prompt_tokens", "Prompt tokens read.", registry=reg)
    metrics.completion_tokens = Counter("mk_completion_tokens", "Tokens generated.", registry=reg)
    metrics.ttft = Histogram("mk_time_to_first_token_seconds", "From a request's arrival to its first new token.",
                             buckets=LATENCY_BUCKETS, registry=reg)


class GenerationModel(QueuedModel):
    """The served causal LM: its runtime, batcher and metrics, as the app and the
    Guard middleware use a ServedModel."""

    task = TASK

    def __init__(self, art: Artifact, name: str, lm: CausalLM, limits: Limits, metrics):
        self.art, self.name, self.lm, self.runtime, self.limits = art, name, lm, lm, limits
        add_metrics(metrics)
        self.metrics = metrics
        self.created = int(time.time())
        self.accepted = 0
        self.batcher = GenerationBatcher(lm, lm.tokenizer.pad_token_id, limits.max_batch_size, limits.max_wait_ms,
                                         limits.max_queue, metrics)

    def submit(self, prompt: list[int], sampling: Sampling, max_new: int, streaming: bool, scope: dict) -> GenJob:
        """Queue one generation (503 with Retry-After when the queue is full)."""
        stream = TextStream(self.lm, sampling.stop, max_new) if streaming else None
        job = GenJob(inputs={"input_ids": np.asarray([prompt], dtype=np.int64)},
                     deadline=time.monotonic() + self.limits.timeout_s, loop=asyncio.get_running_loop(),
                     sampling=sampling, max_new=max_new, stream=stream)
        job = self.enqueue(job, scope)
        # a generation that runs holds the batcher thread: a job queued behind it gets its 504 at its
        # deadline from here, not when the batcher is free again (minutes later, behind a long one)
        job.loop.call_later(self.limits.timeout_s, _expire, job)
        return job

    async def answer(self, job: GenJob) -> Answer:
        """The job's result, or the status that says why there is none."""
        try:
            return await job.future
        except DeadlineExceeded:
            raise HTTPException(504, f"not started within this server's deadline of {self.limits.timeout_s:g} s"
                                ) from None
        except InferenceFailed as e:
            raise HTTPException(500, str(e)) from None


def _expire(job: GenJob) -> None:
    """On the event loop at the job's deadline: one still queued fails with a 504 (the
    batcher then drops it); one started runs to its end."""
    if not job.started and not job.future.done():
        job.future.set_exception(DeadlineExceeded("the request waited past its deadline"))
        job.pieces.put_nowait(None)


def warm_up(model: GenerationModel) -> None:
    """Two short generations, alone and left-padded together, from text (token ids
    come from the tokenizer, so any vocabulary fits), before the first client."""
    lm = model.lm
    short = lm.text_ids("Hello")
    longer = (lm.chat_ids([{"role": "user", "content": "Hello, who are you?"}]) if lm.has_chat_template
              else lm.text_ids("The quick brown fox jumps over the lazy dog."))
    for prompts in ([longer], [short, longer]):
        lm.generate(prompts, Sampling(max_new_tokens=2))
