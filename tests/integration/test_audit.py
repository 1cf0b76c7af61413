"""Audit reads an aggregate's history from the log and folds it to any point in time."""

from __future__ import annotations

import uuid

from commands.bus import CommandBus
from events.audit import causation_forest, history, state_as_of, tail
from infra.settings import Settings
from tests.integration.kafka_helpers import (
    command,
    isolated_settings,
    running_processor,
    wait_for_results,
)


def test_history_causation_and_state_at_a_sequence(settings: Settings) -> None:
    s = isolated_settings(settings)
    sid = f"s{uuid.uuid4().hex[:8]}"
    other = f"s{uuid.uuid4().hex[:8]}"
    commands = [
        command("CreateSession", sid, {"base_model": "m"}, correlation_id="conv-1"),
        command("CreateSession", other, {"base_model": "m"}),
        command("CreateRun", sid, {"run_id": "r1", "sampler_id": "p1", "max_seq_len": 8}),
        command("EndSession", sid, {"reason": "done"}, correlation_id="conv-1"),
    ]
    with running_processor(s):
        CommandBus(s).send_many(commands)
        wait_for_results(s, [c.command_id for c in commands])

    events = history(s, sid)
    assert [e.sequence for e in events] == list(range(1, 7))
    assert {e.aggregate_id for e in events} == {sid}

    forest = causation_forest(events)
    assert [node.id for node in forest] == [commands[0].command_id, commands[2].command_id,
                                            commands[3].command_id]  # fmt: skip
    assert [len(node.children) for node in forest] == [1, 2, 3]

    assert state_as_of(events, sequence=1).status == "active"
    assert state_as_of(events, sequence=3).runs["r1"].active
    final = state_as_of(events)
    assert final.status == "ended" and not final.runs["r1"].active
    assert state_as_of(events, at=events[0].occurred_at).version >= 1

    conversation = list(tail(s, correlation_id="conv-1", from_beginning=True, idle_timeout_s=3))
    assert [e.type for e in conversation] == [
        "SessionCreated", "RunStopped", "SamplerStopped", "SessionEnded",
    ]  # fmt: skip


def _audit_cli(*args: str) -> str:
    """`loopstream audit history ...` in this process: its stdout, after a clean exit."""
    from typer.testing import CliRunner

    from api.cli import app

    done = CliRunner().invoke(app, ["audit", "history", *args])
    assert done.exit_code == 0, f"{done.output}\n{done.exception!r}"
    return done.output


def test_every_kind_of_id_is_audited_including_a_promoted_checkpoint(
    services: Settings, api_key: str
) -> None:
    import httpx
    import tinker

    from api.audit import subjects
    from api.auth import parse_key
    from api.bootstrap import issue_key
    from api.client import ServiceClient
    from api.config import get_api_settings

    with ServiceClient() as service:
        session = service.create_session("loopstream/tiny-llama", name="audit [every] kind")
        training = service.create_training_client(session, max_seq_len=32)
        saved = training.save_weights_for_sampler("kept").result(120)
        service.promote_checkpoint(saved["checkpoint_id"], environment="production").result(60)
        training.sampling_client().sample(prompt="a", num_samples=1, max_tokens=2).result(120)
    key = issue_key(services, scopes=("infer",), name="audited")
    key_id = (parse_key(key) or ("", ""))[0]
    secret_name = f"audit_{uuid.uuid4().hex[:8]}"
    with httpx.Client(
        base_url=get_api_settings().base_url,
        headers={"Authorization": f"Api-Key {api_key}"},
        timeout=60,
    ) as admin:
        created = admin.post("/v1/secrets", json={"name": secret_name, "value": "v"})
        assert created.status_code == 201, created.text
    tinker_service = tinker.ServiceClient(base_url=get_api_settings().base_url, api_key=api_key)
    tinker_training = tinker_service.create_lora_training_client(
        base_model="loopstream/tiny-llama", rank=0
    ).result()
    tinker_training.save_weights_for_sampler("audited").result()  # the run's and sampler's events
    model_id = tinker_training.model_id
    tinker_session = model_id.split(":")[0]

    def kinds(resource_id: str) -> list[tuple[str, str]]:
        return [(s.kind, s.id) for s in subjects(services, resource_id)]

    # Checkpoint saves and the promotion are in the session's state; the CLI prints it (the
    # promotion's environments are a set, printed as a sorted list).
    (audited,) = subjects(services, session.session_id)
    checkpoint = audited.state().checkpoints[saved["checkpoint_id"]]
    assert checkpoint.promoted_to == frozenset({"production"})
    assert {"CheckpointSaved", "CheckpointPromoted"} <= {e.type for e in audited.events}
    printed = _audit_cli(session.session_id)
    assert f"session {session.session_id}" in printed and '"production"' in printed
    assert "audit [every] kind" in printed  # user text printed as it is

    # The workers' own streams: the run (trainer) and the sampler fold to what they reported.
    (run,) = subjects(services, training.run_id)
    assert run.kind == "trainer" and "WeightsSaved" in run.state().latest
    (sampler,) = subjects(services, training.sampler_id)
    assert sampler.kind == "sampler" and sampler.state().events["SamplesGenerated"] >= 1
    for resource_id in (training.run_id, training.sampler_id):
        assert resource_id in _audit_cli(resource_id)

    # A workspace by its own id, a secret by its name, an API key by its id.
    assert kinds("default") == [("workspace", "workspace:default")]
    assert kinds(secret_name) == [("secret", f"secret:default:{secret_name}")]
    (key_subject,) = subjects(services, key_id)
    assert key_subject.kind == "api key" and [e.type for e in key_subject.events] == [
        "ApiKeyCreated"
    ]
    assert key_subject.state().scopes == ("infer",)
    for resource_id in ("default", secret_name, key_id):
        assert resource_id in _audit_cli(resource_id)

    # A Tinker session and a Tinker model id: the loops session made for the model, its run
    # and its sampler.
    loops_session = ids_of_tinker_model(model_id)
    expected = [("session", loops_session[0]), ("trainer", loops_session[1]),
                ("sampler", loops_session[2])]  # fmt: skip
    assert kinds(tinker_session) == expected
    assert kinds(model_id) == expected
    assert loops_session[1] in _audit_cli(tinker_session)
    tinker_service.close("success").result()


def ids_of_tinker_model(model_id: str) -> tuple[str, str, str]:
    from api.tinker import ids

    run_id = ids.run_id_of(model_id)
    return run_id.replace("-train-", "-s-"), run_id, ids.sampler_id_of(model_id)


def test_an_unknown_id_or_one_that_looks_like_markup_is_an_error_not_a_crash(
    settings: Settings,
) -> None:
    from typer.testing import CliRunner

    from api.cli import app

    done = CliRunner().invoke(app, ["audit", "history", "oops [/] nobody"])
    assert done.exit_code == 1 and "no events for 'oops [/] nobody'" in done.output
