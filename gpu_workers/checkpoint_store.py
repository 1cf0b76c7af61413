"""Checkpoint folders in the S3 store: upload, download with sha256 verification, list, delete.

Layout: `checkpoints/<run_id>/<kind>/<name>/<relative_file_name>`, one object per file of the
folder, so a checkpoint's files can be handed out as presigned URLs one by one and a checkpoint
is deleted with one prefix delete. `manifest.json` is uploaded last: a checkpoint whose manifest
is not there is an unfinished upload, and readers treat it as absent.

Files move several at a time (small config files beside a big shard), and each is hashed as
its bytes stream past, on the way up and on the way down: a file is read once, never once to
check and again to send.

Content-addressed dedup is not done here on purpose: across the checkpoints of one run only the
small config/tokenizer files repeat (every weights file differs), and per-checkpoint prefixes
keep deletion and TTL expiry a plain prefix delete with no reference counting.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from minio.error import S3Error

from gpu_workers.manifest import (
    MANIFEST_NAME,
    ChecksumMismatchError,
    Manifest,
    ManifestFile,
    check_listing,
    map_threads,
)
from infra.s3 import ObjectStore

CHECKPOINT_KINDS = ("weights", "sampler_weights")  # the two targets of a bt://loops: URI
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_URI = re.compile(r"^bt://loops:(?P<run_id>[^/]+)/(?P<kind>[^/]+)/(?P<name>[^/]+)$")
# Files in flight at once, each way. A big file is also split into parts sent 3 at a time by
# the S3 client (put_object's default), so this mostly lets the small files go beside it.
TRANSFER_THREADS = 4
_CHUNK = 1 << 20  # 1 MiB: download chunks, written and hashed as they come


class CheckpointNotFoundError(LookupError):
    pass


class CheckpointExistsError(ValueError):
    """A different folder was already stored under this checkpoint's name (names are final)."""


@dataclass(frozen=True)
class CheckpointRef:
    run_id: str
    kind: str  # weights | sampler_weights
    name: str

    def __post_init__(self) -> None:
        for field in ("run_id", "kind", "name"):
            if not _SEGMENT.match(getattr(self, field)):
                raise ValueError(f"{field}: {getattr(self, field)!r} is not a valid path segment")
        if self.kind not in CHECKPOINT_KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {list(CHECKPOINT_KINDS)}")

    @property
    def uri(self) -> str:
        return f"bt://loops:{self.run_id}/{self.kind}/{self.name}"

    @classmethod
    def from_uri(cls, uri: str) -> CheckpointRef:
        match = _URI.match(uri)
        if not match:
            raise ValueError(
                f"uri: {uri!r} is not of the form bt://loops:<run_id>/(weights|sampler_weights)/"
                "<name>"
            )
        return cls(**match.groupdict())


@dataclass(frozen=True)
class StoredFile:
    relative_file_name: str
    key: str  # object key in the bucket
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class StoredCheckpoint:
    ref: CheckpointRef
    manifest: Manifest
    files: tuple[StoredFile, ...]  # every file of the folder, manifest.json last
    uploaded_bytes: int  # 0 when the same checkpoint was already stored

    @property
    def digest(self) -> str:
        return self.manifest.digest


