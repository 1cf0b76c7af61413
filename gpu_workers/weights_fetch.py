"""Fetching the folders a checkpoint's weights need, for whatever serves them (the paired
sampler's worker and deployment replicas): one implementation of walking a delta chain.

A delta's parents are fetched back to the weights served now (or to the chain's base); every
file is verified against its manifest by the download, and every parent link by its digest.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from gpu_workers.deltas import DeltaChainError, read_link
from gpu_workers.failures import with_retries

# A server more than this many deltas behind reloads from the chain's base instead of walking on.
MAX_CHAIN_FETCH = 1000


@dataclass
class FetchedChain:
    folders: list[Path]  # in the order to apply: a base first, or the first missing delta
    target_type: str  # "base" or "delta": the checkpoint asked for
    bytes_moved: int
    fetch_ms: float


def fetch_chain(
    checkpoints: CheckpointStore, uri: str, into: Path, *, serving_digest: str | None
) -> FetchedChain:
    """Download `uri` and the parents it needs into folders under `into`.

    Stops at a base, or at the delta whose parent is `serving_digest` (the weights loaded now).
    Raises DeltaChainError for a broken chain, and the store's errors (retried first)."""
    t0 = time.perf_counter()
    chain: list[Path] = []  # target first, then its parents
    bytes_moved = 0
    next_uri, expected_digest = uri, None
    while True:
        folder = into / f"link-{len(chain)}"
        ref = CheckpointRef.from_uri(next_uri)
        download = functools.partial(checkpoints.download, ref, folder)
        manifest = with_retries(f"download {next_uri}", download)
        bytes_moved += manifest.total_bytes
        if expected_digest is not None and manifest.digest != expected_digest:
            raise DeltaChainError(
                f"{next_uri}: digest {manifest.digest} != the {expected_digest} its "
                "child names as parent"
            )
        chain.append(folder)
        link = read_link(folder)
        if link.checkpoint_type == "base" or link.parent_digest == serving_digest:
            break
        if link.parent_uri is None or len(chain) >= MAX_CHAIN_FETCH:
            raise DeltaChainError(f"{next_uri}: no reachable base for this delta")
        next_uri, expected_digest = link.parent_uri, link.parent_digest
    return FetchedChain(
        folders=chain[::-1],
        target_type=read_link(chain[0]).checkpoint_type,
        bytes_moved=bytes_moved,
        fetch_ms=(time.perf_counter() - t0) * 1000,
    )
