from __future__ import annotations

import json

from events.schemas import SCHEMA_DIR, generate, render


def test_committed_schemas_match_the_code() -> None:
    """Fails when a command or event model changed without `loopstream schemas`."""
    generated = generate()
    committed = {
        str(path.relative_to(SCHEMA_DIR)): path.read_text() for path in SCHEMA_DIR.rglob("*.json")
    }
    stale = sorted(
        name for name, schema in generated.items() if committed.get(name) != render(schema)
    )
    orphans = sorted(set(committed) - set(generated))
    assert not stale and not orphans, (
        f"docs/schemas is stale (run `loopstream schemas`): changed {stale}, orphaned {orphans}"
    )


def test_command_schema_pins_type_and_names_payload_fields() -> None:
    schema = generate()["commands/CreateRun.v1.json"]
    assert schema["properties"]["type"] == {"const": "CreateRun"}
    payload = schema["properties"]["payload"]
    assert {"run_id", "sampler_id", "max_seq_len"} <= set(payload["required"])
    assert json.dumps(schema)  # serialisable as is


def test_a_real_command_and_event_validate_against_their_published_schemas() -> None:
    from datetime import UTC, datetime

    import jsonschema

    from commands.envelope import CommandEnvelope
    from commands.handling import Accepted, handle_command

    command = CommandEnvelope(
        command_id="c1", type="CreateSession", aggregate_id="s1", payload={"base_model": "m"}
    )
    document = json.loads(command.to_bytes())
    jsonschema.validate(document, generate()["commands/CreateSession.v1.json"])

    outcome = handle_command(
        command.to_bytes(),
        key=b"s1",
        load_state=lambda spec, aggregate_id: spec.initial_state(aggregate_id),
        previous_result=lambda _: None,
        now=datetime(2026, 1, 1, tzinfo=UTC),
        new_event_id=lambda: "e1",
    )
    assert isinstance(outcome, Accepted)
    event = json.loads(outcome.events[0].to_bytes())
    jsonschema.validate(event, generate()["events/SessionCreated.v1.json"])
    result = json.loads(outcome.result.to_bytes())
    jsonschema.validate(result, generate()["CommandResult.json"])

    bad = {**document, "payload": {"base_model": 5}}
    try:
        jsonschema.validate(bad, generate()["commands/CreateSession.v1.json"])
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("a wrong payload type passed the schema")
