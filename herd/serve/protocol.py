"""The API's request and response bodies, as pydantic models: these classes *are* the API.

Fields follow the order of OpenAI's API reference (https://platform.openai.com/docs/api-reference),
so a diff against it reads line by line. Fields OpenAI does not have sit in one block at the end of
each request, marked "herd / vLLM extras" (the names vLLM accepts in the body or `extra_body`:
top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos, min_tokens). Unknown fields are
accepted and ignored (`extra="allow"`, as vLLM's OpenAIBaseModel), and the server logs their names.

A request turns itself into herd's sampling settings in one method, `sampling_params`. Responses
are built as plain dicts in the handlers' order of OpenAI's objects; their models here give
/openapi.json its response schemas.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from herd.serve.errors import BadRequest

MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
StopList = Annotated[list[str], Field(max_length=16)]  # OpenAI allows 4 stop strings, vLLM any number


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


# ----------------------------------------------------------------------------- chat messages
class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Union[TextPart, ImagePart]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns


class FunctionDef(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoiceFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]


# ----------------------------------------------------------------------------- requests
class _Sampling(OpenAIModel):
    """Fields shared by both generation endpoints, turned into SamplingParams in one place."""

    def sampling_params(self, *, max_new_tokens: int, eos_ids: list[int], seed_offset: int = 0,
                        logprobs: int | None = None):
        from herd.inference.sampling import REPETITION_PENALTY_RANGE, SamplingParams

        lo, hi = REPETITION_PENALTY_RANGE
        if self.repetition_penalty is not None and not lo <= self.repetition_penalty <= hi:
            raise BadRequest(f"repetition_penalty must be in [{lo}, {hi}], got {self.repetition_penalty}",
                             param="repetition_penalty")
        min_tokens = self.min_tokens or 0
        if min_tokens > max_new_tokens:
            raise BadRequest(f"min_tokens ({min_tokens}) must not exceed the maximum number of new tokens "
                             f"({max_new_tokens})", param="min_tokens")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        stop_ids = [] if self.ignore_eos else list(eos_ids)
        stop_ids += [t for t in (self.stop_token_ids or []) if t not in stop_ids]
        temperature = 1.0 if self.temperature is None else self.temperature
        seed = None if self.seed is None else self.seed + seed_offset
        try:
            return SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=self.top_k or 0,
                top_p=1.0 if self.top_p is None else self.top_p, min_p=self.min_p or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0, presence_penalty=self.presence_penalty or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                min_tokens=min_tokens,
                seed=seed, stop_token_ids=stop_ids, stop=[s for s in stop if s], logprobs=logprobs)
        except ValueError as e:
            raise BadRequest(str(e)) from None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions (https://platform.openai.com/docs/api-reference/chat/create)."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0)  # deprecated by OpenAI in favour of max_completion_tokens
    n: int | None = Field(1, ge=1, le=MAX_N)
    parallel_tool_calls: bool | None = True
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | StopList | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    # ---- herd / vLLM extras (not in OpenAI's API) ----
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(None, ge=0)


class CompletionRequest(_Sampling):
    """POST /v1/completions (https://platform.openai.com/docs/api-reference/completions/create)."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(16, ge=0)
    n: int | None = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | StopList | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = None
    # ---- herd / vLLM extras (not in OpenAI's API) ----
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(None, ge=0)


class TokenizeRequest(OpenAIModel):
    """POST /tokenize (vLLM's shape): text, or chat messages rendered with the chat format."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # prompt: prepend <|begin_of_text|>
    add_generation_prompt: bool = True  # messages: end with the assistant header


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class ModerationRequest(OpenAIModel):
    """POST /v1/moderations (https://platform.openai.com/docs/api-reference/moderations)."""

    input: str | list[str]
    model: str | None = None


# ----------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None  # {"cached_tokens": n} (chat: the engine's prefix store)


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    # ---- herd extra ----
    guard: dict[str, Any] | None = None  # the guard verdict of a refused turn (finish_reason "content_filter")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "herd"
    max_model_len: int  # vLLM's name for the context length
    context_length: int  # the name Open WebUI / OpenRouter read


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
