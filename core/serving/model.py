"""The served model: its runtime, tokenizer and batcher, what it declares in its
metadata, and how request bodies become rows and logits become answers.

Every refusal is an HTTPException with the status a client can act on: 400 for
a request that is wrong, 413 for one over a stated limit, 503 (with
Retry-After) when the queue is full, 504 past the deadline, 500 only when the
runtime itself failed on the batch."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import numpy as np
from starlette.exceptions import HTTPException

from mk.core.artifact import Artifact
from mk.core.serving.batcher import Batcher, DeadlineExceeded, InferenceFailed, Job, QueueFull
from mk.core.serving.protocol import ID_INPUTS, INT_TYPES, TEXT_INPUTS, InferRequest
from mk.core.serving.tokenization import TextEncoder, TooLong

ARRIVING = "mk.arriving"  # in a request's scope from its first byte until it reaches the batcher
OUTPUTS = ("label", "score", "logits", "label_id")
PLATFORMS = {"safetensors": "pytorch_torch", "onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}


@dataclass
class Limits:
    max_batch_size: int = 32      # inputs per runtime call
    max_wait_ms: float = 2.0      # how long a batch waits for requests still being read
    max_queue: int = 256          # inputs waiting, past which requests get 503
    max_inputs: int = 256         # inputs per request
    max_tokens: int = 16384       # inputs × padded tokens per request
    max_body: int = 8 << 20       # bytes per request body
    timeout_s: float = 30.0       # per-request deadline
    truncate: bool = True         # cut texts over the model's limit (else 400)


def _bad(message: str, status: int = 400) -> HTTPException:
    return HTTPException(status, message)


class QueuedModel:
    """What every served model does with a request before its runtime sees it: the
    name check, the count of requests still arriving, and the bounded queue.
    Subclasses set name, batcher and accepted."""

    def check_name(self, name: str, version: str | None) -> None:
        if name != self.name or version not in (None, "1"):
            raise _bad(f"no model {name!r}" + (f" version {version}" if version else "")
                       + f"; this server serves {self.name!r}", 404)

    def arrived(self, scope: dict) -> None:
        """The request no longer counts as arriving (the batcher waits only for those)."""
        if scope.pop(ARRIVING, False):
            self.batcher.arriving -= 1

    def enqueue(self, job, scope: dict):
        """Hand the job to the batcher (503 with Retry-After when its queue is full)."""
        self.arrived(scope)
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise HTTPException(503, f"overloaded: {e}; retry shortly", headers={"Retry-After": "1"}) from None
        self.accepted += 1
        return job


class ServedModel(QueuedModel):
    def __init__(self, art: Artifact, name: str, runtime, limits: Limits, metrics, narrow=None, parallel: int = 1):
        self.art, self.name, self.runtime, self.limits, self.metrics = art, name, runtime, limits, metrics
        self.labels = [str(l) for l in art.labels]
        cfg = art.config()
        positions = cfg.get("max_position_embeddings")
        self.encoder = TextEncoder(art, positions if isinstance(positions, int) else None)
        self.max_seq = self.encoder.max_length
        self.vocab = {k: cfg[key] for k, key in (("input_ids", "vocab_size"), ("token_type_ids", "type_vocab_size"))
                      if isinstance(cfg.get(key), int) and cfg[key] > 0}
        self.accepted = 0  # inference requests that reached the batcher
        self.batcher = Batcher(runtime, self.encoder.pad_id, limits.max_batch_size, limits.max_wait_ms,
                               limits.max_queue, metrics, narrow, parallel)

    def metadata(self) -> dict:
        def t(name, datatype, shape, optional=True):
            return {"name": name, "datatype": datatype, "shape": shape, "optional": optional}
        k = len(self.labels) or -1
        inputs = [t("text", "BYTES", [-1]), t("text_pair", "BYTES", [-1]), t("input_ids", "INT64", [-1, -1]),
                  t("attention_mask", "INT64", [-1, -1]), t("token_type_ids", "INT64", [-1, -1])]
        outputs = [t("label", "BYTES", [-1], False), t("score", "FP32", [-1], False),
                   t("logits", "FP32", [-1, k], False), t("label_id", "INT64", [-1], False)]
        lim = self.limits
        return {"name": self.name, "versions": ["1"], "platform": PLATFORMS.get(self.art.format, self.art.format),
                "inputs": inputs, "outputs": outputs,
                "parameters": {"labels": self.labels, "format": self.art.format, "runtime": self.runtime.name,
                               "device": str(self.runtime.device), "max_batch_size": lim.max_inputs,
                               "max_tokens": lim.max_tokens, "max_sequence_length": self.max_seq,
                               "vocab_size": self.vocab.get("input_ids"), "truncate": lim.truncate,
                               "dynamic_batching": {"max_batch_size": lim.max_batch_size,
                                                    "max_wait_ms": lim.max_wait_ms, "max_queue": lim.max_queue}}}

    # ---------------------------------------------------------------- inputs --

    def v2_inputs(self, body: InferRequest) -> tuple[dict[str, np.ndarray], list[int]]:
        """The rows of a v2 request (texts tokenized, or token ids checked), and which were truncated."""
        unknown = sorted({o.name for o in body.outputs or []} - set(OUTPUTS))
        if unknown:
            raise _bad(f"unknown outputs {unknown}; this model gives {', '.join(OUTPUTS)}")
        names = [t.name for t in body.inputs]
        for n in names:
            if n not in TEXT_INPUTS + ID_INPUTS:
                raise _bad(f"unknown input {n!r}; this model takes text (+ text_pair) or {', '.join(ID_INPUTS)}")
            if names.count(n) > 1:
                raise _bad(f"input {n} is given twice")
        if "text" in names:
            if set(names) - set(TEXT_INPUTS):
                raise _bad("send either text (+ text_pair) or token ids, not both")
            tensors = {t.name: t for t in body.inputs}
            texts = self._strings(tensors["text"])
            pairs = self._strings(tensors["text_pair"]) if "text_pair" in tensors else None
            if pairs is not None and len(pairs) != len(texts):
                raise _bad(f"text_pair has {len(pairs)} strings, text {len(texts)}")
            return self.text_inputs(texts, pairs, self._truncate(body.parameters))
        if "text_pair" in names:
            raise _bad("text_pair needs a text input beside it")
        return self._id_inputs(body), []

    def _truncate(self, parameters: dict | None) -> bool:
        value = (parameters or {}).get("truncate", self.limits.truncate)
        if not isinstance(value, bool):
            raise _bad("parameter truncate must be true or false")
        return value

    def _strings(self, t) -> list[str]:
        if t.datatype != "BYTES":
            raise _bad(f"input {t.name}: datatype {t.datatype} not accepted; text is BYTES")
        if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
            raise _bad(f"input {t.name}: shape must be [n] (or [n, 1]), got {t.shape}")
        if t.shape[0] < 1 or math.prod(t.shape) != len(t.data):
            raise _bad(f"input {t.name}: {len(t.data)} strings for shape {t.shape}")
        if t.data and not isinstance(t.data[0], str):
            raise _bad(f"input {t.name}: BYTES data must be strings")
        return list(t.data)

    def text_inputs(self, texts: list[str], pairs: list[str | None] | None, truncate: bool
                    ) -> tuple[dict[str, np.ndarray], list[int]]:
        if not texts:
            raise _bad("no inputs: send at least one text")
        self._check_rows(len(texts))
        try:
            inputs, truncated = self.encoder.encode(texts, pairs, truncate)
        except TooLong as e:
            raise _bad(str(e), 413) from None
        self._check_cost(inputs["input_ids"].shape)
        return inputs, truncated

    def _check_rows(self, rows: int) -> None:
        if rows > self.limits.max_inputs:
            raise _bad(f"{rows} inputs in one request; this server takes at most {self.limits.max_inputs}", 413)

    def _check_cost(self, shape) -> None:
        rows, width = shape
        if rows * width > self.limits.max_tokens:
            raise _bad(f"{rows} inputs × {width} tokens = {rows * width} tokens in one request; this server "
                       f"takes at most {self.limits.max_tokens} (split the request)", 413)

    def _id_inputs(self, body: InferRequest) -> dict[str, np.ndarray]:
        batch: dict[str, np.ndarray] = {}
        for t in body.inputs:
            if t.datatype not in INT_TYPES:
                raise _bad(f"input {t.name}: datatype {t.datatype!r} not accepted; send INT64 or INT32")
            if len(t.shape) != 2 or min(t.shape) < 1:
                raise _bad(f"input {t.name}: shape must be [batch, sequence], got {t.shape!r}")
            self._check_rows(t.shape[0])  # the cost first: the limits are what a client must learn
            self._check_cost(t.shape)
            if t.data and not isinstance(t.data[0], int):
                raise _bad(f"input {t.name}: data is not a list of {t.datatype} integers")
            if len(t.data) != math.prod(t.shape):
                raise _bad(f"input {t.name}: {len(t.data)} values for shape {t.shape}")
            try:
                batch[t.name] = np.asarray(t.data, dtype=np.int64).reshape(t.shape)
            except OverflowError:
                raise _bad(f"input {t.name}: values out of the INT64 range") from None
            kind = np.iinfo(t.datatype.lower())  # a value its datatype cannot hold is a client's mistake
            if batch[t.name].min() < kind.min or batch[t.name].max() > kind.max:
                raise _bad(f"input {t.name}: values out of the {t.datatype} range {kind.min}..{kind.max}")
        if "input_ids" not in batch:
            raise _bad("input `input_ids` is required (or send text)")
        shape = batch["input_ids"].shape
        for k, v in batch.items():
            if v.shape != shape:
                raise _bad(f"input {k}: shape {list(v.shape)} differs from input_ids {list(shape)}")
        if shape[1] > self.max_seq:
            raise _bad(f"sequence of {shape[1]} tokens is over the model's {self.max_seq} positions")
        for k, n in self.vocab.items():
            # out-of-range ids fail deep in the runtime, and negative ones silently index from the end
            if k in batch and (batch[k].min() < 0 or batch[k].max() >= n):
                raise _bad(f"input {k}: ids must be in 0..{n - 1}, got {int(batch[k].min())}..{int(batch[k].max())}")
        if "attention_mask" in batch and ((batch["attention_mask"] != 0) & (batch["attention_mask"] != 1)).any():
            raise _bad("input attention_mask: values must be 0 or 1")
        batch.setdefault("attention_mask", np.ones(shape, dtype=np.int64))
        return batch

    # --------------------------------------------------------------- running --

    async def run(self, inputs: dict[str, np.ndarray], scope: dict) -> np.ndarray:
        """Logits for these rows, through the batcher, within the deadline."""
        timeout = self.limits.timeout_s
        job = self.enqueue(Job(inputs, time.monotonic() + timeout, asyncio.get_running_loop()), scope)
        try:
            return await asyncio.wait_for(job.future, timeout)
        except (asyncio.TimeoutError, DeadlineExceeded):
            raise _bad(f"no answer within this server's deadline of {timeout:g} s", 504) from None
        except InferenceFailed as e:
            raise _bad(str(e), 500) from None

    # --------------------------------------------------------------- answers --

    def label_of(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else str(i)

    def v2_outputs(self, logits: np.ndarray, wanted: list[str] | None) -> list[dict]:
        ids = logits.argmax(axis=-1)
        scores = softmax(logits)[np.arange(len(ids)), ids]
        n = len(ids)
        outputs = [{"name": "label", "datatype": "BYTES", "shape": [n], "data": [self.label_of(i) for i in ids]},
                   {"name": "score", "datatype": "FP32", "shape": [n], "data": scores.tolist()},
                   {"name": "logits", "datatype": "FP32", "shape": list(logits.shape),
                    "data": logits.reshape(-1).tolist()},
                   {"name": "label_id", "datatype": "INT64", "shape": [n], "data": ids.tolist()}]
        if wanted:
            outputs = [o for o in outputs if o["name"] in wanted]
        return outputs

    def tei_predictions(self, logits: np.ndarray, raw_scores: bool) -> list[list[dict]]:
        """Per input, every label with its score, best first (TEI's answer)."""
        values = logits if raw_scores else softmax(logits)
        order = np.argsort(-values, axis=-1, kind="stable")
        return [[{"label": self.label_of(int(j)), "score": float(row[j])} for j in o] for row, o in zip(values, order)]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
