from __future__ import annotations

from infra.settings import Settings
from infra.topics import CATALOG, FOREVER, topic_names


def test_topic_names_are_unique_and_prefixed() -> None:
    names = topic_names(Settings(topic_prefix="prod"))
    assert len(set(names.values())) == len(CATALOG)
    assert names["events"] == "prod.events"


def test_event_log_is_kept_forever() -> None:
    events = next(spec for spec in CATALOG if spec.name == "events")
    assert events.config()["retention.ms"] == str(FOREVER)
    assert events.config()["cleanup.policy"] == "delete"


def test_results_are_compacted_by_command_id() -> None:
    compacted = {spec.name for spec in CATALOG if spec.compacted}
    assert compacted == {"command-results"}


def test_every_input_topic_has_a_dead_letter_topic() -> None:
    names = {spec.name for spec in CATALOG}
    assert {"commands.dlq", "events.dlq"} <= names
