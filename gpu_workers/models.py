"""Which Hugging Face folder serves a base model name.

No model hub is reachable, so the default base model is the project's own tiny random-init
Llama, generated once into the model root; any other name is a folder under the model root,
loaded by the very same code.
"""

from __future__ import annotations

from pathlib import Path

from gpu_workers.tiny_model import ensure_tiny_model
from infra.settings import Settings


class UnknownBaseModel(ValueError):
    pass


def available_base_models(settings: Settings) -> list[str]:
    """Every name `resolve_base_model` serves: the tiny model, and each `<org>/<name>` or
    `<name>` folder under the model root that holds a config.json."""
    names = {settings.tiny_model_name}
    root = settings.model_root
    if root.is_dir():
        for config in [*root.glob("*/config.json"), *root.glob("*/*/config.json")]:
            names.add(str(config.parent.relative_to(root)))
    return sorted(names)


def resolve_base_model(settings: Settings, base_model: str) -> Path:
    if base_model == settings.tiny_model_name:
        return ensure_tiny_model(settings.model_root / base_model, seed=0)
    folder = settings.model_root / base_model
    if ".." not in Path(base_model).parts and (folder / "config.json").exists():
        return folder
    raise UnknownBaseModel(
        f"base model {base_model!r} is not available; available: "
        f"{available_base_models(settings)} (add one by putting its Hugging Face folder at "
        f"{settings.model_root}/<name>)"
    )
