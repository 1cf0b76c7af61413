"""Checkpoint folders in and out of the store: each file hashed once, as its bytes stream past.

The store here is an in-memory stand-in for the few S3 calls the checkpoint store makes; the same
behaviour on the real S3 of the local stack is in tests/integration/test_checkpoint_store.py.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from minio.error import S3Error

import gpu_workers.manifest as manifest_module
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore, _HashingReader
from gpu_workers.manifest import (
    ChecksumMismatchError,
    build_manifest,
    sha256_file,
    verify_folder,
    write_manifest,
)
from infra.s3 import ObjectStore


class _Response:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, amt: int) -> Iterator[bytes]:
        for i in range(0, len(self.data), amt):
            yield self.data[i : i + amt]

    def read(self) -> bytes:
        return self.data

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class InMemoryS3:
    """put_object / get_object / stat_object of one bucket, in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_object(self, bucket: str, key: str, data: BinaryIO, length: int, **_: object) -> None:
        chunks = []
        while length > 0:  # in parts, as the S3 client reads a big file
            chunk = data.read(min(length, 1 << 16))
            if not chunk:
                raise OSError(f"stream ended {length} bytes short")
            chunks.append(chunk)
            length -= len(chunk)
        self.objects[key] = b"".join(chunks)

    def get_object(self, bucket: str, key: str) -> _Response:
        if key not in self.objects:
            raise S3Error(None, "NoSuchKey", "not found", key, "", "")  # type: ignore[arg-type]
        return _Response(self.objects[key])

    def stat_object(self, bucket: str, key: str) -> None:
        self.get_object(bucket, key)


@pytest.fixture
def s3() -> InMemoryS3:
    return InMemoryS3()


@pytest.fixture
def checkpoints(s3: InMemoryS3) -> CheckpointStore:
    return CheckpointStore(ObjectStore(s3, "bucket"))  # type: ignore[arg-type]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(300_000))  # several parts
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "sub" / "tokenizer.json").write_text("{}")
    write_manifest(folder, kind="sampler_weights")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def test_a_folder_round_trips_bit_for_bit(
    checkpoints: CheckpointStore, folder: Path, tmp_path: Path
) -> None:
    ref = CheckpointRef("run1", "sampler_weights", "base-0")

    stored = checkpoints.upload(folder, ref)
    manifest = checkpoints.download(ref, tmp_path / "back")

    assert _files(tmp_path / "back") == _files(folder)
    assert manifest.digest == stored.digest
    assert stored.uploaded_bytes == sum(len(b) for b in _files(folder).values())


def test_a_file_changed_after_its_manifest_is_refused_and_no_manifest_goes_up(
    checkpoints: CheckpointStore, s3: InMemoryS3, folder: Path
) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[123_456] ^= 0x01  # same size: only the bytes streamed up can tell
    (folder / "model.safetensors").write_bytes(bytes(data))
    ref = CheckpointRef("run1", "sampler_weights", "base-0")

    with pytest.raises(ChecksumMismatchError, match="sha256") as err:
        checkpoints.upload(folder, ref)

    assert err.value.relative_file_name == "model.safetensors"
    assert not checkpoints.exists(ref)  # without its manifest the checkpoint is absent
    assert not any(key.endswith("manifest.json") for key in s3.objects)


def test_a_missing_or_extra_file_is_refused_before_any_byte_goes_up(
    checkpoints: CheckpointStore, s3: InMemoryS3, folder: Path
) -> None:
    (folder / "stray.bin").write_bytes(b"x")
    with pytest.raises(ChecksumMismatchError, match="not in the manifest"):
        checkpoints.upload(folder, CheckpointRef("run1", "sampler_weights", "a"))
    (folder / "stray.bin").unlink()
    (folder / "config.json").unlink()
    with pytest.raises(ChecksumMismatchError, match="missing"):
        checkpoints.upload(folder, CheckpointRef("run1", "sampler_weights", "b"))
    assert s3.objects == {}


def test_a_tampered_object_is_refused_on_download_and_nothing_is_left(
    checkpoints: CheckpointStore, s3: InMemoryS3, folder: Path, tmp_path: Path
) -> None:
    ref = CheckpointRef("run1", "sampler_weights", "base-0")
    stored = checkpoints.upload(folder, ref)
    key = next(f.key for f in stored.files if f.relative_file_name == "sub/tokenizer.json")
    s3.objects[key] = b"[]"  # same size, other bytes

    with pytest.raises(ChecksumMismatchError, match="sha256") as err:
        checkpoints.download(ref, tmp_path / "back")

    assert err.value.relative_file_name == "sub/tokenizer.json"
    assert not (tmp_path / "back").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folder either


def test_files_hashed_by_the_writer_are_not_read_again(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights_sha256 = sha256_file(folder / "model.safetensors")
    read: list[str] = []

    def counting_sha256_file(path: Path) -> str:
        read.append(path.name)
        return sha256_file(path)

    monkeypatch.setattr(manifest_module, "sha256_file", counting_sha256_file)
    manifest = build_manifest(
        folder, kind="sampler_weights", hashed={"model.safetensors": weights_sha256}
    )

    assert sorted(read) == ["config.json", "tokenizer.json"]
    assert manifest.digest == verify_folder(folder).digest


def test_several_big_files_are_hashed_on_threads_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(4):
        (tmp_path / f"model-0000{i}.safetensors").write_bytes(os.urandom(50_000))
    one_thread = build_manifest(tmp_path, kind="base_model")
    monkeypatch.setattr(manifest_module, "PARALLEL_HASH_MIN_BYTES", 1)
    (tmp_path / "manifest.json").write_text(one_thread.to_json())

    assert build_manifest(tmp_path, kind="base_model") == one_thread
    assert verify_folder(tmp_path) == one_thread
    data = bytearray((tmp_path / "model-00002.safetensors").read_bytes())
    data[0] ^= 0x01
    (tmp_path / "model-00002.safetensors").write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError) as err:
        verify_folder(tmp_path)
    assert err.value.relative_file_name == "model-00002.safetensors"


def test_the_hashing_reader_hashes_exactly_what_was_read() -> None:
    reader = _HashingReader(io.BytesIO(b"abcdef"))
    assert reader.read(2) + reader.read(10) + reader.read(1) == b"abcdef"
    assert reader.hexdigest() == hashlib.sha256(b"abcdef").hexdigest()
    assert reader.size == 6
