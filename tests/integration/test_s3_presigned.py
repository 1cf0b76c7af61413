"""The S3 store is real: objects round-trip, presigned URLs work and tampering is refused."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import httpx
import pytest
from minio import Minio
from minio.error import S3Error

from infra.s3 import ObjectStore
from infra.settings import Settings


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    return store


def test_object_fetched_back_through_presigned_url(store: ObjectStore) -> None:
    key = f"tests/{uuid.uuid4().hex}/model.safetensors"
    payload = b"\x00weights\xff" * 1000
    store.put_bytes(key, payload)

    response = httpx.get(store.presigned_get_url(key))

    assert response.status_code == 200
    assert response.content == payload
    assert store.get_bytes(key) == payload


def test_tampered_presigned_signature_is_refused(store: ObjectStore) -> None:
    key = f"tests/{uuid.uuid4().hex}/a.bin"
    store.put_bytes(key, b"secret")
    url = store.presigned_get_url(key)
    last = url[-1]
    tampered = url[:-1] + ("0" if last != "0" else "1")

    response = httpx.get(tampered)

    assert response.status_code == 403
    assert "SignatureDoesNotMatch" in response.text


def test_presigned_url_for_one_key_does_not_open_another(store: ObjectStore) -> None:
    prefix = f"tests/{uuid.uuid4().hex}"
    store.put_bytes(f"{prefix}/public.bin", b"ok")
    store.put_bytes(f"{prefix}/private.bin", b"not for you")
    url = store.presigned_get_url(f"{prefix}/public.bin")

    response = httpx.get(url.replace("public.bin", "private.bin"))

    assert response.status_code == 403


def test_expired_presigned_url_is_refused(store: ObjectStore) -> None:
    key = f"tests/{uuid.uuid4().hex}/a.bin"
    store.put_bytes(key, b"soon gone")
    url = store.presigned_get_url(key, expires=timedelta(seconds=1))
    time.sleep(2.5)

    assert httpx.get(url).status_code == 403


def test_wrong_secret_key_is_refused(settings: Settings) -> None:
    client = Minio(
        settings.s3_endpoint, access_key=settings.s3_access_key, secret_key="wrong", secure=False
    )
    with pytest.raises(S3Error):
        client.list_buckets()
