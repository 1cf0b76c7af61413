"""A checkpoint's own user_metadata (SaveWeights -> RecordCheckpoint -> CheckpointSaved -> the
checkpoints row), and the sampling session ids that pin a published checkpoint of another run."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.tinker import ids
from commands.loops import RecordCheckpoint
from commands.work import SaveWeights
from events.limits import MAX_METADATA_ENTRIES
from events.loops import CheckpointSaved
from projections.loops import project_event
from tests.unit.test_checkpoint_ttl_and_publishing import _envelope
from tests.unit.test_weight_sync_aggregate import FILES, play, run


def _record(user_metadata: dict[str, str] | None) -> RecordCheckpoint:
    return RecordCheckpoint(
        run_id="r1", checkpoint_id="ck-a", name="a", kind="weights", files=FILES,
        user_metadata=user_metadata,
    )  # fmt: skip


def test_a_recorded_checkpoint_carries_its_user_metadata_to_the_event_and_the_row() -> None:
    _, events = play(run(), _record({"renderer": "role_colon"}))
    [saved] = [e for e in events if isinstance(e, CheckpointSaved)]
    assert saved.user_metadata == {"renderer": "role_colon"}
    [row] = project_event(_envelope(saved), saved)
    assert row.table == "checkpoints" and row.values["user_metadata"] == {"renderer": "role_colon"}


def test_a_checkpoint_saved_without_user_metadata_has_none() -> None:
    _, events = play(run(), _record(None))
    [saved] = [e for e in events if isinstance(e, CheckpointSaved)]
    assert saved.user_metadata is None
    [row] = project_event(_envelope(saved), saved)
    assert row.values["user_metadata"] is None


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"n": 1}, "user_metadata.n"),
        ({"k": "x" * 1001}, "user_metadata.k"),
        ({f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)}, "user_metadata"),
    ],
)
def test_a_save_refuses_user_metadata_a_run_would_refuse(
    metadata: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError) as err:
        SaveWeights(name="a", kind="weights", user_metadata=metadata)  # type: ignore[arg-type]
    where = ".".join(str(p) for p in err.value.errors()[0]["loc"])
    assert where == field


@pytest.mark.parametrize(
    "uri",
    [
        None,
        "bt://loops:run-a/sampler_weights/own",
        "bt://loops:run-b/sampler_weights/theirs.v1",
    ],
)
def test_sampling_session_ids_name_their_run_and_pinned_checkpoint_and_parse_back(
    uri: str | None,
) -> None:
    session = ids.SamplingSession("run-a", uri, "n0nce")
    assert ids.SamplingSession.parse(session.id) == session
    if uri is not None and "run-b" in uri:
        assert session.id == "run-a~from~run-b~sampler_weights~theirs.v1~n0nce"
