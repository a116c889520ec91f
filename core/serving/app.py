"""The ASGI app of `mk serve` (FastAPI under uvicorn): the routes, and one
middleware in front of them for the key, the body limit and the metrics.

    GET  /v2                                  server metadata
    GET  /v2/health/live, /v2/health/ready    liveness, readiness (no key needed; HEAD too, for probes)
    GET  /v2/models/{name}[/versions/1]       model metadata: inputs, outputs, limits
    GET  /v2/models/{name}[/versions/1]/ready
    POST /v2/models/{name}[/versions/1]/infer KServe v2: BYTES `text` [+ `text_pair`], or
                                              INT `input_ids` [+ `attention_mask`, `token_type_ids`]
                                              → label, score, logits, label_id
    POST /predict                             Hugging Face TEI: {"inputs": "…" | [...]} → labels, scores
    GET  /health                              TEI's health route
    GET  /metrics                             Prometheus (no key needed)
    GET  /openapi.json, /docs                 the schema of all of the above

A text-generation model answers the OpenAI-compatible routes of openai_routes.py
instead of /v2/models/{name}[/infer] and /predict (and the reverse: each says
with a 404 which routes its kind of model has). Errors on /v1 routes are
OpenAI's error object, {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from pydantic_core import to_json
from starlette.exceptions import HTTPException

from mk.core import __version__
from mk.core.console import log
from mk.core.serving import openai_routes, protocol as p
from mk.core.serving.openai_protocol import error_body
from mk.core.serving.auth import OPEN_PATHS, authorized
from mk.core.serving.model import ARRIVING, ServedModel

ERRORS = {code: {"model": p.Error} for code in (400, 401, 404, 408, 413, 422, 503, 504)}
INFER_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
TIMED_PATHS = frozenset({*INFER_PATHS, "/predict", "/v1/chat/completions", "/v1/completions"})


def _json(status: int, message: str, headers: dict | None = None, path: str = "", param: str | None = None,
          code: str | None = None) -> Response:
    body = error_body(status, message, param, code) if path.startswith("/v1/") else {"error": message}
    return Response(json.dumps(body).encode(), status, headers=headers, media_type="application/json")


class Guard:
    """Pure ASGI middleware (Starlette has no body limit, and BaseHTTPMiddleware
    costs a task per request): the key, the body read once within its limit, the
    count of requests still arriving (the batcher waits for those), and the metrics."""

    def __init__(self, app, model: ServedModel, api_key: str | None):
        self.app, self.model = app, model
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if scope["method"] == "POST":
            scope[ARRIVING] = True
            self.model.batcher.arriving += 1
        try:
            refusal = self._refusal(scope)
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, refusal = await self._body(scope, receive)
                if refusal is None:
                    receive = _replay(body, receive)
                    # every body here is JSON: `curl -d` labels it a form, which FastAPI would not parse
                    scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                        (b"content-type", b"application/json")]
            if refusal is not None:
                return await refusal(scope, receive, sending)
            await self.app(scope, receive, sending)
        finally:
            self.model.arrived(scope)
            route = getattr(scope.get("route"), "path", "unmatched")
            self.model.metrics.answered(route, status[0], time.perf_counter() - t0 if route in TIMED_PATHS else None)

    def _refusal(self, scope) -> Response | None:
        # with a trailing slash too: the route redirects there, a probe so configured follows it
        if self.key is None or scope["path"].rstrip("/") in OPEN_PATHS:
            return None
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if authorized(header, self.key):
            return None
        return _json(401, "missing or wrong API key; send `Authorization: Bearer KEY`",
                     {"WWW-Authenticate": "Bearer"}, scope["path"])

    async def _body(self, scope, receive) -> tuple[bytes, Response | None]:
        limit = self.model.limits.max_body

        def too_big():
            return b"", _json(413, f"request body over this server's limit of {limit} bytes", path=scope["path"])
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            return too_big()
        chunks, size = [], 0
        deadline = time.monotonic() + self.model.limits.timeout_s
        while True:
            try:  # uvicorn waits for a body forever; a client that never sends it is not waited for past the deadline
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                return b"", _json(408, f"the request body did not arrive within {self.model.limits.timeout_s:g} s",
                                  {"Connection": "close"}, path=scope["path"])
            if message["type"] == "http.disconnect":
                return b"", _json(400, "the client went away", path=scope["path"])
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_big()
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    """The body read once, then the connection's own messages: a streaming response
    waits on those to learn that its client went away."""
    sent = [False]

    async def replay():
        if sent[0]:
            return await receive()
        sent[0] = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay


def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors, path = exc.errors(), request.url.path
    if errors and errors[0].get("type") == "json_invalid":
        reason = errors[0].get("ctx", {}).get("error")
        return _json(400, "request body is not JSON" + (f" ({reason})" if reason else ""), path=path)
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    return _json(422, f"{where or 'body'}: {first.get('msg', 'invalid')}" + (
        f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""), path=path,
        param=loc[0] if loc else None)  # the request's field; the message says where inside it


def _http_error(request: Request, exc: HTTPException) -> Response:
    return _json(exc.status_code, str(exc.detail), exc.headers, request.url.path, getattr(exc, "param", None),
                 getattr(exc, "code", None))


def _internal_error(request: Request, exc: Exception) -> Response:
    log.warning("request failed: %s: %s", type(exc).__name__, exc)
    return _json(500, f"internal error: {type(exc).__name__}", path=request.url.path)


def create_app(model: ServedModel, api_key: str | None = None, on_ready=None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        model.metrics.ready.labels(model=model.name).set(1)
        if on_ready is not None:
            on_ready()
        yield
        model.metrics.ready.labels(model=model.name).set(0)
        model.batcher.stop()  # uvicorn has answered every accepted request by now

    # FastAPI's own OpenTelemetry hooks are off: they cost a check of the global providers on every
    # request (5 % of the event loop's time under load); /metrics is what mk serve reports through
    app = FastAPI(title="mk serve", version=__version__, lifespan=lifespan, responses=ERRORS,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
                  exception_handlers={RequestValidationError: _validation_error, HTTPException: _http_error,
                                      Exception: _internal_error})
    # the inference routes first: a request is matched against the routes in order
    if model.art.task == "text-generation":
        openai_routes.add_routes(app, model)
    else:
        _routes(app, model)
        openai_routes.refuse_openai_routes(app, model.name)
        _schema_with(app, p.InferRequest, p.PredictRequest)
    _common_routes(app, model)
    app.add_middleware(Guard, model=model, api_key=api_key)
    return app


# The classifier's two inference routes read their path and body themselves: the body in one pass of
# pydantic's own JSON parser, the answer written by pydantic-core. FastAPI's way (json.loads, solving
# and validating the endpoint's parameters one by one, json.dumps) took a fifth of the event loop's
# time per request under load. The schema then says what the route takes (openapi_extra), and the
# body models join the schema's components (_schema_with).

def _takes(body: type[BaseModel], *path: str) -> dict:
    """The OpenAPI entry of a route's path parameters and JSON body."""
    schema = {"$ref": f"#/components/schemas/{body.__name__}"}
    return {"parameters": [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in path],
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _parsed(request: Request, body: type[BaseModel]):
    try:  # a UTF-8 byte order mark (PowerShell sends one) is allowed, as json.loads allows it
        return body.model_validate_json((await request.body()).removeprefix(b"\xef\xbb\xbf"))
    except ValidationError as e:  # answered as FastAPI answers its own (_validation_error)
        raise RequestValidationError(e.errors(include_url=False)) from None


def _answer(content) -> Response:
    return Response(to_json(content), media_type="application/json")


def _schema_with(app: FastAPI, *models: type[BaseModel]) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schemas = FastAPI.openapi(app).setdefault("components", {}).setdefault("schemas", {})
            for m in models:
                schema = m.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[m.__name__] = schema
        return app.openapi_schema
    app.openapi = openapi


PROBES = ["GET", "HEAD"]  # load balancers and probes check health with either


def _common_routes(app: FastAPI, model: ServedModel) -> None:
    @app.get("/v2", response_model=p.ServerMetadata)
    async def server_metadata():
        return {"name": "mk", "version": __version__, "extensions": [], "models": [model.name]}

    @app.api_route("/v2/health/live", methods=PROBES, response_model=p.Live)
    @app.api_route("/health", methods=PROBES, response_model=p.Live)
    async def live():
        return {"live": True}

    @app.api_route("/v2/health/ready", methods=PROBES, response_model=p.Ready)
    async def ready():
        return {"ready": True}  # the app only answers once the model is loaded

    @app.api_route("/v2/models/{name}/ready", methods=PROBES, response_model=p.Ready)
    @app.api_route("/v2/models/{name}/versions/{version}/ready", methods=PROBES, response_model=p.Ready)
    async def model_ready(name: str, version: str | None = None):
        model.check_name(name, version)
        return {"ready": True}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        data, content_type = model.metrics.render()
        return Response(data, media_type=content_type)


def _routes(app: FastAPI, model: ServedModel) -> None:
    """A classifier's routes: KServe v2 metadata and inference, TEI's /predict."""
    @app.get("/v2/models/{name}", response_model=p.ModelMetadata)
    @app.get("/v2/models/{name}/versions/{version}", response_model=p.ModelMetadata)
    async def model_metadata(name: str, version: str | None = None):
        model.check_name(name, version)
        return model.metadata()

    @app.post(INFER_PATHS[0], response_model=p.InferResponse, openapi_extra=_takes(p.InferRequest, "name"))
    @app.post(INFER_PATHS[1], response_model=p.InferResponse,
              openapi_extra=_takes(p.InferRequest, "name", "version"))
    async def infer(request: Request):
        model.check_name(request.path_params["name"], request.path_params.get("version"))
        body = await _parsed(request, p.InferRequest)
        inputs, truncated = model.v2_inputs(body)
        logits = await model.run(inputs, request.scope)
        wanted = [o.name for o in body.outputs] if body.outputs else None
        answer = {"model_name": model.name, "model_version": "1", "outputs": model.v2_outputs(logits, wanted)}
        if body.id is not None:
            answer["id"] = body.id
        if truncated:
            answer["parameters"] = {"truncated": truncated}
        return _answer(answer)

    @app.post("/predict", response_model=list[p.Prediction] | list[list[p.Prediction]],
              openapi_extra=_takes(p.PredictRequest))
    async def predict(request: Request):
        body = await _parsed(request, p.PredictRequest)
        single = isinstance(body.inputs, str)
        items = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        texts, pairs = [], []
        for x in items:
            x = [x] if isinstance(x, str) else x
            if len(x) not in (1, 2):
                raise HTTPException(400, "each input is a text or a [text, pair] list")
            texts.append(x[0])
            pairs.append(x[1] if len(x) == 2 else None)
        truncate = model.limits.truncate if body.truncate is None else body.truncate
        inputs, _ = model.text_inputs(texts, pairs, truncate)
        predictions = model.tei_predictions(await model.run(inputs, request.scope), body.raw_scores)
        return _answer(predictions[0] if single else predictions)
