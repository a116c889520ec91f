"""The OpenAI-compatible routes `mk serve` answers for a causal LM, and the 404s
that say which routes belong to which kind of model.

    GET  /v1/models, /v1/models/{model}   the served model
    POST /v1/chat/completions             messages → the assistant's answer (the chat template applied)
    POST /v1/completions                  a prompt → its continuation

Both POST routes stream with server-sent events when `stream` is true: one
`data: {json}` event per text piece, a last one with `finish_reason` (and one
with `usage` when `stream_options.include_usage`), then `data: [DONE]`. The
events are written with Starlette's StreamingResponse: an OpenAI stream is a
finite list of `data:` lines, and sse-starlette would add nothing it needs
while it cuts open streams on SIGTERM, where `mk serve` answers every request
it accepted.

Everything that can be refused is refused before the response starts, with
its status (400, 404, 422, 503, 504); a stream that fails later ends with an
OpenAI error event, which the client libraries raise."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mk.core.errors import BadInput
from mk.core.runtime.causal_runtime import Sampling
from mk.core.serving import openai_protocol as o
from mk.core.serving.generation import Answer, GenerationModel, GenJob

ERRORS = {s: {"model": o.ErrorResponse} for s in (400, 401, 404, 413, 422, 503, 504)}
STREAMED = {200: {"description": "The answer; with `stream: true`, server-sent events of chunks, then "
                                 "`data: [DONE]`.", "content": {"text/event-stream": {"schema": {"type": "string"}}}}}
COMPLETION_DEFAULT_TOKENS = 16     # OpenAI's default for /v1/completions; chat runs to the end of the context
GREEDY_BELOW = 1e-5  # a temperature under this is 0 (greedy): e^(1/T) between logits 1e-4 apart
UNKNOWN_CONTEXT_TOKENS = 256       # chat's default when the model's config does not state its context


def add_routes(app: FastAPI, model: GenerationModel) -> None:
    def card() -> dict:
        return {"id": model.name, "object": "model", "created": model.created, "owned_by": "mk"}

    @app.get("/v1/models", response_model=o.ModelList, responses=ERRORS)
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id}", response_model=o.ModelCard, responses=ERRORS)
    async def model_card(model_id: str):
        _check_model(model, model_id)
        return card()

    @app.post("/v1/chat/completions", response_model=o.ChatCompletion, responses={**ERRORS, **STREAMED})
    async def chat_completions(body: o.ChatCompletionRequest, request: Request):
        _check_request(model, body)
        prompt = chat_prompt(model, body.messages)
        limit = body.max_completion_tokens or body.max_tokens
        return await _respond(model, body, prompt, limit, request.scope, chat=True)

    @app.post("/v1/completions", response_model=o.Completion, responses={**ERRORS, **STREAMED})
    async def completions(body: o.CompletionRequest, request: Request):
        _check_request(model, body)
        prompt = completion_prompt(model, body.prompt)
        return await _respond(model, body, prompt, body.max_tokens, request.scope, chat=False)

    _refuse(app, ("/predict", "/v2/models/{name}", "/v2/models/{name}/versions/{version}",
                  "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"),
            f"{model.name!r} is a text-generation model: this server answers POST /v1/chat/completions and "
            f"/v1/completions (OpenAI-compatible), not the classifier routes /v2/models/…/infer and /predict")


def refuse_openai_routes(app: FastAPI, name: str) -> None:
    """On a classifier's server, the OpenAI routes say what is served instead."""
    _refuse(app, ("/v1/{rest:path}",), f"{name!r} is a text classifier: this server answers "
            f"POST /v2/models/{name}/infer (KServe v2) and /predict (TEI); the OpenAI-compatible /v1 routes "
            "serve text-generation models")


def _refuse(app: FastAPI, paths: tuple[str, ...], message: str) -> None:
    async def not_here():
        raise o.RequestError(404, message, code="wrong_model_kind")

    for path in paths:
        app.add_api_route(path, not_here, methods=["GET", "POST"], include_in_schema=False)


def _check_model(model: GenerationModel, name: str) -> None:
    if name != model.name:
        raise o.RequestError(404, f"no model {name!r}; this server serves {model.name!r}", "model",
                             "model_not_found")


def _check_request(model: GenerationModel, body: o._Sampled) -> None:
    """What the schema cannot say: the model's name, n, the stop list, unsupported features."""
    _check_model(model, body.model)
    if body.n not in (None, 1):
        raise o.RequestError(400, f"n = {body.n}: this server gives one choice per request (n = 1)", "n")
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise o.RequestError(400, f"stop: {len(body.stop)} strings; at most 4", "stop")
    for name, value in (body.model_extra or {}).items():
        if name in o.UNSUPPORTED and value is not None and value not in o.UNSUPPORTED[name]:
            raise o.RequestError(400, f"{name} is not supported by this server", name)


