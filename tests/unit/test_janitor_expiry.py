"""The janitor's expiry ids: a refused expiry (a needed chain link) is asked again only after an
event that may have freed it, under a new command id; never in a loop (pure parts)."""

from __future__ import annotations

from datetime import UTC, datetime

from commands.janitor import CheckpointJanitor, Expiring, _may_free_a_chain
from events.loops import CheckpointDeleted, CheckpointFile, CheckpointSaved, RunStopped

DUE = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
FILES = (CheckpointFile(relative_file_name="model.safetensors", size_bytes=1, sha256="b" * 64),)


def saved(checkpoint_type: str | None, kind: str = "sampler_weights") -> CheckpointSaved:
    return CheckpointSaved(
        checkpoint_id="c9", run_id="r1", session_id="s1", name="n", kind=kind,  # type: ignore[arg-type]
        uri="bt://loops:r1/sampler_weights/n", files=FILES, total_size_bytes=1,
        checkpoint_type=checkpoint_type,  # type: ignore[arg-type]
    )  # fmt: skip


def test_an_expiry_is_asked_once_per_change_of_its_sessions_chains() -> None:
    janitor = CheckpointJanitor.__new__(CheckpointJanitor)  # no Kafka or S3: pure bookkeeping
    janitor.expiring = {
        "a": Expiring("a", "s1", DUE),
        "b": Expiring("b", "s1", DUE),
        "c": Expiring("c", "s2", DUE),
    }
    assert [e.command_id for e in janitor.expiring.values()] == [
        "expire-a", "expire-b", "expire-c",
    ]  # fmt: skip
    janitor._retry_refused("s1", after="ev1")
    assert [e.command_id for e in janitor.expiring.values()] == [
        "expire-a-after-ev1", "expire-b-after-ev1", "expire-c",
    ]  # fmt: skip


def test_only_events_that_can_free_a_chain_link_trigger_a_new_ask() -> None:
    assert _may_free_a_chain(saved("base"))  # a new chain: the sampler leaves the old one
    assert _may_free_a_chain(saved(None))
    assert not _may_free_a_chain(saved("delta"))  # a longer chain needs its links even more
    assert not _may_free_a_chain(saved(None, kind="weights"))
    uri = "bt://loops:r1/sampler_weights/x"
    deleted = CheckpointDeleted(
        checkpoint_id="c1", run_id="r1", session_id="s1", uri=uri, reason="deleted"
    )
    assert _may_free_a_chain(deleted)
    assert _may_free_a_chain(RunStopped(run_id="r1", session_id="s1", reason="ended"))
