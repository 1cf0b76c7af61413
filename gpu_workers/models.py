"""Which Hugging Face folder serves a base model name.

No model hub is reachable, so the default base model is the project's own tiny random-init
Llama, generated once into the model root; any other name is a folder under the model root,
loaded by the very same code.
"""

from __future__ import annotations

from pathlib import Path

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


def outside_model_root(base_model: str) -> str | None:
    """Why `base_model` names no folder under the model root, or None when it may.

    A base model is a name, not a path: `Path(root) / "/x"` is `/x`, and `a/../../x` climbs out
    of the root, so an absolute name, a `..` part, a backslash or an empty part is refused
    before any file is looked at."""
    if base_model.startswith("/") or Path(base_model).is_absolute():
        return "is an absolute path; give a name relative to the model root"
    parts = base_model.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\\" in base_model:
        return "must be a plain name like <org>/<name> (no '.', '..', '\\' or empty parts)"
    return None


def resolve_base_model(settings: Settings, base_model: str) -> Path:
    problem = outside_model_root(base_model)
    if problem is not None:
        raise UnknownBaseModel(f"base model {base_model!r} {problem}")
    folder = settings.model_root / base_model
    if base_model == settings.tiny_model_name:
        if (folder / "manifest.json").is_file():  # made already (the manifest is written last)
            return folder
        # Making it needs torch and transformers: imported only then, so that the API and the
        # other processes that only look models up start without them (~10 s of CPU each).
        from gpu_workers.tiny_model import ensure_tiny_model

        return ensure_tiny_model(folder, seed=0)
    if (folder / "config.json").exists():
        return folder
    raise UnknownBaseModel(
        f"base model {base_model!r} is not available; available: "
        f"{available_base_models(settings)} (add one by putting its Hugging Face folder at "
        f"{settings.model_root}/<name>)"
    )
