"""Base model names: a name under the model root, never a path out of it. Pure (no I/O), so
the API, the workers and the model aggregate apply the same rule."""

from __future__ import annotations

from pathlib import Path


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
