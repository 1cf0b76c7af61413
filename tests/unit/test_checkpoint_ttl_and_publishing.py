"""A checkpoint's TTL changed after its save, publishing, and a run's user_metadata: on the
session aggregate (given events / when command / then events or rejection), in the janitor's
bookkeeping and in the read-model projection."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from pydantic import ValidationError

from commands.janitor import CheckpointJanitor, Expiring
from commands.loops import (
    CreateRun,
    DeleteCheckpoint,
    EndSession,
    PromoteCheckpoint,
    PublishCheckpoint,
    Rejected,
    SetCheckpointTtl,
    UnpublishCheckpoint,
    decide,
)
from events.envelope import EventEnvelope
from events.ids import uuid7
from events.limits import MAX_METADATA_ENTRIES, MAX_TTL_SECONDS
from events.loops import (
    CheckpointDeleted,
    CheckpointPublished,
    CheckpointTtlChanged,
    CheckpointUnpublished,
    RunCreated,
)
from projections.loops import project_event
from tests.unit.test_weight_sync_aggregate import NOW, play, run, save

URI = "bt://loops:r1/sampler_weights/a"


# --- TTL --------------------------------------------------------------------------------------


def test_a_new_ttl_counts_from_now_and_replaces_the_one_of_the_save() -> None:
    extend = SetCheckpointTtl(checkpoint_id="ck-a", ttl_seconds=7200)
    state, events = play(run(), save("a", 0, ttl=60), extend)
    changed = events[-1]
    assert isinstance(changed, CheckpointTtlChanged)
    assert (changed.checkpoint_id, changed.uri, changed.ttl_seconds) == ("ck-a", URI, 7200)
    assert changed.expires_at == NOW + timedelta(seconds=7200)
    assert state.checkpoints["ck-a"].expires_at == NOW + timedelta(seconds=7200)


def test_a_null_ttl_means_the_checkpoint_never_expires() -> None:
    state, events = play(
        run(), save("a", 0, ttl=60), save("b", 0),
        SetCheckpointTtl(checkpoint_id="ck-a", ttl_seconds=None),
    )  # fmt: skip
    assert isinstance(events[-1], CheckpointTtlChanged) and events[-1].expires_at is None
    assert state.checkpoints["ck-a"].expires_at is None
    later = NOW + timedelta(days=1)
    with pytest.raises(Rejected, match="is not expired: it never expires") as err:
        decide(state, DeleteCheckpoint(checkpoint_id="ck-a", reason="expired"), now=later)
    assert err.value.field == "checkpoint_id"
    assert decide(state, DeleteCheckpoint(checkpoint_id="ck-a"), now=later)  # a user still may


def test_an_expiry_decided_before_a_ttl_extension_deletes_nothing() -> None:
    state, _ = play(run(), save("a", 0, ttl=60), save("b", 0),
                    SetCheckpointTtl(checkpoint_id="ck-a", ttl_seconds=3600))  # fmt: skip
    due_before = NOW + timedelta(seconds=120)  # the janitor's old deadline has passed
    with pytest.raises(Rejected, match="is not expired: it expires at"):
        decide(state, DeleteCheckpoint(checkpoint_id="ck-a", reason="expired"), now=due_before)
    due = NOW + timedelta(seconds=3600)
    [deleted] = decide(state, DeleteCheckpoint(checkpoint_id="ck-a", reason="expired"), now=due)
    assert isinstance(deleted, CheckpointDeleted) and deleted.reason == "expired"


@pytest.mark.parametrize("ttl", [0, -1, MAX_TTL_SECONDS + 1])
def test_a_ttl_out_of_the_save_time_bounds_is_refused_naming_ttl_seconds(ttl: int) -> None:
    with pytest.raises(ValidationError) as err:
        SetCheckpointTtl(checkpoint_id="ck-a", ttl_seconds=ttl)
    assert err.value.errors()[0]["loc"] == ("ttl_seconds",)


def test_ttl_seconds_must_be_given_even_to_remove_the_expiry() -> None:
    with pytest.raises(ValidationError, match="ttl_seconds"):
        SetCheckpointTtl(checkpoint_id="ck-a")  # type: ignore[call-arg]


def test_no_ttl_for_a_missing_or_deleted_checkpoint() -> None:
    state, _ = play(run(), save("a", 0, hotload=None), DeleteCheckpoint(checkpoint_id="ck-a"))
    for checkpoint_id, word in (("ck-a", "is deleted"), ("ck-x", "does not exist")):
        with pytest.raises(Rejected, match=word) as err:
            decide(state, SetCheckpointTtl(checkpoint_id=checkpoint_id, ttl_seconds=60), now=NOW)
        assert err.value.field == "checkpoint_id"


def test_a_promoted_checkpoint_takes_no_ttl() -> None:
    state, _ = play(run(), save("a", 0), PromoteCheckpoint(checkpoint_id="ck-a"))
    with pytest.raises(Rejected, match="promoted to production: it never expires") as err:
        decide(state, SetCheckpointTtl(checkpoint_id="ck-a", ttl_seconds=60), now=NOW)
    assert err.value.field == "ttl_seconds"
    assert decide(state, SetCheckpointTtl(checkpoint_id="ck-a", ttl_seconds=None), now=NOW)


def test_ttl_and_publishing_still_work_after_the_session_ended() -> None:
    state, events = play(
        run(), save("a", 0, ttl=60), EndSession(),
        SetCheckpointTtl(checkpoint_id="ck-a", ttl_seconds=3600),
        PublishCheckpoint(checkpoint_id="ck-a"), UnpublishCheckpoint(checkpoint_id="ck-a"),
    )  # fmt: skip
    assert [type(e) for e in events[-3:]] == [
        CheckpointTtlChanged, CheckpointPublished, CheckpointUnpublished,
    ]  # fmt: skip
    assert state.status == "ended"


# --- publishing -------------------------------------------------------------------------------


def test_publish_then_unpublish_flips_the_flag() -> None:
    state, events = play(run(), save("a", 0), PublishCheckpoint(checkpoint_id="ck-a"))
    assert isinstance(events[-1], CheckpointPublished) and events[-1].uri == URI
    assert state.checkpoints["ck-a"].public
    state, _ = play(run(), save("a", 0), PublishCheckpoint(checkpoint_id="ck-a"),
                    UnpublishCheckpoint(checkpoint_id="ck-a"))  # fmt: skip
    assert not state.checkpoints["ck-a"].public


def test_publishing_twice_or_unpublishing_a_private_checkpoint_is_refused_naming_public() -> None:
    state, _ = play(run(), save("a", 0), PublishCheckpoint(checkpoint_id="ck-a"))
    with pytest.raises(Rejected, match="already public") as err:
        decide(state, PublishCheckpoint(checkpoint_id="ck-a"), now=NOW)
    assert err.value.field == "public"
    state, _ = play(run(), save("a", 0))
    with pytest.raises(Rejected, match="is not public") as err:
        decide(state, UnpublishCheckpoint(checkpoint_id="ck-a"), now=NOW)
    assert err.value.field == "public"


def test_a_deleted_checkpoint_cannot_be_published() -> None:
    state, _ = play(run(), save("a", 0, hotload=None), DeleteCheckpoint(checkpoint_id="ck-a"))
    with pytest.raises(Rejected, match="is deleted") as err:
        decide(state, PublishCheckpoint(checkpoint_id="ck-a"), now=NOW)
    assert err.value.field == "checkpoint_id"


# --- user_metadata ----------------------------------------------------------------------------


def test_a_runs_user_metadata_travels_on_run_created() -> None:
    command = run().model_copy(update={"user_metadata": {"team": "rl", "exp": "a-1"}})
    _, events = play(CreateRun.model_validate(command.model_dump()))
    created = events[0]
    assert isinstance(created, RunCreated) and created.user_metadata == {"team": "rl", "exp": "a-1"}
    _, events = play(run())
    assert events[0].user_metadata is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("metadata", "where"),
    [
        ({"n": 1}, ("user_metadata", "n")),  # values are strings
        ({"n": {"nested": "x"}}, ("user_metadata", "n")),
        ({"": "x"}, ("user_metadata", "", "[key]")),
        ({"k": "x" * 1001}, ("user_metadata", "k")),
        ({"k": "a\x00b"}, ("user_metadata", "k")),
        ({f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)}, ("user_metadata",)),
        ("labels", ("user_metadata",)),
    ],
)
def test_user_metadata_is_a_small_object_of_strings(metadata: object, where: tuple) -> None:
    with pytest.raises(ValidationError) as err:
        CreateRun(run_id="r1", sampler_id="p1", max_seq_len=8, user_metadata=metadata)  # type: ignore[arg-type]
    assert err.value.errors()[0]["loc"] == where


# --- the janitor and the read models ---------------------------------------------------------


def _envelope(event: object, sequence: int = 9) -> EventEnvelope:
    return EventEnvelope(
        event_id=str(uuid7()), type=type(event).__name__, schema_version=1,
        aggregate_type="session", aggregate_id="s1", sequence=sequence, occurred_at=NOW,
        workspace_id="ws-1", payload=event.model_dump(mode="json"),  # type: ignore[attr-defined]
    )  # fmt: skip


def _ttl_changed(expires_at: datetime | None) -> CheckpointTtlChanged:
    return CheckpointTtlChanged(
        checkpoint_id="c1", run_id="r1", session_id="s1", uri=URI,
        ttl_seconds=None if expires_at is None else 60, expires_at=expires_at,
    )  # fmt: skip


class _NoTinker:
    def observe(self, *args: object) -> None:
        pass


def test_the_janitor_follows_a_ttl_change_under_a_new_expiry_id() -> None:
    janitor = CheckpointJanitor.__new__(CheckpointJanitor)  # no Kafka or S3: pure bookkeeping
    janitor.expiring = {"c1": Expiring("c1", "s1", NOW)}
    janitor.tinker = _NoTinker()  # type: ignore[assignment]
    later = NOW + timedelta(hours=1)
    envelope = _envelope(_ttl_changed(later))
    janitor.observe(envelope.kafka_headers(), envelope.to_bytes())
    moved = janitor.expiring["c1"]
    assert moved.expires_at == later and moved.workspace_id == "ws-1"
    assert moved.command_id == f"expire-c1-after-{envelope.event_id}"  # not the one sent before

    never = _envelope(_ttl_changed(None))
    janitor.observe(never.kafka_headers(), never.to_bytes())
    assert "c1" not in janitor.expiring


def test_projections_show_the_new_expiry_the_public_flag_and_the_runs_metadata() -> None:
    later = NOW + timedelta(hours=1)
    [ttl] = project_event(_envelope(_ttl_changed(later)), _ttl_changed(later))
    assert (ttl.table, ttl.creates, ttl.values["expires_at"]) == ("checkpoints", False, later)
    published = CheckpointPublished(checkpoint_id="c1", run_id="r1", session_id="s1", uri=URI)
    [flag] = project_event(_envelope(published), published)
    assert flag.values["public"] is True and flag.version == 9
    private = CheckpointUnpublished(checkpoint_id="c1", run_id="r1", session_id="s1", uri=URI)
    [flag] = project_event(_envelope(private), private)
    assert flag.values["public"] is False
    created = RunCreated(
        run_id="r1", session_id="s1", sampler_id="p1", base_model="m", max_seq_len=8,
        lora_rank=0, user_metadata={"team": "rl"},
    )  # fmt: skip
    [row] = project_event(_envelope(created), created)
    assert row.values["user_metadata"] == {"team": "rl"}
