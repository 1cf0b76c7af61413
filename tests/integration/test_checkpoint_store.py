"""Checkpoint folders round-trip through the real S3 store bit for bit, and tampering is caught."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
import torch

from gpu_workers.checkpoint_store import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointRef,
    CheckpointStore,
)
from gpu_workers.engine.sampler import SamplerEngine
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import AdamParams, Datum
from gpu_workers.manifest import ChecksumMismatchError
from gpu_workers.tiny_model import ensure_tiny_model
from infra.s3 import ObjectStore
from infra.settings import Settings

torch.set_num_threads(1)


@pytest.fixture
def checkpoints(settings: Settings) -> CheckpointStore:
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    return CheckpointStore(store, root=f"tests/{uuid.uuid4().hex}/checkpoints")


@pytest.fixture(scope="module")
def trained_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    trainer = TrainerEngine(ensure_tiny_model(root / "tiny"), max_seq_len=32)
    trainer.forward_backward([Datum.from_tokens(list(b"hello, world"))], "cross_entropy")
    trainer.optim_step(AdamParams(learning_rate=1e-2))
    trainer.save_state(root / "state")
    trainer.save_weights_for_sampler(root / "sampler")
    return root / "state", root / "sampler"


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_state_folder_round_trips_bit_for_bit(
    checkpoints: CheckpointStore, trained_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    state, _ = trained_folders
    ref = CheckpointRef(run_id="run1", kind="weights", name="step-1")

    stored = checkpoints.upload(state, ref)
    manifest = checkpoints.download(ref, tmp_path / "back")

    assert _files(tmp_path / "back") == _files(state)
    assert manifest.digest == stored.digest
    assert {f.relative_file_name for f in stored.files} == set(_files(state))


def test_every_file_fetched_through_its_presigned_url_matches(
    checkpoints: CheckpointStore, trained_folders: tuple[Path, Path]
) -> None:
    _, sampler = trained_folders
    stored = checkpoints.upload(sampler, CheckpointRef("run1", "sampler_weights", "s1"))

    for f in stored.files:
        body = httpx.get(checkpoints.store.presigned_get_url(f.key)).content
        assert body == (sampler / f.relative_file_name).read_bytes()
        assert len(body) == f.size_bytes


def test_downloaded_sampler_weights_load_into_a_running_sampler(
    checkpoints: CheckpointStore, trained_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    _, sampler_folder = trained_folders
    ref = CheckpointRef.from_uri("bt://loops:run2/sampler_weights/step-1")
    checkpoints.upload(sampler_folder, ref)
    checkpoints.download(ref, tmp_path / "dl")
    sampler = SamplerEngine(ensure_tiny_model(tmp_path / "tiny"))

    version = sampler.load_weights(tmp_path / "dl", checkpoint_id=ref.uri)

    assert version.checkpoint_id == "bt://loops:run2/sampler_weights/step-1"
    assert version.digest == checkpoints.manifest(ref).digest


def test_tampered_object_is_refused_on_download(
    checkpoints: CheckpointStore, trained_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    state, _ = trained_folders
    ref = CheckpointRef("run1", "weights", "tampered")
    stored = checkpoints.upload(state, ref)
    key = next(f.key for f in stored.files if f.relative_file_name == "dcp/__0_0.distcp")
    original = checkpoints.store.get_bytes(key)
    flipped = original[:-1] + bytes([original[-1] ^ 0xFF])  # same size, one bit pattern changed
    checkpoints.store.put_bytes(key, flipped)

    with pytest.raises(ChecksumMismatchError, match=r"dcp/__0_0\.distcp") as err:
        checkpoints.download(ref, tmp_path / "back")

    assert err.value.relative_file_name == "dcp/__0_0.distcp"
    assert not (tmp_path / "back").exists()  # nothing half-verified is left behind


def test_reupload_is_idempotent_and_a_different_folder_is_refused(
    checkpoints: CheckpointStore, trained_folders: tuple[Path, Path]
) -> None:
    state, sampler = trained_folders
    ref = CheckpointRef("run1", "weights", "same-name")
    first = checkpoints.upload(state, ref)

    again = checkpoints.upload(state, ref)

    assert again.uploaded_bytes == 0 and again.digest == first.digest
    with pytest.raises(CheckpointExistsError):
        checkpoints.upload(sampler, ref)


def test_deleted_checkpoint_is_gone(
    checkpoints: CheckpointStore, trained_folders: tuple[Path, Path], tmp_path: Path
) -> None:
    _, sampler = trained_folders
    ref = CheckpointRef("run1", "sampler_weights", "gone")
    checkpoints.upload(sampler, ref)

    removed = checkpoints.delete(ref)

    assert removed == len(list(sampler.iterdir()))
    assert not checkpoints.exists(ref)
    with pytest.raises(CheckpointNotFoundError):
        checkpoints.download(ref, tmp_path / "back")


def test_bad_uri_and_kind_are_refused() -> None:
    with pytest.raises(ValueError, match="uri"):
        CheckpointRef.from_uri("s3://bucket/x")
    with pytest.raises(ValueError, match="kind"):
        CheckpointRef("run1", "optimizer", "x")
    with pytest.raises(ValueError, match="name"):
        CheckpointRef("run1", "weights", "../escape")
