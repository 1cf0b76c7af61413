"""The secret aggregate: given events, when a command, then events or a rejection."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from commands.loops import Rejected
from commands.registry import SECRET
from commands.secrets import (
    CreateSecret,
    DeleteSecret,
    SecretState,
    UpdateSecret,
    secret_aggregate_id,
)
from events.loops import DomainEvent
from events.secrets import SecretCreated, SecretDeleted, SecretUpdated

NOW = datetime(2026, 11, 29, tzinfo=UTC)
WS, NAME = "default", "hf_access_token"
ID = secret_aggregate_id(WS, NAME)
D1, D2, D3 = "1" * 64, "2" * 64, "3" * 64


def given(*events: DomainEvent) -> SecretState:
    state = SECRET.initial_state(ID)
    for sequence, event in enumerate(events, start=1):
        state = SECRET.advance(state, event, sequence)
    return state


def when(state: SecretState, command: object) -> list[DomainEvent]:
    return SECRET.decide_at(state, command, NOW)  # type: ignore[arg-type]


def created(version: int = 1, digest: str = D1) -> SecretCreated:
    return SecretCreated(workspace_id=WS, name=NAME, version=version, digest=digest)


def test_create_records_name_version_and_digest_only() -> None:
    events = when(given(), CreateSecret(workspace_id=WS, name=NAME, version=1, digest=D1))
    assert events == [created()]
    assert set(events[0].model_dump()) == {"workspace_id", "name", "version", "digest"}


def test_create_of_an_existing_secret_is_rejected_naming_the_name() -> None:
    with pytest.raises(Rejected, match="already exists") as rejected:
        when(given(created()), CreateSecret(workspace_id=WS, name=NAME, version=2, digest=D2))
    assert rejected.value.field == "name"


def test_update_makes_a_new_version() -> None:
    events = when(given(created()), UpdateSecret(workspace_id=WS, name=NAME, version=2, digest=D2))
    assert events == [SecretUpdated(workspace_id=WS, name=NAME, version=2, digest=D2)]


def test_a_version_that_does_not_move_forward_is_rejected() -> None:
    state = given(created(), SecretUpdated(workspace_id=WS, name=NAME, version=3, digest=D3))
    with pytest.raises(Rejected, match="not after") as rejected:
        when(state, UpdateSecret(workspace_id=WS, name=NAME, version=2, digest=D2))
    assert rejected.value.field == "version"


def test_update_or_delete_of_a_missing_secret_is_rejected() -> None:
    for command in (
        UpdateSecret(workspace_id=WS, name=NAME, version=1, digest=D1),
        DeleteSecret(workspace_id=WS, name=NAME),
    ):
        with pytest.raises(Rejected, match="does not exist"):
            when(given(), command)


def test_delete_says_deleted_at_the_last_version() -> None:
    state = given(created(), SecretUpdated(workspace_id=WS, name=NAME, version=2, digest=D2))
    events = when(state, DeleteSecret(workspace_id=WS, name=NAME))
    assert events == [SecretDeleted(workspace_id=WS, name=NAME, version=2)]


def test_a_deleted_secret_can_be_created_again_but_never_reuses_a_version() -> None:
    state = given(created(), SecretDeleted(workspace_id=WS, name=NAME, version=1))
    with pytest.raises(Rejected, match="not after"):
        when(state, CreateSecret(workspace_id=WS, name=NAME, version=1, digest=D2))
    events = when(state, CreateSecret(workspace_id=WS, name=NAME, version=2, digest=D2))
    assert events == [created(version=2, digest=D2)]


def test_a_command_for_another_aggregate_id_is_rejected() -> None:
    state = SECRET.initial_state(secret_aggregate_id("other", NAME))
    with pytest.raises(Rejected) as rejected:
        when(state, CreateSecret(workspace_id=WS, name=NAME, version=1, digest=D1))
    assert rejected.value.field == "aggregate_id"


def test_a_command_never_takes_a_value() -> None:
    with pytest.raises(ValueError, match="value"):
        CreateSecret.model_validate(
            {"workspace_id": WS, "name": NAME, "version": 1, "digest": D1, "value": "x"}
        )
