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


def resolve_base_model(settings: Settings, base_model: str) -> Path:
    if base_model == settings.tiny_model_name:
        return ensure_tiny_model(settings.model_root / base_model, seed=0)
    folder = settings.model_root / base_model
    if (folder / "config.json").exists():
        return folder
    raise UnknownBaseModel(
        f"base model {base_model!r} is not available: put its Hugging Face folder at {folder}, "
        f"or use {settings.tiny_model_name!r}"
    )
