"""Checkpoint folder manifests: sha256 and size of every file, and the folder's content digest.

Every folder a worker writes (base model, trainer state, sampler weights) carries a
`manifest.json`. Readers verify each file against it before they trust a byte, and the digest of
the file list is the folder's identity: two folders with the same digest hold the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "loopstream.checkpoint/v1"
_CHUNK = 1 << 20  # 1 MiB reads keep memory flat on multi-GB shards
# Files hashed at once when a folder holds several big shards (sha256 releases the GIL, so they
# hash on several cores); small files go quicker one after the other on the calling thread.
HASH_THREADS = 4
PARALLEL_HASH_MIN_BYTES = 8 << 20
_T = TypeVar("_T")
_R = TypeVar("_R")


class ChecksumMismatchError(ValueError):
    """A file of a checkpoint folder is missing, extra or differs from its manifest."""

    def __init__(self, relative_file_name: str, message: str) -> None:
        super().__init__(f"{relative_file_name}: {message}")
        self.relative_file_name = relative_file_name


@dataclass(frozen=True)
class ManifestFile:
    path: str  # relative to the folder, '/'-separated
    sha256: str  # hex digest of the file's bytes
    size_bytes: int


@dataclass(frozen=True)
class Manifest:
    kind: str  # base_model | state | sampler_weights
    files: tuple[ManifestFile, ...]  # sorted by path; the manifest itself is not listed
    metadata: dict[str, Any] = field(default_factory=dict)  # step, lora_rank, ... (informative)

    @property
    def digest(self) -> str:
        """sha256 over the (path, sha256, size) list: the identity of the folder's content."""
        canonical = json.dumps(
            [[f.path, f.sha256, f.size_bytes] for f in self.files], separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    def to_json(self) -> str:
        doc = {
            "format": MANIFEST_FORMAT,
            "kind": self.kind,
            "digest": self.digest,
            "files": [
                {"path": f.path, "sha256": f.sha256, "size_bytes": f.size_bytes} for f in self.files
            ],
            "metadata": self.metadata,
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            doc = json.loads(text)
            if doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {doc.get('format')!r}")
            files = tuple(
                ManifestFile(
                    path=str(f["path"]), sha256=str(f["sha256"]), size_bytes=int(f["size_bytes"])
                )
                for f in doc["files"]
            )
            manifest = cls(
                kind=str(doc["kind"]), files=files, metadata=dict(doc.get("metadata", {}))
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ChecksumMismatchError(MANIFEST_NAME, f"unreadable manifest: {exc}") from exc
        for f in files:
            _check_relative(f.path)
        if doc.get("digest") not in (None, manifest.digest):
            raise ChecksumMismatchError(MANIFEST_NAME, "digest does not match its file list")
        return manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def map_threads(fn: Callable[[_T], _R], items: Iterable[_T], *, threads: int) -> list[_R]:
    """`[fn(x) for x in items]` on up to `threads` threads, in order; the first error raises."""
    items = list(items)
    if len(items) <= 1 or threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def _hash_threads(sizes: Iterable[int]) -> int:
    return HASH_THREADS if sum(size >= PARALLEL_HASH_MIN_BYTES for size in sizes) >= 2 else 1


def build_manifest(
    folder: Path,
    *,
    kind: str,
    metadata: dict[str, Any] | None = None,
    hashed: Mapping[str, str] | None = None,
) -> Manifest:
    """The manifest of every file under `folder`. `hashed`: sha256 the caller computed from the
    very bytes it just wrote (relative path -> hex digest); those files are not read again."""
    hashed = hashed or {}
    paths = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder) != Path(MANIFEST_NAME)
    )

    def describe(path: Path) -> ManifestFile:
        rel = path.relative_to(folder).as_posix()
        digest = hashed.get(rel) or sha256_file(path)
        return ManifestFile(path=rel, sha256=digest, size_bytes=path.stat().st_size)

    threads = _hash_threads(p.stat().st_size for p in paths)
    files = map_threads(describe, paths, threads=threads)
    return Manifest(kind=kind, files=tuple(files), metadata=dict(metadata or {}))


def write_manifest(
    folder: str | Path,
    *,
    kind: str,
    metadata: dict[str, Any] | None = None,
    hashed: Mapping[str, str] | None = None,
) -> Manifest:
    """Hash every file under `folder` (but those in `hashed`) and write `manifest.json`."""
    folder = Path(folder)
    manifest = build_manifest(folder, kind=kind, metadata=metadata, hashed=hashed)
    (folder / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ChecksumMismatchError(MANIFEST_NAME, f"no manifest in {folder}")
    return Manifest.from_json(path.read_text())


def verify_folder(folder: str | Path, *, allow_extra: bool = False) -> Manifest:
    """Check every file of `folder` against its manifest; return the manifest or raise."""
    folder = Path(folder)
    manifest = check_listing(folder, allow_extra=allow_extra)

    def check(f: ManifestFile) -> None:
        digest = sha256_file(folder / f.path)
        if digest != f.sha256:
            raise ChecksumMismatchError(f.path, f"sha256 {digest} != manifest {f.sha256}")

    map_threads(check, manifest.files, threads=_hash_threads(f.size_bytes for f in manifest.files))
    return manifest


def check_listing(folder: str | Path, *, allow_extra: bool = False) -> Manifest:
    """`verify_folder` without reading the files: each one listed is there with its size, and
    (unless `allow_extra`) nothing else is. For a caller that hashes the bytes as it reads them."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for f in manifest.files:
        path = folder / f.path
        if not path.is_file():
            raise ChecksumMismatchError(f.path, "listed in the manifest but missing")
        size = path.stat().st_size
        if size != f.size_bytes:
            raise ChecksumMismatchError(f.path, f"size {size} != manifest {f.size_bytes}")
    if not allow_extra:
        listed = {f.path for f in manifest.files} | {MANIFEST_NAME}
        for path in folder.rglob("*"):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and rel not in listed:
                raise ChecksumMismatchError(rel, "present but not in the manifest")
    return manifest


def _check_relative(path: str) -> None:
    # A manifest read from the network must not steer a download outside its folder.
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ChecksumMismatchError(path, "not a plain relative path")
