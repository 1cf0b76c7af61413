"""What the gateway takes and answers (pydantic at the edge; replicas get plain dicts)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from events.limits import MAX_NEW_TOKENS, MAX_PROMPT_LENGTH, MAX_TOKEN_ID

# The sampler engines' own bounds, checked here so a bad request never reaches a replica.
MAX_SAMPLES = 64
MAX_PROMPT_TOKENS = 32768
MAX_STOPS = 16

StopText = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class PredictInput(BaseModel):
    """A generation request to a deployment of an LLM: `prompt` text or `prompt_tokens`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_LENGTH)
    prompt_tokens: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = Field(
        default=None, min_length=1, max_length=MAX_PROMPT_TOKENS
    )
    max_tokens: int = Field(default=16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=1.0, ge=0, le=100, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=-1, ge=-1, le=1_000_000)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[StopText] | None = Field(default=None, max_length=MAX_STOPS)
    n: int = Field(default=1, ge=1, le=MAX_SAMPLES)
    logprobs: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> PredictInput:
        if (self.prompt is None) == (self.prompt_tokens is None):
            raise ValueError("give exactly one of `prompt` and `prompt_tokens`")
        if self.top_k == 0:
            raise ValueError("top_k: must be -1 (off) or >= 1")
        return self

    def for_replica(self) -> dict[str, Any]:
        return self.model_dump()


class Weights(BaseModel):
    checkpoint_id: str
    digest: str


class Choice(BaseModel):
    index: int
    text: str
    tokens: list[int]
    logprobs: list[float] | None = None
    finish_reason: str


class PredictOutput(BaseModel):
    model_id: str
    deployment_id: str
    replica_id: str
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    weights: Weights
