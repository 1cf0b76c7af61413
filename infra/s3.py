"""The S3 adapter: every byte loopstream stores goes through here, via the `minio` SDK.

Works against the local SeaweedFS, a MinIO server or AWS S3 alike; which one is a settings
matter.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from minio import Minio
from minio.error import S3Error

from infra.settings import Settings


@dataclass(frozen=True)
class StoredObject:
    key: str
    size_bytes: int
    etag: str


class ObjectStore:
    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStore:
        client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
        return cls(client, settings.checkpoint_bucket)

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:  # a concurrent creator won the race
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        self.client.put_object(
            self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
        )

    def get_bytes(self, key: str) -> bytes:
        response = self.client.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise
        return True

    def list(self, prefix: str) -> Iterator[StoredObject]:
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            yield StoredObject(
                key=obj.object_name or "", size_bytes=obj.size or 0, etag=obj.etag or ""
            )

    def delete_prefix(self, prefix: str) -> int:
        keys = [obj.key for obj in self.list(prefix)]
        for key in keys:
            self.client.remove_object(self.bucket, key)
        return len(keys)

    def presigned_get_url(self, key: str, *, expires: timedelta = timedelta(hours=1)) -> str:
        return self.client.presigned_get_object(self.bucket, key, expires=expires)
