from __future__ import annotations

from pathlib import Path

import pytest

from infra.settings import REPO_ROOT, Settings


def test_defaults_point_at_the_local_stack() -> None:
    settings = Settings()
    assert settings.kafka_bootstrap_servers == "127.0.0.1:19092"
    assert (
        settings.pg_dsn == "postgresql+psycopg://loopstream:loopstream@127.0.0.1:15432/loopstream"
    )
    assert settings.data_dir == REPO_ROOT / ".loopstream"


def test_environment_overrides_with_loopstream_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPSTREAM_PG_PORT", "6543")
    monkeypatch.setenv("LOOPSTREAM_S3_ENDPOINT", "s3.example.com:443")
    monkeypatch.setenv("LOOPSTREAM_TOPIC_PREFIX", "staging")
    settings = Settings()
    assert settings.pg_port == 6543
    assert settings.s3_endpoint == "s3.example.com:443"
    assert settings.topic("events") == "staging.events"


def test_relative_data_dir_is_taken_from_the_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPSTREAM_DATA_DIR", "elsewhere/data")
    assert Settings().data_dir == REPO_ROOT / "elsewhere" / "data"


def test_secret_key_is_not_printed() -> None:
    assert "loopstream-secret" not in repr(Settings())


def test_bad_port_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPSTREAM_PG_PORT", "not-a-port")
    with pytest.raises(ValueError, match="pg_port"):
        Settings()


def test_cache_dir_is_outside_the_clone() -> None:
    assert not Settings().cache_dir.is_relative_to(REPO_ROOT)
    assert Settings().cache_dir.is_relative_to(Path.home())
