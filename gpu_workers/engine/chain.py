"""Opening a chain of sampler-weight folders for an engine to load (torch and vLLM alike).

Lives with the engines rather than in gpu_workers/deltas.py, which the engines import: the
chain's rules (links, digests, codecs) are there, what an engine needs to start loading is here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpu_workers.deltas import read_link
from gpu_workers.engine.model_io import weight_files
from gpu_workers.engine.types import InvalidInputError
from gpu_workers.manifest import read_manifest, verify_folder


@dataclass(frozen=True)
class ChainToLoad:
    """Sampler folders to load, in chain order and checked against their manifests: a base
    (with its weight shards) or none (the deltas continue the weights served now), then deltas."""

    base: Path | None
    base_shards: tuple[str, ...]
    base_digest: str  # "" without a base
    deltas: tuple[Path, ...]
    digest: str  # folder digest of the last folder: the weights version the chain leads to


def open_chain(folders: Sequence[str | os.PathLike[str]], *, verified: bool = False) -> ChainToLoad:
    """Check every folder against its manifest (`verified`: the caller just did, e.g.
    CheckpointStore.download hashes as it streams) and split off the base, if the chain has one."""
    paths = [Path(f) for f in folders]
    if not paths:
        raise InvalidInputError("checkpoint", "no folder to load")
    manifests = [read_manifest(p) if verified else verify_folder(p) for p in paths]
    if read_link(paths[0]).checkpoint_type != "base":
        return ChainToLoad(None, (), "", tuple(paths), manifests[-1].digest)
    shards = tuple(weight_files([f.path for f in manifests[0].files]))
    if not shards:
        raise InvalidInputError("checkpoint", f"{paths[0]} holds no model*.safetensors weights")
    return ChainToLoad(paths[0], shards, manifests[0].digest, tuple(paths[1:]),
                       manifests[-1].digest)  # fmt: skip
