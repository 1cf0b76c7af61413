from __future__ import annotations

import tomllib
from pathlib import Path

from infra.stack.s3 import GRPC_COMPONENTS, GrpcTls, JwtKeys, security_toml


def _config() -> dict:  # type: ignore[type-arg]
    tls = GrpcTls(ca=Path("/d/ca.crt"), cert=Path("/d/node.crt"), key=Path("/d/node.key"))
    return tomllib.loads(security_toml(JwtKeys.generate(), tls))


def test_every_http_api_of_volume_and_filer_gets_its_own_signing_key() -> None:
    config = _config()
    keys = [
        config["jwt"]["signing"]["key"],
        config["jwt"]["signing"]["read"]["key"],
        config["jwt"]["filer_signing"]["key"],
        config["jwt"]["filer_signing"]["read"]["key"],
    ]
    assert all(len(key) == 64 for key in keys)
    assert len(set(keys)) == 4


def test_every_grpc_component_serves_and_dials_with_the_stack_certificate() -> None:
    config = _config()
    assert config["grpc"]["ca"] == "/d/ca.crt"
    for component in GRPC_COMPONENTS:
        assert config["grpc"][component] == {"cert": "/d/node.crt", "key": "/d/node.key"}


def test_keys_differ_between_stacks() -> None:
    assert JwtKeys.generate() != JwtKeys.generate()