class CheckpointStore:
    def __init__(self, store: ObjectStore, *, root: str = "checkpoints") -> None:
        self.store = store
        self.root = root.strip("/")

    def prefix(self, ref: CheckpointRef) -> str:
        return f"{self.root}/{ref.run_id}/{ref.kind}/{ref.name}/"

    def upload(self, folder: str | os.PathLike[str], ref: CheckpointRef) -> StoredCheckpoint:
        """Store a checkpoint folder, checked against its own manifest: every file's sha256 is
        computed from the bytes as they are sent, and the manifest (which marks the checkpoint
        complete) goes up only once every file matched. Idempotent."""
        folder = Path(folder)
        manifest = check_listing(folder)
        manifest_bytes = (folder / MANIFEST_NAME).read_bytes()
        existing = self._stored_manifest(ref)
        if existing is not None:
            if existing[0].digest != manifest.digest:
                raise CheckpointExistsError(
                    f"{ref.uri} already holds different content "
                    f"(digest {existing[0].digest[:12]} != {manifest.digest[:12]})"
                )
            return self._described(ref, *existing, uploaded_bytes=0)
        prefix = self.prefix(ref)

        def put(f: ManifestFile) -> None:
            with (folder / f.path).open("rb") as fh:
                reader = _HashingReader(fh)
                # Streams from disk (in parts, for big shards) instead of reading the whole
                # file into memory; the client only ever calls read().
                self.store.client.put_object(self.store.bucket, prefix + f.path,
                                             cast(BinaryIO, reader), f.size_bytes)  # fmt: skip
            _check(f, reader.hexdigest(), reader.size, where=str(folder))

        map_threads(put, manifest.files, threads=TRANSFER_THREADS)
        # The manifest goes last: its presence marks the upload complete.
        self.store.put_bytes(
            prefix + MANIFEST_NAME, manifest_bytes, content_type="application/json"
        )
        uploaded = manifest.total_bytes + len(manifest_bytes)
        return self._described(ref, manifest, manifest_bytes, uploaded_bytes=uploaded)

    def download(self, ref: CheckpointRef, dest: str | os.PathLike[str]) -> Manifest:
        """Fetch a checkpoint into `dest` (new or empty), checking every file's sha256 and size.

        Files land in a staging folder beside `dest` that is renamed into place only after every
        check passed: `dest` never holds a partial or corrupted checkpoint.
        """
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise FileExistsError(f"{dest} exists and is not empty")
        manifest, manifest_bytes = self._require_manifest(ref)
        prefix = self.prefix(ref)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))

        def get(f: ManifestFile) -> None:
            path = staging / f.path
            path.parent.mkdir(parents=True, exist_ok=True)
            h, size = hashlib.sha256(), 0
            response = self.store.client.get_object(self.store.bucket, prefix + f.path)
            try:
                with path.open("wb") as out:
                    for chunk in response.stream(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
            finally:
                response.close()
                response.release_conn()
            _check(f, h.hexdigest(), size, where=ref.uri)

        try:
            map_threads(get, manifest.files, threads=TRANSFER_THREADS)
            (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
            if dest.exists():
                dest.rmdir()
            staging.rename(dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def manifest(self, ref: CheckpointRef) -> Manifest:
        return self._require_manifest(ref)[0]

    def describe(self, ref: CheckpointRef) -> StoredCheckpoint:
        """The stored checkpoint's files with their keys, e.g. to presign one URL per file."""
        return self._described(ref, *self._require_manifest(ref), uploaded_bytes=0)

    def exists(self, ref: CheckpointRef) -> bool:
        return self._stored_manifest(ref) is not None

    def delete(self, ref: CheckpointRef) -> int:
        """Remove every object of the checkpoint, the manifest first so readers stop at once."""
        prefix = self.prefix(ref)
        if self.store.exists(prefix + MANIFEST_NAME):
            self.store.client.remove_object(self.store.bucket, prefix + MANIFEST_NAME)
            return 1 + self.store.delete_prefix(prefix)
        return self.store.delete_prefix(prefix)

    def _require_manifest(self, ref: CheckpointRef) -> tuple[Manifest, bytes]:
        stored = self._stored_manifest(ref)
        if stored is None:
            raise CheckpointNotFoundError(f"no checkpoint at {ref.uri}")
        return stored

    def _stored_manifest(self, ref: CheckpointRef) -> tuple[Manifest, bytes] | None:
        """The manifest and its exact bytes (kept so a download is bit for bit)."""
        try:
            raw = self.store.get_bytes(self.prefix(ref) + MANIFEST_NAME)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return None
            raise
        return Manifest.from_json(raw), raw

    def _described(
        self, ref: CheckpointRef, manifest: Manifest, manifest_bytes: bytes, *, uploaded_bytes: int
    ) -> StoredCheckpoint:
        prefix = self.prefix(ref)
        files = [
            StoredFile(f.path, prefix + f.path, f.size_bytes, f.sha256) for f in manifest.files
        ]
        files.append(
            StoredFile(
                MANIFEST_NAME,
                prefix + MANIFEST_NAME,
                len(manifest_bytes),
                hashlib.sha256(manifest_bytes).hexdigest(),
            )
        )
        return StoredCheckpoint(ref, manifest, tuple(files), uploaded_bytes)


class _HashingReader:
    """A file handed to the S3 client that hashes every byte the client reads from it."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        chunk = self._fh.read(n)
        self._sha256.update(chunk)
        self.size += len(chunk)
        return chunk

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()


def _check(f: ManifestFile, sha256: str, size: int, *, where: str) -> None:
    if size != f.size_bytes:
        raise ChecksumMismatchError(f.path, f"{where}: size {size} != manifest {f.size_bytes}")
    if sha256 != f.sha256:
        raise ChecksumMismatchError(f.path, f"{where}: sha256 {sha256} != manifest {f.sha256}")
