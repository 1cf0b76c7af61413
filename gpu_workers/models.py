"""Which Hugging Face folder serves a base model name.

No model hub is reachable, so the default base model is the project's own tiny random-init
Llama, generated once into the model root; any other name is a folder under the model root
(`<model_root>/<name>` or `<model_root>/<org>/<name>` holding a `config.json`), loaded by the very
same code. `add_base_model` (`loopstream models add PATH`) puts a local Hugging Face folder
there: copied, with a `manifest.json` written last (as the tiny model's), or linked.

Nothing here imports torch: the API checks names with `require_base_model` at session creation.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from commands.model_names import outside_model_root
from infra.settings import Settings

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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


def require_base_model(settings: Settings, base_model: str) -> None:
    """Raise UnknownBaseModel (naming the available ones) unless `base_model` is served. Looks
    only: the tiny model, made on first use, counts as there."""
    problem = outside_model_root(base_model)
    if problem is not None:
        raise UnknownBaseModel(f"base model {base_model!r} {problem}")
    if base_model == settings.tiny_model_name:
        return
    if not (settings.model_root / base_model / "config.json").exists():
        raise UnknownBaseModel(
            f"base model {base_model!r} is not available; available: "
            f"{', '.join(available_base_models(settings))} (add a local Hugging Face folder with "
            f"`loopstream models add PATH --name {base_model}`, or put it at "
            f"{settings.model_root}/{base_model})"
        )


def resolve_base_model(settings: Settings, base_model: str) -> Path:
    require_base_model(settings, base_model)
    folder = settings.model_root / base_model
    if base_model == settings.tiny_model_name:
        if (folder / "manifest.json").is_file():  # made already (the manifest is written last)
            return folder
        # Making it needs torch and transformers: imported only then, so that the API and the
        # other processes that only look models up start without them (~10 s of CPU each).
        from gpu_workers.tiny_model import ensure_tiny_model

        return ensure_tiny_model(folder, seed=0)
    return folder


def check_model_folder(source: Path) -> list[str]:
    """What a Hugging Face causal-LM folder lacks for loopstream to load it (empty: nothing)."""
    missing = []
    if not (source / "config.json").is_file():
        missing.append("config.json")
    if not any(next(source.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return missing


def add_base_model(
    settings: Settings, source: Path, *, name: str | None = None, link: bool = False
) -> Path:
    """Serve the Hugging Face folder `source` as base model `name` (default: the folder's name).

    Copied (symlinks followed, `.git`/`.cache` left out) beside its final place, given a
    manifest, and renamed in, so a worker never sees half a model; with `link`, a symlink to
    `source` instead (no copy; the workers hash it when they load it). Raises ValueError when the
    name is taken or not a plain name, or the folder is not a loadable model."""
    from gpu_workers.manifest import write_manifest

    source = source.expanduser().resolve()
    if not source.is_dir():
        raise ValueError(f"{source} is not a folder")
    missing = check_model_folder(source)
    if missing:
        raise ValueError(f"{source} is not a Hugging Face model folder: no {'; no '.join(missing)}")
    name = name or source.name
    problem = outside_model_root(name)
    if problem is not None:
        raise ValueError(f"model name {name!r} {problem}")
    target = settings.model_root / name
    if name == settings.tiny_model_name or target.exists() or target.is_symlink():
        raise ValueError(f"base model {name!r} exists already ({target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        target.symlink_to(source, target_is_directory=True)
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        copied = staging / "model"
        shutil.copytree(source, copied, ignore=shutil.ignore_patterns(".git", ".cache"))
        write_manifest(copied, kind="base_model", metadata={"source": str(source)})
        copied.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
