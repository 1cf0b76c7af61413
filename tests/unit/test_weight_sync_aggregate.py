"""Weight syncs, hotload and promotion on the session aggregate (given events / when command /
then events or rejection)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from commands.checkpoint_chains import dependents, parents
from commands.loops import (
    PROMOTABILITY_RULE,
    CreateRun,
    DeleteCheckpoint,
    EndSession,
    HotloadOptions,
    HotloadWeights,
    PromoteCheckpoint,
    RecordCheckpoint,
    Rejected,
    SessionState,
    decide,
    initial_state,
)
from commands.registry import SESSION
from events.loops import (
    CheckpointDeleted,
    CheckpointFile,
    CheckpointPromoted,
    CheckpointSaved,
    DomainEvent,
    SessionCreated,
    WeightsReady,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
SYNC = HotloadOptions()
FILES = (CheckpointFile(relative_file_name="model.safetensors", size_bytes=100, sha256="b" * 64),)


def play(*commands: object) -> tuple[SessionState, list[DomainEvent]]:
    """Decide and apply each command in turn; the state and every event."""
    state = SESSION.advance(
        initial_state("s1"), SessionCreated(session_id="s1", base_model="tiny"), 1
    )
    events: list[DomainEvent] = []
    for command in commands:
        for event in decide(state, command, now=NOW):  # type: ignore[arg-type]
            state = SESSION.advance(state, event, state.version + 1)
            events.append(event)
    return state, events


def run(lora_rank: int = 0, keep: int | None = None) -> CreateRun:
    return CreateRun(
        run_id="r1", sampler_id="p1", max_seq_len=64, lora_rank=lora_rank,
        keep_last_checkpoints=keep,
    )  # fmt: skip


def save(name: str, position: int, *, hotload: HotloadOptions | None = SYNC,
         kind: str = "sampler_weights", ttl: int | None = None) -> RecordCheckpoint:  # fmt: skip
    return RecordCheckpoint(
        run_id="r1", checkpoint_id=f"ck-{name}", name=name, kind=kind, files=FILES,  # type: ignore[arg-type]
        checkpoint_type="base" if position == 0 else "delta", chain_position=position,
        hotload=hotload, ttl_seconds=ttl,
    )  # fmt: skip


def syncs(events: list[DomainEvent]) -> list[WeightsReady]:
    return [e for e in events if isinstance(e, WeightsReady)]


def test_each_sync_of_a_sampler_gets_the_next_version_and_the_options() -> None:
    options = HotloadOptions(warmup=True, warmup_max_retries=3, reset_prompt_cache=False)
    _, events = play(run(), save("a", 0), save("b", 1, hotload=options), save("c", 2))
    ready = syncs(events)
    assert [r.weights_version for r in ready] == [1, 2, 3]
    assert [r.checkpoint_type for r in ready] == ["base", "delta", "delta"]
    assert (ready[1].warmup, ready[1].warmup_max_retries, ready[1].reset_prompt_cache) == (
        True, 3, False,
    )  # fmt: skip
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert [(s.checkpoint_type, s.chain_position) for s in saved] == [
        ("base", 0), ("delta", 1), ("delta", 2),
    ]  # fmt: skip


def test_save_only_records_the_checkpoint_without_a_sync_and_hotload_syncs_it_later() -> None:
    _, events = play(run(), save("a", 0, hotload=None))
    assert syncs(events) == []
    _, events = play(run(), save("a", 0, hotload=None), HotloadWeights(run_id="r1", name="a"))
    (ready,) = syncs(events)
    assert (ready.weights_version, ready.checkpoint_id, ready.checkpoint_type) == (
        1,
        "ck-a",
        "base",
    )
    assert ready.uri == "bt://loops:r1/sampler_weights/a"


def test_hotloading_the_same_snapshot_again_is_a_new_sync() -> None:
    hot = HotloadWeights(run_id="r1", name="a")
    _, events = play(run(), save("a", 0), hot, hot)
    assert [r.weights_version for r in syncs(events)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("command", "field", "message"),
    [
        (HotloadWeights(run_id="r1", name="nope"), "name", "no sampler_weights snapshot"),
        (HotloadWeights(run_id="r1", name="a", checkpoint_type="delta"), "checkpoint_type",
         "saved as a base, not a delta"),
        (HotloadWeights(run_id="r9", name="a"), "run_id", "does not exist"),
    ],
)  # fmt: skip
def test_hotload_refusals_name_the_field(command: HotloadWeights, field: str, message: str) -> None:
    state, _ = play(run(), save("a", 0, hotload=None))
    with pytest.raises(Rejected, match=message) as err:
        decide(state, command, now=NOW)
    assert err.value.field == field


def test_only_the_base_of_a_full_parameter_chain_is_promotable() -> None:
    state, _ = play(run(), save("a", 0), save("b", 1))
    (promoted,) = decide(state, PromoteCheckpoint(checkpoint_id="ck-a"), now=NOW)
    assert promoted == CheckpointPromoted(
        checkpoint_id="ck-a", run_id="r1", session_id="s1",
        uri="bt://loops:r1/sampler_weights/a", environment="production",
    )  # fmt: skip
    with pytest.raises(Rejected) as err:
        decide(state, PromoteCheckpoint(checkpoint_id="ck-b"), now=NOW)
    assert PROMOTABILITY_RULE in err.value.reason
    assert "delta at chain position 1" in err.value.reason
    assert err.value.field == "checkpoint_id"


def test_lora_checkpoints_are_always_promotable() -> None:
    state, _ = play(run(lora_rank=8), save("a", 0), save("b", 0))
    assert decide(state, PromoteCheckpoint(checkpoint_id="ck-b", environment="staging"), now=NOW)


def test_training_state_checkpoints_and_repeats_are_not_promoted() -> None:
    state, _ = play(run(), save("w", 0, kind="weights", hotload=None), save("a", 0),
                    PromoteCheckpoint(checkpoint_id="ck-a"))  # fmt: skip
    with pytest.raises(Rejected, match="promote sampler_weights"):
        decide(state, PromoteCheckpoint(checkpoint_id="ck-w"), now=NOW)
    with pytest.raises(Rejected, match="already promoted to production") as err:
        decide(state, PromoteCheckpoint(checkpoint_id="ck-a"), now=NOW)
    assert err.value.field == "environment"


def test_a_promoted_checkpoint_outlives_retention_and_expiry_but_not_its_user() -> None:
    state, events = play(
        run(keep=1), save("a", 0, ttl=60), PromoteCheckpoint(checkpoint_id="ck-a"),
        save("b", 0), save("c", 0),
    )  # fmt: skip
    deleted = [e.checkpoint_id for e in events if isinstance(e, CheckpointDeleted)]
    assert deleted == ["ck-b"]  # retention keeps the newest one and the promoted one
    assert state.checkpoints["ck-a"].expires_at is None
    with pytest.raises(Rejected, match="promoted to production"):
        decide(state, DeleteCheckpoint(checkpoint_id="ck-a", reason="expired"), now=NOW)
    assert decide(state, DeleteCheckpoint(checkpoint_id="ck-a"), now=NOW)


# --- chain-aware retention and expiry ---------------------------------------------------------


def deleted_ids(events: list[DomainEvent]) -> list[str]:
    return [e.checkpoint_id for e in events if isinstance(e, CheckpointDeleted)]


def test_retention_keeps_every_link_of_the_chain_the_sampler_serves() -> None:
    state, events = play(run(keep=2), save("a", 0), save("d1", 1), save("d2", 2), save("d3", 3))
    assert deleted_ids(events) == []  # d3 is served and needs d2, d1 and a
    assert [c.name for c in state.checkpoints.values() if not c.deleted] == ["a", "d1", "d2", "d3"]


def test_a_new_base_lets_retention_collect_the_old_chain_from_its_tail() -> None:
    state, events = play(
        run(keep=2), save("a", 0), save("d1", 1), save("d2", 2), save("d3", 3), save("b", 0)
    )
    # Oldest first among what no chain needs: d3 (no longer served) frees d2, which frees d1.
    assert deleted_ids(events) == ["ck-d3", "ck-d2", "ck-d1"]
    assert [c.name for c in state.checkpoints.values() if not c.deleted] == ["a", "b"]


def test_retention_skips_a_needed_link_and_deletes_the_next_eligible() -> None:
    _, events = play(
        run(keep=3), save("w", 0, kind="weights"), save("x", 0, hotload=None), save("a", 0),
        save("d1", 1), save("d2", 2),
    )  # fmt: skip
    assert deleted_ids(events) == ["ck-x"]  # a is d2's base: x, a standalone base, goes instead


def test_expiry_of_a_chain_link_or_of_the_served_weights_waits_for_the_chain_to_move_on() -> None:
    state, _ = play(run(), save("a", 0, ttl=1), save("d1", 1, ttl=1))
    with pytest.raises(Rejected, match=r"link of the delta chain of live checkpoint.* ck-d1"):
        decide(state, DeleteCheckpoint(checkpoint_id="ck-a", reason="expired"), now=NOW)
    with pytest.raises(Rejected, match="sampler of run r1 serves it") as err:
        decide(state, DeleteCheckpoint(checkpoint_id="ck-d1", reason="expired"), now=NOW)
    assert err.value.field == "checkpoint_id"

    # A new base: the sampler moves to it, d1 may expire, and then its base a.
    state, events = play(run(), save("a", 0, ttl=1), save("d1", 1, ttl=1), save("b", 0),
                         DeleteCheckpoint(checkpoint_id="ck-d1", reason="expired"),
                         DeleteCheckpoint(checkpoint_id="ck-a", reason="expired"))  # fmt: skip
    assert deleted_ids(events) == ["ck-d1", "ck-a"]


def test_a_user_cannot_delete_a_link_that_later_deltas_need_but_may_delete_the_head() -> None:
    state, _ = play(run(), save("a", 0), save("d1", 1), save("d2", 2))
    with pytest.raises(Rejected, match=r"ck-d1, ck-d2: delete those first"):
        decide(state, DeleteCheckpoint(checkpoint_id="ck-a"), now=NOW)
    _, events = play(
        run(), save("a", 0), save("d1", 1), save("d2", 2), DeleteCheckpoint(checkpoint_id="ck-d2"),
        DeleteCheckpoint(checkpoint_id="ck-d1"), DeleteCheckpoint(checkpoint_id="ck-a"),
    )  # fmt: skip
    assert deleted_ids(events) == ["ck-d2", "ck-d1", "ck-a"]


def test_after_the_session_ends_links_still_wait_for_their_live_deltas() -> None:
    _, events = play(
        run(), save("a", 0, ttl=1), save("d1", 1, ttl=1), EndSession(),
        DeleteCheckpoint(checkpoint_id="ck-d1", reason="expired"),  # no sampler serves it now
        DeleteCheckpoint(checkpoint_id="ck-a", reason="expired"),
    )  # fmt: skip
    assert deleted_ids(events) == ["ck-d1", "ck-a"]
    state, _ = play(run(), save("a", 0, ttl=1), save("d1", 1, ttl=1), EndSession())
    with pytest.raises(Rejected, match="ck-d1"):
        decide(state, DeleteCheckpoint(checkpoint_id="ck-a", reason="expired"), now=NOW)


def test_a_delta_chains_onto_the_runs_previous_sampler_save_at_the_position_before() -> None:
    state, _ = play(
        run(), save("a", 0), save("d1", 1), save("w", 0, kind="weights"), save("d2", 2),
        save("b", 0), save("e1", 1),
    )  # fmt: skip
    chain = parents(state.checkpoints.values())
    assert chain == {"ck-d1": "ck-a", "ck-d2": "ck-d1", "ck-e1": "ck-b"}
    assert dependents(state.checkpoints.values(), "ck-a") == ["ck-d1", "ck-d2"]
    assert dependents(state.checkpoints.values(), "ck-b") == ["ck-e1"]
