"""The OpenAI request bodies the gateway's OpenAI routes take (`openai_routes.py`), validated
at the edge: limits from events/limits.py and the predict schema, and every parameter that would
change what is generated but is not served refused with an error naming it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from api.gateway.models import MAX_PROMPT_TOKENS, MAX_SAMPLES, MAX_STOPS, StopText
from events.limits import MAX_NAME_LENGTH, MAX_NEW_TOKENS, MAX_PROMPT_LENGTH, MAX_TOKEN_ID

# A chat answer's length when the request sets neither max_tokens nor max_completion_tokens.
# OpenAI's default is "up to the context window"; a bounded default keeps a forgotten limit from
# holding a replica for MAX_NEW_TOKENS steps. (Completions keep OpenAI's own default, 16.)
DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_MESSAGES = 4096  # messages in one chat request
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs (only 0 is served)
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on a completion's `logprobs` (only 0 is served)


def unsupported(message: str) -> PydanticCustomError:
    """A pydantic error for a parameter loopstream refuses rather than silently ignores."""
    return PydanticCustomError("unsupported_parameter", message)


# --- requests ----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False  # a last chunk with `usage` and no choices


class SamplingRequest(BaseModel):
    """What chat completions and completions share. Unknown fields are refused (400, naming the
    field), so a parameter loopstream does not know cannot be silently dropped."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, min_length=1, max_length=2 * MAX_NAME_LENGTH + 1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(default=None, ge=1, le=MAX_SAMPLES)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)  # accepted, not used
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise unsupported(
                "not supported (only 0): the engines sample without repetition penalties"
            )
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise unsupported("not supported")
        return value

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value

    def sampling(self, *, max_tokens: int) -> dict[str, Any]:
        """The replica's sampling fields (Replica.predict), OpenAI's defaults filled in."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return {
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": -1,
            "seed": self.seed,
            "stop": stop or None,
            "n": self.n or 1,
            "pieces": True,  # each token's share of the text: streaming and logprobs' tokens
        }


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part["text"] for part in content)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)  # accepted, not rendered
    refusal: str | None = None  # what an assistant message from an earlier answer may carry
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(
        cls, value: str | list[dict[str, Any]] | None
    ) -> str | list[dict[str, Any]] | None:
        for part in value if isinstance(value, list) else []:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported(
                    f"parts of type {part.get('type')!r} are not supported: text only"
                )
        return value

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise unsupported("not supported: no tool calling")
        return value


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _no_alternatives(cls, value: int | None) -> int | None:
        if value:
            raise unsupported(
                "not supported (only 0): replicas answer the "
                "logprob of each sampled token, not the alternatives"
            )
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise unsupported(
                f"response_format type {value.get('type')!r} is not supported: "
                "only 'text' (no constrained decoding)"
            )
        return value

    @field_validator("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        if value is not None:
            raise unsupported("not supported: no tool calling")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if value is not None and other is not None and other != value:
            raise ValueError(f"differs from max_tokens ({other}): give one of them")
        return value


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] = Field(description="a text, or token ids")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_SAMPLES)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        # OpenAI's prompt is a string, a list of strings, token ids, or a list of those: one
        # prompt per request here (a batch is several requests).
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
            value = value[0]
        if isinstance(value, str):
            if len(value) > MAX_PROMPT_LENGTH:
                raise ValueError(f"at most {MAX_PROMPT_LENGTH} characters")
            return value
        if isinstance(value, list) and value and all(type(t) is int for t in value):
            if len(value) > MAX_PROMPT_TOKENS or not all(0 <= t <= MAX_TOKEN_ID for t in value):
                raise ValueError(f"at most {MAX_PROMPT_TOKENS} token ids in [0, {MAX_TOKEN_ID}]")
            return value
        if isinstance(value, list) and len(value) > 1:
            raise unsupported("one prompt per request: a list of prompts is not supported")
        raise ValueError("must be a string or a non-empty list of token ids")

    @field_validator("logprobs")
    @classmethod
    def _no_alternatives(cls, value: int | None) -> int | None:
        if value:
            raise unsupported(
                "only 0 is supported (each sampled token's logprob); "
                "replicas do not answer the most likely alternatives"
            )
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported("not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise unsupported("not supported (no fill-in-the-middle)")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != (info.data.get("n") or 1):
            raise unsupported("supported only equal to n (no ranking of samples)")
        return value


def render_chat(messages: list[ChatMessage]) -> str:
    """The prompt a chat becomes: one `<role>: <content>` line per message, then `assistant:`
    for the model to continue.

    loopstream's base models carry no chat template (the tiny byte-level Llama has none), and
    the gateway holds no tokenizer, so this one fixed template is the whole contract; a model
    trained on another format should be called through /v1/completions with its own rendering.
    """
    lines = [f"{m.role}: {_text_of(m.content)}\n" for m in messages]
    return "".join(lines) + "assistant:"
