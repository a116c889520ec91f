"""The bodies of the OpenAI-compatible routes `mk serve` answers for a causal LM,
as pydantic models: they validate what arrives (a wrong type or a value out of
range is a 422 naming the parameter, never a 500) and document the routes in
the OpenAPI schema.

Only what mk can honour is declared. Parameters that would change the answer
and that mk does not implement (logprobs, tools, penalties, n > 1, …) are
refused with a 400 naming them rather than silently ignored; anything else a
client library adds is ignored, as OpenAI-compatible servers do."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException

# refused unless absent or at their neutral value (the value says why)
UNSUPPORTED = {"logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",),
               "tools": ([],), "functions": ([],), "logit_bias": ({},), "presence_penalty": (0, 0.0),
               "frequency_penalty": (0, 0.0), "response_format": ({"type": "text"},)}


class RequestError(HTTPException):
    """A refusal on an OpenAI route: the status, and the parameter and code the
    OpenAI error object names."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(status, message, headers)
        self.param, self.code = param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object, which its client libraries read into their exceptions."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind, code = "authentication_error", code or "invalid_api_key"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampled(BaseModel):
    """What both routes share: the model, the sampling, the length, streaming."""

    model_config = ConfigDict(extra="allow")  # extras are checked against UNSUPPORTED, then ignored
    model: StrictStr = Field(description="The served model's name (see GET /v1/models).")
    max_tokens: Optional[StrictInt] = Field(None, ge=1, description="New tokens at most.")
    temperature: Optional[StrictFloat] = Field(None, ge=0, le=2, description="0 is greedy; default 1.")
    top_p: Optional[StrictFloat] = Field(None, gt=0, le=1, description="Nucleus sampling; default 1.")
    stop: Union[StrictStr, list[StrictStr], None] = Field(None, description="Up to 4 strings that end the text.")
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2 ** 63, description="Repeatable sampling.")
    n: Optional[StrictInt] = Field(None, description="Choices: only 1 is supported.")
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[StrictStr] = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]
    name: Optional[StrictStr] = None


class ChatCompletionRequest(_Sampled):
    messages: list[ChatMessage] = Field(description="The conversation so far (at least one message).")
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1, description="New tokens at most "
                                                                              "(max_tokens' newer name).")


class CompletionRequest(_Sampled):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt]] = Field(
        description="One prompt: a string, a list of one string, or token ids.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _Choice(BaseModel):
    index: int
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatChoice(_Choice):
    message: AssistantMessage


class CompletionChoice(_Choice):
    text: str


class _Answer(BaseModel):
    """What a chat completion and a text completion share; each adds its `object` and choices."""

    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mk"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