def chat_prompt(model: GenerationModel, messages: list[o.ChatMessage]) -> list[int]:
    """The conversation through the model's chat template, the assistant's turn opened."""
    from jinja2 import TemplateError

    if not messages:
        raise o.RequestError(400, "messages: send at least one message", "messages")
    if not model.lm.has_chat_template:
        raise o.RequestError(400, f"{model.name!r} has no chat template, so it cannot take chat messages; send "
                                  "a plain prompt to /v1/completions instead", "messages", "no_chat_template")
    turns = [{"role": "system" if m.role == "developer" else m.role,
              "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
             for m in messages]
    try:
        return model.lm.chat_ids(turns)
    except TemplateError as e:  # a template may refuse, say, two user turns in a row
        raise o.RequestError(400, f"messages: the model's chat template refused them ({e})", "messages") from None


def completion_prompt(model: GenerationModel, prompt) -> list[int]:
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise o.RequestError(400, f"prompt: {len(prompt)} prompts; this server takes one per request",
                                 "prompt")
        prompt = prompt[0]
    ids = model.lm.text_ids(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise o.RequestError(400, "prompt: empty; there is nothing to continue", "prompt")
    vocab = model.lm.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise o.RequestError(400, f"prompt: token ids must be in 0..{vocab - 1}", "prompt")
    return ids


def _sampling(model: GenerationModel, body: o._Sampled, prompt: list[int], limit: int | None
              ) -> tuple[Sampling, int]:
    """The request's sampling and token budget, checked against the context."""
    context = model.lm.context_length
    room = context - len(prompt) if context else UNKNOWN_CONTEXT_TOKENS
    if room < 1:
        raise o.RequestError(400, f"the prompt has {len(prompt)} tokens; the model's context is {context}",
                             "messages" if isinstance(body, o.ChatCompletionRequest) else "prompt",
                             "context_length_exceeded")
    if limit is None:  # as OpenAI does: 16 tokens for a completion, the rest of the context for chat
        limit = room if isinstance(body, o.ChatCompletionRequest) else min(COMPLETION_DEFAULT_TOKENS, room)
    try:
        model.lm.check_fits(len(prompt), limit)
    except BadInput as e:
        raise o.RequestError(400, f"{e.message}; ask for at most {room} (max_tokens)", "max_tokens",
                             "context_length_exceeded") from None
    stop = tuple(s for s in ([body.stop] if isinstance(body.stop, str) else body.stop or []) if s)
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_BELOW:  # logits divided by it overflow to inf, and sampling them is greedy anyway
        temperature = 0.0
    return Sampling(max_new_tokens=limit, temperature=temperature, top_p=body.top_p or 1.0, seed=body.seed,
                    stop=stop), limit


async def _respond(model: GenerationModel, body: o._Sampled, prompt: list[int], limit: int | None, scope: dict,
                   chat: bool):
    sampling, limit = _sampling(model, body, prompt, limit)
    job = model.submit(prompt, sampling, limit, body.stream, scope)
    reply = _Reply(model.name, chat)
    if not body.stream:
        return JSONResponse(reply.whole(await model.answer(job)))
    first = await job.pieces.get()
    if first is None:
        await model.answer(job)  # failed before its first piece: the status says why
    usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_events(model, job, first, reply, usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _events(model: GenerationModel, job: GenJob, piece: str | None, reply: "_Reply", usage: bool):
    try:
        if reply.chat:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}))
        while piece is not None:
            yield _sse(reply.chunk({"content": piece} if reply.chat else piece))
            piece = await job.pieces.get()
        try:
            answer = await model.answer(job)
        except HTTPException as e:
            yield _sse(o.error_body(e.status_code, str(e.detail)))
            return
        yield _sse(reply.chunk({} if reply.chat else "", answer.finish_reason))
        if usage:
            yield _sse(reply.envelope([], stream=True) | {"usage": _usage(answer)})
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = not job.future.done()  # the client went away: its row stops at the next step


def _usage(a: Answer) -> dict:
    return {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens}


class _Reply:
    """The shapes of one answer: whole, or in chunks (chat and completions differ)."""

    def __init__(self, name: str, chat: bool):
        self.name, self.chat = name, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, choices: list[dict], stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.name, "choices": choices}

    def whole(self, a: Answer) -> dict:
        part = {"message": {"role": "assistant", "content": a.text}} if self.chat else {"text": a.text}
        choice = {"index": 0, **part, "finish_reason": a.finish_reason, "logprobs": None}
        return self.envelope([choice], stream=False) | {"usage": _usage(a)}

    def chunk(self, piece, finish_reason: str | None = None) -> dict:
        part = {"delta": piece} if self.chat else {"text": piece}
        return self.envelope([{"index": 0, **part, "finish_reason": finish_reason, "logprobs": None}], stream=True)
