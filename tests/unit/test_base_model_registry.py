"""`loopstream models add|list` and the check at session creation (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpu_workers.manifest import verify_folder
from gpu_workers.models import (
    UnknownBaseModel,
    add_base_model,
    available_base_models,
    require_base_model,
)
from infra.settings import Settings


def _settings(tmp_path: Path) -> Settings:
    return Settings(model_root=tmp_path / "models")


def _hf_folder(path: Path, *, weights: bool = True, tokenizer: bool = True) -> Path:
    """What a Hugging Face download of a causal LM holds (contents are not read here)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 64)
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    (path / ".cache").mkdir()
    (path / ".cache" / "junk").write_text("left out")
    return path


def test_an_unknown_model_is_refused_naming_the_available_ones_and_how_to_add_one(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    with pytest.raises(UnknownBaseModel) as refused:
        require_base_model(settings, "acme/missing")
    message = str(refused.value)
    assert "base model 'acme/missing' is not available" in message
    assert settings.tiny_model_name in message
    assert "loopstream models add PATH --name acme/missing" in message
    require_base_model(settings, settings.tiny_model_name)  # made on first use: counts as there


def test_an_added_folder_is_copied_with_a_manifest_and_served_under_its_name(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    source = _hf_folder(tmp_path / "downloads" / "Llama-3.2-1B")
    target = add_base_model(settings, source, name="meta-llama/Llama-3.2-1B")

    assert target == settings.model_root / "meta-llama" / "Llama-3.2-1B"
    assert not (target / ".cache").exists()
    manifest = verify_folder(target)  # every file is vouched for
    assert {f.path for f in manifest.files} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    require_base_model(settings, "meta-llama/Llama-3.2-1B")
    assert "meta-llama/Llama-3.2-1B" in available_base_models(settings)
    # The default name is the folder's; a second add under a taken name is refused.
    assert add_base_model(settings, source).name == "Llama-3.2-1B"
    with pytest.raises(ValueError, match="exists already"):
        add_base_model(settings, source, name="meta-llama/Llama-3.2-1B")


def test_a_linked_folder_is_served_in_place(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    source = _hf_folder(tmp_path / "big-model")
    target = add_base_model(settings, source, name="org/big", link=True)
    assert target.is_symlink() and target.resolve() == source
    assert "org/big" in available_base_models(settings)


@pytest.mark.parametrize(
    ("folder", "name", "why"),
    [
        ({"weights": False}, None, "no weights"),
        ({"tokenizer": False}, None, "no a tokenizer"),
        ({}, "../outside", "plain name"),
        ({}, "loopstream/tiny-llama", "exists already"),
    ],
)
def test_what_is_not_a_loadable_model_or_a_plain_new_name_is_refused(
    tmp_path: Path, folder: dict, name: str | None, why: str
) -> None:
    settings = _settings(tmp_path)
    source = _hf_folder(tmp_path / "src", **folder)
    with pytest.raises(ValueError, match=why):
        add_base_model(settings, source, name=name)
    assert not any(settings.model_root.glob("*/config.json"))


def test_models_add_and_list_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.cli import app
    from infra.settings import get_settings

    monkeypatch.setenv("LOOPSTREAM_MODEL_ROOT", str(tmp_path / "models"))
    get_settings.cache_clear()
    try:
        source = _hf_folder(tmp_path / "exp [v2]")
        added = CliRunner().invoke(app, ["models", "add", str(source), "--name", "org/exp"])
        assert added.exit_code == 0, added.output
        listed = CliRunner().invoke(app, ["models", "list", "-o", "json"])
        assert listed.exit_code == 0, listed.output
        names = [row["name"] for row in json.loads(listed.stdout)]
        assert names == sorted(["loopstream/tiny-llama", "org/exp"])
        refused = CliRunner().invoke(app, ["models", "add", str(tmp_path / "nothing-here")])
        assert refused.exit_code == 1 and "is not a folder" in " ".join(refused.output.split())
    finally:
        get_settings.cache_clear()
