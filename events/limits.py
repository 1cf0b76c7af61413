"""Input limits, in one place: what a command payload or an API request may hold.

Everything loopstream accepts ends up in PostgreSQL (read models, the futures table) and in
workers (torch, the checkpoint store). So the limits are those of the narrowest of them:
- text: PostgreSQL `text` and `jsonb` cannot store NUL (U+0000), and UTF-8 cannot encode a lone
  surrogate (U+D800..U+DFFF); a value holding either is refused where it enters, never later by a
  projection that must then skip the event;
- integers: a PostgreSQL `bigint` (int64) at most, and sane maxima where a value means time or a
  count (a TTL of 10^20 s overflows `datetime`);
- floats: finite (JSON has no NaN or Infinity; Python's json and pydantic accept them unless told).

Commands (`commands/`), events and the API (`api/`) import the types from here, so the JSON
Schemas in docs/schemas and the OpenAPI show the same maxima and string pattern.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, Field

# --- integers -------------------------------------------------------------------------------
INT64_MAX = 2**63 - 1  # PostgreSQL bigint, torch int64
INT64_MIN = -(2**63)
MAX_TTL_SECONDS = 10 * 366 * 24 * 3600  # 10 years: a checkpoint kept longer is a promoted one
MAX_PAGE_OFFSET = 1_000_000_000  # no listing holds a billion rows; fits a bigint OFFSET
MAX_PAGE_LIMIT = 1000
MAX_TOKEN_ID = 2**31 - 1  # vocabularies are int32-indexed everywhere (tokenizers, vLLM)
MAX_NEW_TOKENS = 8192  # max_tokens of one sample request
MAX_COUNT = 1_000_000  # a small count (retention keep-last, top_k)

# --- text -----------------------------------------------------------------------------------
MAX_TEXT_LENGTH = 1000  # reasons, descriptions
MAX_NAME_LENGTH = 200  # names, ids, idempotency keys
MAX_PROMPT_LENGTH = 1_000_000  # a prompt as text (characters)
MAX_JSON_DEPTH = 32  # nesting of free-form JSON (loader_state)
MAX_METADATA_ENTRIES = 32  # keys of a user_metadata object (a run's labels, not a data store)
# What a stored string may not hold, as a JSON Schema pattern: no NUL. (A lone surrogate is
# refused too, but only ECMA-262 engines take a surrogate range; Rust's and Go's refuse the
# pattern, and valid UTF-8 cannot carry one anyway: only a JSON \ud800 escape can.)
TEXT_PATTERN = "^[^\\u0000]*$"


def text_problem(value: str) -> str | None:
    """Why PostgreSQL could not store `value`, or None when it can."""
    if "\x00" in value:
        return "must not contain NUL (\\u0000)"
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        return "must not contain a lone surrogate (\\ud800-\\udfff)"
    return None


def check_text(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


_STORABLE = AfterValidator(check_text)
_PATTERN = {"pattern": TEXT_PATTERN}  # shown in the JSON Schemas; checked by check_text

# A free-text field: storable in PostgreSQL, at most MAX_TEXT_LENGTH characters.
Text = Annotated[str, Field(max_length=MAX_TEXT_LENGTH, json_schema_extra=_PATTERN), _STORABLE]
# A name or label (a project, a base model's name, an actor): at most MAX_NAME_LENGTH.
ShortText = Annotated[str, Field(max_length=MAX_NAME_LENGTH, json_schema_extra=_PATTERN), _STORABLE]
# An idempotency key or correlation id (the command id on Kafka), or a required name.
RequestKey = Annotated[
    str, Field(min_length=1, max_length=MAX_NAME_LENGTH, json_schema_extra=_PATTERN), _STORABLE
]
# A command id on Kafka: an idempotency key, possibly within its workspace ("<workspace>:<key>").
CommandId = Annotated[
    str,
    Field(min_length=1, max_length=MAX_NAME_LENGTH + 64, json_schema_extra=_PATTERN),
    _STORABLE,
]
# (Each length is its own alias: a Field(max_length=...) stacked on one of these would run after
# the storability check and report "items after validation".)
PromptText = Annotated[
    str, Field(min_length=1, max_length=MAX_PROMPT_LENGTH, json_schema_extra=_PATTERN), _STORABLE
]


def json_problem(value: Any, path: str = "", depth: int = 0) -> tuple[str, str] | None:
    """(dotted path, why) of the first thing in a JSON value PostgreSQL or JSON cannot hold:
    a key or string with NUL or a lone surrogate, a non-finite float, nesting past
    MAX_JSON_DEPTH. None when the value is storable."""
    if depth > MAX_JSON_DEPTH:
        return path, f"nested deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, str):
        problem = text_problem(value)
        return (path, problem) if problem else None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, "must be a finite number")
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and (problem := text_problem(key)):
                return path or "(key)", f"key {problem}"
            if found := json_problem(item, where, depth + 1):
                return found
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if found := json_problem(item, f"{path}.{i}" if path else str(i), depth + 1):
                return found
    return None


def check_json_object(value: dict[str, Any]) -> dict[str, Any]:
    found = json_problem(value)
    if found is not None:
        where, why = found
        raise ValueError(f"{where}: {why}" if where else why)
    return value


# Free-form JSON (e.g. a loader_state): storable strings and keys, finite numbers, bounded depth.
JsonObject = Annotated[dict[str, Any], AfterValidator(check_json_object)]

# A user's labels on a resource (Tinker's `user_metadata`): a flat object of strings, at most
# MAX_METADATA_ENTRIES keys of a name's length, each value a free text's length.
UserMetadata = Annotated[
    dict[RequestKey, Text],
    Field(max_length=MAX_METADATA_ENTRIES, description="string keys to string values"),
]

TtlSeconds = Annotated[int, Field(ge=1, le=MAX_TTL_SECONDS, description="at most 10 years")]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
NonNegativeInt64 = Annotated[int, Field(ge=0, le=INT64_MAX)]
PositiveInt64 = Annotated[int, Field(ge=1, le=INT64_MAX)]
PageOffset = Annotated[int, Field(ge=0, le=MAX_PAGE_OFFSET)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
# A seed torch's Generator.manual_seed accepts and an int64 column holds.
Seed = Int64
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
