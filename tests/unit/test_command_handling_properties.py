"""Property: no command stops the processor, and state stays the fold of the accepted events.

Random and extreme commands (huge ints, NaN/inf, NUL, lone surrogates, long strings, deep
payloads, random types and fields from the real registry, garbage bytes, clocks at datetime's
ends) go through `handle_command` in sequences on one aggregate, with an in-memory state map
as the processor keeps it. Whatever comes in, every message gets exactly one of the four
outcomes, whatever is written is writable and readable back, and the state is what folding the
written events from the initial state gives.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commands.envelope import CommandResult
from commands.handling import (
    MAX_REASON_CHARS,
    MAX_RECORD_BYTES,
    Accepted,
    Duplicate,
    Refused,
    Undeliverable,
    handle_command,
)
from commands.registry import COMMAND_TYPES, AggregateSpec
from events.envelope import EventEnvelope

AGGREGATE = "s1"
NOW = datetime(2026, 11, 27, tzinfo=UTC)
SHA = "ab" * 32

# A valid payload per command type, so that random changes to it reach decide and evolve
# instead of stopping at validation.
VALID: dict[str, dict[str, Any]] = {
    "CreateSession": {"base_model": "m"},
    "EndSession": {},
    "CreateRun": {
        "run_id": "r1",
        "sampler_id": "p1",
        "max_seq_len": 8,
        "user_metadata": {"k": "v"},
    },
    "RecordCheckpoint": {
        "run_id": "r1",
        "checkpoint_id": "k1",
        "name": "step-1",
        "kind": "sampler_weights",
        "files": [{"relative_file_name": "a", "size_bytes": 1, "sha256": SHA}],
        "ttl_seconds": 60,
        "checkpoint_type": "base",
        "chain_position": 0,
    },
    "HotloadWeights": {"run_id": "r1", "name": "step-1"},
    "PromoteCheckpoint": {"checkpoint_id": "k1", "environment": "prod"},
    "DeleteCheckpoint": {"checkpoint_id": "k1", "reason": "deleted"},
    "SetCheckpointTtl": {"checkpoint_id": "k1", "ttl_seconds": 3600},
    "PublishCheckpoint": {"checkpoint_id": "k1"},
    "UnpublishCheckpoint": {"checkpoint_id": "k1"},
    "CreateWorkspace": {"name": "w"},
    "CreateApiKey": {
        "key_id": "0123456789abcdef",
        "scopes": ["train"],
        "prefix": "tml-0123456789abcdef",
        "key_hash": SHA,
    },
    "RevokeApiKey": {"key_id": "0123456789abcdef"},
    "CreateSecret": {"workspace_id": "default", "name": "hf_token", "version": 1, "digest": SHA},
    "UpdateSecret": {"workspace_id": "default", "name": "hf_token", "version": 2, "digest": SHA},
    "DeleteSecret": {"workspace_id": "default", "name": "hf_token"},
    "CreateModel": {
        "source": "checkpoint",
        "checkpoint_uri": "bt://loops:r1/sampler_weights/step-1",
        "checkpoint_type": "base",
        "chain_position": 0,
        "lora_rank": 0,
        "base_model": "m",
        "deployment": {"deployment_id": "d1", "resources": {"cpu": "4", "memory": "16Gi"}},
    },
    "CreateDeployment": {"deployment_id": "d2", "min_replica": 0, "max_replica": 2},
    "ChangeDeploymentInstanceType": {
        "deployment_id": "d1",
        "new_deployment_id": "d3",
        "resources": {"instance_type": "L4:4x16"},
    },
    "ActivateDeployment": {"deployment_id": "d1"},
    "DeactivateDeployment": {"deployment_id": "d1"},
    "DeleteDeployment": {"deployment_id": "d1"},
    "UpdateDeploymentWeights": {
        "deployment_id": "d1",
        "checkpoint_uri": "bt://loops:r1/sampler_weights/step-2",
        "checkpoint_type": "delta",
        "chain_position": 1,
        "content_digest": SHA,
        "base_model": "m",
    },
}
assert VALID.keys() == COMMAND_TYPES.keys(), "a new command type needs a valid payload here"

EXTREME_INTS = [10**20, -(10**20), 2**62, 2**63, 2**63 - 1, -(2**63) - 1, 2**64, 0, -1, 1]
EXTREME_FLOATS = [float("nan"), float("inf"), float("-inf"), 1e308, -0.0, 5e-324]
EXTREME_TEXT = [
    "",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "\U0001f600" * 3,
    "\u202egnp.exe",  # right-to-left override
    "e\u0301",  # combining accent
    "\ufeff",
    "k1",
    "r1",
    "step-1",
    "a" * 10_000,
    "b" * 300_000,
]


def _deep(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"d": [value]}
    return value


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EXTREME_INTS),
    st.integers(),
    st.sampled_from(EXTREME_FLOATS),
    st.floats(),
    st.sampled_from(EXTREME_TEXT),
    st.text(st.characters(exclude_categories=()), max_size=20),  # surrogates included
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=4,
) | st.sampled_from([_deep(100), _deep(300)])  # json.dumps nests at most ~900 levels


@st.composite
def payloads(draw: st.DrawFn, command_type: str) -> Any:
    how = draw(st.sampled_from(["valid", "valid", "one field", "one field", "random", "junk"]))
    if how == "junk":
        return draw(json_values)
    if how == "random":
        return draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4))
    payload = dict(VALID.get(command_type, {}))
    if how == "one field":
        command_class = COMMAND_TYPES[command_type][0] if command_type in COMMAND_TYPES else None
        names = sorted(command_class.model_fields) if command_class else ["x"]
        name = draw(st.sampled_from([*names, "unknown_field"]))
        payload[name] = draw(json_values)
    return payload


def _mostly(usual: Any, odd: st.SearchStrategy[Any], draw: st.DrawFn) -> Any:
    """`usual` four times in five, else something from `odd`."""
    return usual if draw(st.integers(0, 4)) else draw(odd)


@st.composite
def documents(draw: st.DrawFn, index: int) -> Any:
    command_type = _mostly(
        draw(st.sampled_from(sorted(COMMAND_TYPES))),
        st.sampled_from(["LaunchRockets", "\ud800", "x" * 5000]) | scalars,
        draw,
    )
    document: dict[str, Any] = {
        # Mostly fresh ids; sometimes an earlier one (a duplicate) or an extreme one.
        "command_id": _mostly(
            f"c{index}", st.just("c1") | st.sampled_from(EXTREME_TEXT) | scalars, draw
        ),
        "type": command_type,
        "aggregate_id": _mostly(AGGREGATE, st.sampled_from(EXTREME_TEXT) | scalars, draw),
        "payload": draw(payloads(command_type if isinstance(command_type, str) else "")),
    }
    if draw(st.integers(0, 4)) == 0:
        extra = draw(st.sampled_from(["schema_version", "correlation_id", "actor", "zzz"]))
        document[extra] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        del document[draw(st.sampled_from(sorted(document)))]
    return document


@st.composite
def messages(draw: st.DrawFn, index: int) -> tuple[bytes | None, bytes | None, datetime]:
    kind = draw(st.integers(0, 19))
    now = draw(clocks)
    if kind == 0:
        raw: bytes | None = draw(st.binary(max_size=50) | st.none())
    elif kind == 1:
        depth = draw(st.sampled_from([10, 5_000, 200_000]))
        raw = b'{"command_id": "c1", "payload": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind in (2, 3):  # a checkpoint that gets far into decide, with extreme TTLs
        payload = {
            **VALID["RecordCheckpoint"],
            "checkpoint_id": f"k{index}",
            "name": f"step-{index}",
            "ttl_seconds": draw(st.sampled_from([60, 10**20, 2**62, None])),
        }
        now = draw(st.sampled_from([NOW, END_OF_TIME]))  # at the end, now + 60 s overflows
        document = {
            "command_id": f"c{index}",
            "type": "RecordCheckpoint",
            "aggregate_id": AGGREGATE,
        }
        raw = json.dumps({**document, "payload": payload}).encode()
    else:
        raw = json.dumps(draw(documents(index))).encode()  # NaN/Infinity, \\ud800 escapes
    key = draw(st.sampled_from([AGGREGATE.encode()] * 8 + [None, b"other", b"\xff\xfe"]))
    return raw, key, now


END_OF_TIME = datetime.max.replace(tzinfo=UTC) - timedelta(seconds=1)
clocks = st.sampled_from([NOW, NOW, NOW, END_OF_TIME, datetime.min.replace(tzinfo=UTC)])

# Across all examples, for the report: commands driven, and their outcomes.
DRIVEN = itertools.count(1)
OUTCOMES: Counter[str] = Counter()


class Processor:
    """The processor's per-partition bookkeeping, in memory."""

    def __init__(self) -> None:
        self.states: dict[str, Any] = {}
        self.seen: dict[str, CommandResult] = {}
        self.written: dict[str, list[bytes]] = {}  # aggregate_id -> its events' bytes
        self._ids = (f"e{i}" for i in itertools.count())

    def load(self, spec: AggregateSpec, aggregate_id: str) -> Any:
        return self.states.get(aggregate_id) or spec.initial_state(aggregate_id)

    def handle(self, raw: bytes | None, key: bytes | None, now: datetime) -> None:
        next(DRIVEN)
        outcome = handle_command(
            raw,
            key=key,
            load_state=self.load,
            previous_result=self.seen.get,
            now=now,
            new_event_id=lambda: next(self._ids),
        )
        assert isinstance(outcome, Undeliverable | Duplicate | Refused | Accepted)
        category = outcome.result.category if isinstance(outcome, Refused) else None
        OUTCOMES[f"{type(outcome).__name__}{f' ({category})' if category else ''}"] += 1
        if isinstance(outcome, Undeliverable):
            outcome.reason.encode()  # goes into a Kafka header
        elif isinstance(outcome, Duplicate):
            assert outcome.result is self.seen[outcome.result.command_id]
        elif isinstance(outcome, Refused):
            result = outcome.result
            assert result.status == "rejected" and result.category in ("user", "server")
            assert len(result.reason or "") <= MAX_REASON_CHARS
            assert CommandResult.model_validate_json(result.to_bytes()) == result
            self.seen[result.command_id] = result
        else:
            self._accept(outcome)

    def _accept(self, outcome: Accepted) -> None:
        aggregate_id = outcome.result.aggregate_id or ""
        before = self.states.get(aggregate_id) or outcome.spec.initial_state(aggregate_id)
        sequences = [e.sequence for e in outcome.events]
        assert sequences == list(range(before.version + 1, before.version + 1 + len(sequences)))
        assert outcome.state.version == before.version + len(sequences)
        for data in outcome.event_bytes:
            assert len(data) <= MAX_RECORD_BYTES
            assert EventEnvelope.from_bytes(data).aggregate_id == aggregate_id
        outcome.result.to_bytes()
        self.states[aggregate_id] = outcome.state
        self.seen[outcome.result.command_id] = outcome.result
        self.written.setdefault(aggregate_id, []).extend(outcome.event_bytes)

    def check_state_is_the_fold_of_the_log(self) -> None:
        for aggregate_id, state in self.states.items():
            # The aggregate type whose state this is (a session, or a model: CreateModel may
            # reach the same id first).
            spec = next(
                spec
                for _, spec in COMMAND_TYPES.values()
                if type(spec.initial_state(aggregate_id)) is type(state)
            )
            folded = spec.initial_state(aggregate_id)
            for data in self.written[aggregate_id]:
                folded = spec.apply(folded, EventEnvelope.from_bytes(data))
            assert folded == state
            assert state.version == len(self.written[aggregate_id])


# A prefix that makes the session and a run exist, so later commands reach the deep rules.
SETUP = [
    json.dumps({"command_id": f"setup{i}", "type": t, "aggregate_id": AGGREGATE, "payload": p})
    for i, (t, p) in enumerate(
        [("CreateSession", VALID["CreateSession"]), ("CreateRun", VALID["CreateRun"])]
    )
]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    setup=st.booleans(),
    steps=st.integers(1, 8),
    data=st.data(),
)
def test_no_command_escapes_and_state_stays_the_fold_of_accepted_events(
    setup: bool, steps: int, data: st.DataObject
) -> None:
    processor = Processor()
    if setup:
        for raw in SETUP:
            processor.handle(raw.encode(), AGGREGATE.encode(), NOW)
    for index in range(1, steps + 1):
        raw, key, now = data.draw(messages(index))
        processor.handle(raw, key, now)
    processor.check_state_is_the_fold_of_the_log()
