"""The workspace aggregate as given events / when command / then events (or rejection), and the
API key format: made server-side, stored as an HMAC, verified in constant time."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from api.auth import hash_secret, key_from_headers, new_key, parse_key, verify
from commands.access import (
    CreateApiKey,
    CreateWorkspace,
    RevokeApiKey,
    WorkspaceState,
    aggregate_id_of,
    decide,
    initial_state,
)
from commands.loops import Rejected
from commands.registry import WORKSPACE
from events.access import ApiKeyCreated, ApiKeyRevoked, WorkspaceCreated
from events.loops import DomainEvent

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
KEY_ID = "0123456789abcdef"
HASH = "ab" * 32


def given(workspace: str, *events: DomainEvent) -> WorkspaceState:
    state = initial_state(aggregate_id_of(workspace))
    for sequence, event in enumerate(events, start=1):
        state = WORKSPACE.advance(state, event, sequence)
    return state


def create_key(key_id: str = KEY_ID, scopes: tuple = ("train",)) -> CreateApiKey:
    return CreateApiKey(
        key_id=key_id, name="ci", scopes=scopes, prefix=f"tml-{key_id}", key_hash=HASH
    )


def rejection(state: WorkspaceState, command: object) -> Rejected:
    with pytest.raises(Rejected) as caught:
        decide(state, command, now=NOW)  # type: ignore[arg-type]
    return caught.value


def test_creates_a_workspace_once() -> None:
    assert decide(given("acme"), CreateWorkspace(name="Acme"), now=NOW) == [
        WorkspaceCreated(workspace_id="acme", name="Acme")
    ]
    created = given("acme", WorkspaceCreated(workspace_id="acme"))
    assert rejection(created, CreateWorkspace()).reason == "workspace acme already exists"


def test_the_default_workspace_exists_without_an_event() -> None:
    events = decide(given("default"), create_key(), now=NOW)
    assert events == [
        ApiKeyCreated(
            key_id=KEY_ID,
            workspace_id="default",
            name="ci",
            scopes=("train",),
            prefix=f"tml-{KEY_ID}",
            key_hash=HASH,
        )
    ]
    assert rejection(given("default"), CreateWorkspace()).field == "aggregate_id"


def test_refuses_a_workspace_aggregate_id_without_the_prefix_or_with_a_bad_id() -> None:
    for aggregate_id in ("acme", "workspace:Not_Valid"):
        refused = rejection(initial_state(aggregate_id), CreateWorkspace())
        assert refused.field == "aggregate_id"


def test_refuses_a_key_in_a_workspace_that_does_not_exist() -> None:
    refused = rejection(given("ghost"), create_key())
    assert (refused.reason, refused.field) == ("workspace ghost does not exist", "workspace_id")


def test_refuses_a_key_id_twice_and_a_prefix_that_is_not_its_own() -> None:
    state = given("default", decide(given("default"), create_key(), now=NOW)[0])
    assert rejection(state, create_key()).field == "payload.key_id"
    wrong = CreateApiKey(key_id=KEY_ID, scopes=("admin",), prefix="tml-" + "f" * 16, key_hash=HASH)
    assert rejection(given("default"), wrong).field == "payload.prefix"


def test_scopes_are_recorded_sorted_and_once() -> None:
    (event,) = decide(given("default"), create_key(scopes=("train", "infer", "train")), now=NOW)
    assert isinstance(event, ApiKeyCreated) and event.scopes == ("infer", "train")


def test_revokes_a_key_once_and_only_a_known_one() -> None:
    created = decide(given("default"), create_key(), now=NOW)[0]
    state = given("default", created)
    assert decide(state, RevokeApiKey(key_id=KEY_ID, reason="leaked"), now=NOW) == [
        ApiKeyRevoked(key_id=KEY_ID, workspace_id="default", reason="leaked")
    ]
    revoked = given("default", created, ApiKeyRevoked(key_id=KEY_ID, workspace_id="default"))
    assert rejection(revoked, RevokeApiKey(key_id=KEY_ID)).reason == (
        f"api key {KEY_ID} is already revoked"
    )
    assert rejection(state, RevokeApiKey(key_id="f" * 16)).field == "payload.key_id"


def test_an_event_never_carries_the_secret() -> None:
    issued = new_key(hash_key="k" * 32)
    _, secret = parse_key(issued.key) or ("", "")
    command = CreateApiKey(
        key_id=issued.key_id, scopes=("admin",), prefix=issued.prefix, key_hash=issued.key_hash
    )
    (event,) = decide(given("default"), command, now=NOW)
    assert secret not in event.model_dump_json() and issued.key not in event.model_dump_json()


# --- the key format ----------------------------------------------------------------------------


def test_a_new_key_parses_back_and_verifies_against_its_hash_only() -> None:
    issued = new_key(hash_key="k" * 32)
    assert (
        issued.key.startswith(f"tml-{issued.key_id}_") and issued.prefix == f"tml-{issued.key_id}"
    )
    key_id, secret = parse_key(issued.key) or ("", "")
    assert key_id == issued.key_id and len(secret) >= 40
    assert verify(secret, issued.key_hash, hash_key="k" * 32)
    assert not verify(secret + "x", issued.key_hash, hash_key="k" * 32)
    assert not verify(secret, issued.key_hash, hash_key="other-server-key")
    assert issued.key_hash == hash_secret(secret, hash_key="k" * 32) and len(issued.key_hash) == 64


def test_two_keys_never_share_an_id_or_a_secret() -> None:
    keys = [new_key(hash_key="k" * 32) for _ in range(50)]
    assert len({k.key_id for k in keys}) == 50 and len({k.key for k in keys}) == 50


def test_malformed_keys_do_not_parse() -> None:
    for key in ("", "tml-", "tml-test-key", "sk-0123456789abcdef_" + "a" * 40,
                f"tml-{KEY_ID}_short", f"tml-{KEY_ID.upper()}_" + "a" * 40):  # fmt: skip
        assert parse_key(key) is None, key
    assert parse_key(f"tml-{KEY_ID}." + "a" * 40) == (KEY_ID, "a" * 40)


def test_the_key_comes_from_api_key_bearer_or_x_api_key_headers() -> None:
    assert key_from_headers("Api-Key tml-x", None) == "tml-x"
    assert key_from_headers("Bearer tml-x", None) == "tml-x"
    assert key_from_headers(None, "tml-x") == "tml-x"
    assert key_from_headers("Basic dXNlcg==", None) == ""  # present, not ours: malformed
    assert key_from_headers(None, None) is None


def test_the_development_hash_secret_is_refused_off_loopback() -> None:
    from pydantic import ValidationError

    from api.config import ApiSettings

    with pytest.raises(ValidationError, match="LOOPSTREAM_API_KEY_HASH_SECRET"):
        ApiSettings(api_host="0.0.0.0", page_token_secret="p" * 32)
    ApiSettings(api_host="0.0.0.0", page_token_secret="p" * 32, api_key_hash_secret="h" * 32)
    ApiSettings(api_host="127.0.0.1")  # the local stack keeps its development default
