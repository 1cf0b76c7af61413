"""Only the S3 gateway of the local S3 store answers: weed's filer, master, volume and gRPC ports
refuse anyone without the per-stack keys (issue 10, finding 8), while signed S3 still works.

Runs its own SeaweedFS on its own data dir and ports, so the shared stack is not touched.
"""

from __future__ import annotations

import socket
import ssl
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.processes import wait_until
from infra.s3 import ObjectStore
from infra.settings import Settings
from infra.stack.s3 import S3Server

BASE_PORT = 29500
PAYLOAD = b"\x00checkpoint-bytes\xff" * 64


@pytest.fixture(scope="module")
def own_s3(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    other = settings.model_copy(
        update={
            "data_dir": tmp_path_factory.mktemp("s3-lockdown"),
            "s3_endpoint": f"127.0.0.1:{BASE_PORT}",
            "seaweed_master_port": BASE_PORT + 33,
            "seaweed_volume_port": BASE_PORT + 40,
            "seaweed_filer_port": BASE_PORT + 88,
            "seaweed_admin_port": BASE_PORT + 46,
        }
    )
    server = S3Server(other)
    server.prepare()
    server.start()
    try:
        wait_until(server.ready, timeout_s=120, what="the second S3 store", alive=_alive(server))
        yield server
    finally:
        server.process.stop()


def _alive(server: S3Server):  # type: ignore[no-untyped-def]
    return lambda: server.process.pid() is not None


@pytest.fixture(scope="module")
def stored(own_s3: S3Server) -> tuple[ObjectStore, str]:
    store = ObjectStore.from_settings(own_s3.settings)
    key = f"checkpoints/{uuid.uuid4().hex}/model.safetensors"
    store.put_bytes(key, PAYLOAD)
    return store, key


def _url(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}"


def _refused(response: httpx.Response) -> bool:
    return response.status_code >= 400 and PAYLOAD not in response.content


def _stored_file_id(data_dir: Path) -> str:
    """The volume file id (`<volume>,<needle key><cookie>`) of a blob weed stored.

    Read from the volume's own files, as someone with the right file id would know it: the
    index gives the needle key, the data file the cookie just before it (8-byte aligned needles:
    cookie u32, key u64, size u32).
    """
    idx = sorted(data_dir.glob("*.idx"))[0]
    volume_id = idx.stem.rsplit("_", 1)[-1]
    needle_key = idx.read_bytes()[:8]
    data = idx.with_suffix(".dat").read_bytes()
    at = next(i for i in range(4, len(data), 8) if data[i : i + 8] == needle_key)
    cookie = data[at - 4 : at].hex()
    return f"{volume_id},{int.from_bytes(needle_key, 'big'):x}{cookie}"


def test_signed_s3_and_presigned_urls_still_work(stored: tuple[ObjectStore, str]) -> None:
    store, key = stored

    assert store.get_bytes(key) == PAYLOAD
    assert httpx.get(store.presigned_get_url(key)).content == PAYLOAD


def test_filer_http_refuses_reads_writes_and_deletes(
    own_s3: S3Server, stored: tuple[ObjectStore, str]
) -> None:
    store, key = stored
    filer = own_s3.settings.seaweed_filer_port
    path = f"/buckets/{own_s3.settings.checkpoint_bucket}/{key}"
    planted = f"/buckets/{own_s3.settings.checkpoint_bucket}/planted.bin"

    assert _refused(httpx.get(_url(filer, path)))
    assert _refused(httpx.get(_url(filer, f"/buckets/{own_s3.settings.checkpoint_bucket}/")))
    assert _refused(httpx.put(_url(filer, planted), content=PAYLOAD))
    assert _refused(httpx.post(_url(filer, "/buckets/"), files={"file": ("x.bin", PAYLOAD)}))
    assert _refused(httpx.delete(_url(filer, path)))

    assert store.get_bytes(key) == PAYLOAD
    assert not store.exists("planted.bin")


def test_master_http_refuses_assign_lookup_and_collection_delete(
    own_s3: S3Server, stored: tuple[ObjectStore, str]
) -> None:
    store, key = stored
    master = own_s3.settings.seaweed_master_port
    bucket = own_s3.settings.checkpoint_bucket

    for path in ("/dir/assign", "/dir/lookup?volumeId=1", "/dir/status", "/vol/grow?count=1"):
        assert _refused(httpx.get(_url(master, path))), path
    assert _refused(httpx.get(_url(master, f"/col/delete?collection={bucket}")))

    assert store.get_bytes(key) == PAYLOAD


def test_volume_http_needs_a_token_for_a_real_blob(
    own_s3: S3Server, stored: tuple[ObjectStore, str]
) -> None:
    store, key = stored
    volume = own_s3.settings.seaweed_volume_port
    file_id = _stored_file_id(own_s3.home / "data")

    for method in ("GET", "DELETE"):
        response = httpx.request(method, _url(volume, f"/{file_id}"))
        assert response.status_code == 401 and PAYLOAD not in response.content, method
    assert _refused(httpx.post(_url(volume, f"/{file_id}"), files={"file": ("x", b"evil")}))

    assert store.get_bytes(key) == PAYLOAD


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("offset", [0, 33, 40, 88, 46])
def test_grpc_ports_need_the_stack_client_certificate(own_s3: S3Server, offset: int) -> None:
    port = BASE_PORT + offset + 10000
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
    # weed mini starts its admin component last: give a port a moment to listen. One that never
    # does is not reachable at all, which is locked down too.
    deadline = time.monotonic() + 20
    while not _listening(port):
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)
    # Plaintext gRPC (HTTP/2) gets no answer.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(preface)
        assert plain.recv(64) == b""
    # TLS without a client certificate is refused in the handshake.
    context = ssl.create_default_context(cafile=str(own_s3.home / "tls" / "ca.crt"))
    context.check_hostname = False
    with (
        pytest.raises(ssl.SSLError),
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(preface)
        tls.recv(64)


def test_keys_are_private_to_the_stack(own_s3: S3Server) -> None:
    for secret in ("security.toml", "s3-identities.json", "tls/node.key"):
        mode = stat.S_IMODE((own_s3.home / secret).stat().st_mode)
        assert mode == 0o600, secret
    # The CA's key was thrown away once it signed the one certificate.
    assert not (own_s3.home / "tls" / "ca.key").exists()
