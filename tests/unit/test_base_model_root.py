"""A base model name never reaches outside the model root (issue 11, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_workers.models import UnknownBaseModel, resolve_base_model
from infra.settings import Settings


def _settings(tmp_path: Path) -> Settings:
    return Settings(model_root=tmp_path / "models")


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_a_folder_under_the_root_is_served(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "models" / "org" / "name")
    assert resolve_base_model(_settings(tmp_path), "org/name") == folder


def test_an_absolute_path_is_refused_even_when_it_holds_a_model(tmp_path: Path) -> None:
    outside = _model_folder(tmp_path / "outside")
    with pytest.raises(UnknownBaseModel, match="absolute path"):
        resolve_base_model(_settings(tmp_path), str(outside))


@pytest.mark.parametrize("name", ["../outside", "org/../../outside", "./org/name", "org//name"])
def test_a_name_that_climbs_or_is_not_plain_is_refused(tmp_path: Path, name: str) -> None:
    _model_folder(tmp_path / "outside")
    _model_folder(tmp_path / "models" / "org" / "name")
    with pytest.raises(UnknownBaseModel, match="plain name"):
        resolve_base_model(_settings(tmp_path), name)


def test_an_unknown_name_lists_what_is_available(tmp_path: Path) -> None:
    with pytest.raises(UnknownBaseModel, match="is not available"):
        resolve_base_model(_settings(tmp_path), "org/missing")
