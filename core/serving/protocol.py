"""The request and response bodies `mk serve` speaks, as pydantic models: they
validate what arrives (a wrong type is a 422 with the field, never a 500) and
give the OpenAPI schema that clients and fuzzers read.

KServe v2 / Open Inference Protocol for `/v2/models/{name}/infer`, and the
`/predict` body of Hugging Face Text Embeddings Inference for classifiers."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      WrapValidator, model_validator)
from pydantic_core import PydanticCustomError

INT_TYPES = ("INT64", "INT32", "INT16", "INT8", "UINT8", "UINT16", "UINT32")
TEXT_INPUTS = ("text", "text_pair")
ID_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

Parameters = dict[str, Union[StrictStr, StrictInt, StrictFloat, StrictBool]]


def _one_of(what: str) -> WrapValidator:
    """A union's refusal said as what it takes: pydantic's names its first branch, which misleads
    (`data.list[str].0: Input should be a valid string` for an INT64 tensor's 1.5)."""
    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("union_type", f"Input should be {what}") from None
    return WrapValidator(validate)


class InputTensor(BaseModel):
    name: StrictStr
    shape: list[StrictInt] = Field(max_length=2)
    datatype: Literal["BYTES", "INT64", "INT32", "INT16", "INT8", "UINT8", "UINT16", "UINT32"]
    # strings for BYTES, whole numbers for the INT types; flat in row-major order, or nested as the shape
    # is (the protocol allows both: tritonclient sends flat data, many hand-written clients nested rows)
    data: Annotated[Union[list[StrictStr], list[StrictInt], list[list[StrictStr]], list[list[StrictInt]]],
                    _one_of("a list of strings (BYTES) or of whole numbers (INT types), flat or nested as the shape")]
    parameters: Optional[Parameters] = None

    @model_validator(mode="after")
    def _flattened(self):
        """Nested data as flat data, once its rows are seen to be the shape's."""
        if self.data and isinstance(self.data[0], list):
            rows = [len(row) for row in self.data]
            if len(self.shape) != 2 or [len(rows), *set(rows)] != self.shape:
                raise ValueError(f"nested data of {len(rows)} rows of {sorted(set(rows))} values "
                                 f"is not shape {self.shape}")
            self.data = [x for row in self.data for x in row]
        return self


class RequestedOutput(BaseModel):
    name: StrictStr
    parameters: Optional[Parameters] = None


class InferRequest(BaseModel):
    id: Optional[StrictStr] = None
    inputs: list[InputTensor] = Field(min_length=1, max_length=len(TEXT_INPUTS + ID_INPUTS))
    outputs: Optional[list[RequestedOutput]] = None
    parameters: Optional[Parameters] = None


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: Optional[str] = None
    outputs: list[OutputTensor]
    parameters: Optional[dict] = None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    optional: bool = False


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]
    models: list[str]


class Ready(BaseModel):
    ready: bool


class Live(BaseModel):
    live: bool


class Error(BaseModel):
    error: str


# TEI: a text, a [text, pair], or a list of either
Sequence = Union[StrictStr, list[StrictStr]]


class PredictRequest(BaseModel):
    """TEI's `/predict`. Unlike TEI, a list of two strings is a batch of two texts;
    a pair is always a nested list, `[["text", "pair"]]`."""

    model_config = ConfigDict(extra="ignore")
    inputs: Annotated[Union[StrictStr, list[Sequence]],
                      _one_of("a text, a list of texts, or a list of [text, pair] lists")]
    truncate: Optional[StrictBool] = None
    raw_scores: StrictBool = False


class Prediction(BaseModel):
    label: str
    score: float
