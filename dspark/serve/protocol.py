"""OpenAI request bodies, validated strictly, and the OpenAI error body.

Unknown fields and fields of the wrong type are 400s (no silent coercion of ``"0.5"`` into 0.5). Fields the
OpenAI API has but this server does not implement (``n`` > 1, ``logprobs``, ``echo``, ``best_of``, ``suffix``,
penalties, ``logit_bias``, tools, ``response_format`` other than text) are accepted only at their
no-op values; anything else is a 400 that names the field. vLLM's ``top_k`` and ``ignore_eos`` extensions are
supported.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error the client gets as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _integral(value):
    """JSON Schema counts 16.0 as an integer (OpenAPI's "integer" included), so take it as 16; 16.5 stays an error."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_integral)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def doc(default=None, **schema):
    """A field whose accepted values the OpenAPI schema documents; the checks themselves stay in one place
    (``SamplingParams``, ``refuse_unsupported``, the server), which answer with a 400 naming the field."""
    return Field(default, json_schema_extra=schema)


NOOP = "accepted only at its no-op value"


class CommonRequest(Strict):
    model: str | None = None
    max_tokens: Integer | None = doc(minimum=1)
    temperature: float | None = doc(minimum=0, maximum=2)
    top_p: float | None = doc(exclusiveMinimum=0, maximum=1)
    top_k: Integer | None = doc(minimum=-1, description="vLLM extension; 0 or -1 disables")
    stop: str | list[str] | None = doc(maxItems=16)
    seed: Integer | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = doc(False, description="vLLM extension")
    user: str | None = doc(description="accepted, not used")
    # OpenAI fields accepted only at their no-op values
    n: Integer | None = doc(enum=[1, None], description=NOOP)
    best_of: Integer | None = doc(enum=[1, None], description=NOOP)
    logprobs: bool | Integer | None = doc(enum=[False, 0, None], description=NOOP)
    top_logprobs: Integer | None = doc(enum=[0, None], description=NOOP)
    echo: bool | None = doc(enum=[False, None], description=NOOP)
    suffix: str | None = doc(enum=["", None], description=NOOP)
    presence_penalty: float | None = doc(enum=[0, None], description=NOOP)
    frequency_penalty: float | None = doc(enum=[0, None], description=NOOP)
    logit_bias: dict[str, float] | None = doc(maxProperties=0, description=NOOP)
    tools: list[Any] | None = doc(maxItems=0, description=NOOP)
    tool_choice: Any = doc(enum=["none", None], description=NOOP)
    functions: list[Any] | None = doc(maxItems=0, description=NOOP)
    function_call: Any = doc(enum=["none", None], description=NOOP)
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = doc(enum=[{"type": "text"}, None], description=NOOP)

    def refuse_unsupported(self) -> None:
        checks = [
            ("n", self.n in (None, 1), "only n=1 is supported"),
            ("best_of", self.best_of in (None, 1), "only best_of=1 is supported"),
            ("logprobs", self.logprobs in (None, False, 0), "logprobs are not supported"),
            ("top_logprobs", self.top_logprobs in (None, 0), "top_logprobs are not supported"),
            ("echo", not self.echo, "echo is not supported"),
            ("suffix", self.suffix in (None, ""), "suffix is not supported"),
            ("presence_penalty", self.presence_penalty in (None, 0), "presence_penalty is not supported (lossless decoding)"),
            ("frequency_penalty", self.frequency_penalty in (None, 0), "frequency_penalty is not supported (lossless decoding)"),
            ("logit_bias", not self.logit_bias, "logit_bias is not supported"),
            ("tools", not self.tools, "tools are not supported"),
            ("tool_choice", self.tool_choice in (None, "none"), "tool_choice is not supported"),
            ("functions", not self.functions, "functions are not supported"),
            ("function_call", self.function_call in (None, "none"), "function_call is not supported"),
            ("response_format", self.response_format in (None, {"type": "text"}), "only response_format {'type': 'text'} is supported"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise APIError(400, f"{message} by this server", param=param, code="unsupported_parameter")

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(CommonRequest):
    prompt: str | list[Integer] | list[str] | list[list[Integer]]


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(json_schema_extra={"minItems": 1})
    max_completion_tokens: Integer | None = doc(minimum=1)


# JSON nested deeper than this is refused before validation: no OpenAI field needs more than a few levels, and
# walking or re-serialising a deep value would recurse as deep
MAX_DEPTH = 64


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error response (documents the OpenAPI schema; built by ``APIError.body``)."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str | None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (the usage chunk has no choices)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class Delta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None
    finish_reason: str | None


class ChatChunk(BaseModel):
    """One server-sent event of a streamed chat completion (the usage chunk has no choices)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]


def parse(model: type[Strict], raw: bytes) -> Strict:
    """Validate a request body; any problem is an ``APIError`` 400 naming the field."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise APIError(400, f"the request body is nested too deeply (at most {MAX_DEPTH} levels)", code="invalid_json") from None
    except ValueError as e:  # bad JSON or UTF-8, NaN/Infinity, an integer too long to convert
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_values(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif err["type"] == "missing":
            message = f"'{param}' is a required property"
        else:
            message = f"invalid value for '{param}': {err['msg']} (got {json.dumps(err.get('input'))[:80]})"
        raise APIError(400, message, param=param, code="invalid_value") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_values(data: dict) -> None:
    """Refuse JSON nested deeper than ``MAX_DEPTH`` and strings with lone surrogates (``"\\ud800"``), which are
    valid JSON escapes but no Unicode text: the tokenizer cannot take them. Iterative, so depth costs no stack."""
    pending = [((), data)]
    while pending:
        path, value = pending.pop()
        if len(path) > MAX_DEPTH:
            raise APIError(400, f"the request body is nested too deeply (at most {MAX_DEPTH} levels)", code="invalid_json")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if isinstance(key, str) and not _is_unicode(key):
                raise APIError(400, "a field name holds a lone surrogate; send valid Unicode", code="invalid_value")
            if isinstance(item, str) and not _is_unicode(item):
                param = ".".join(map(str, (*path, key)))
                raise APIError(400, f"'{param}' holds a lone surrogate (like \\ud800); send valid Unicode text",
                               param=param, code="invalid_value")
            if isinstance(item, (dict, list)):
                pending.append(((*path, key), item))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
