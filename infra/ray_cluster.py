"""Connecting to the Ray cluster replicas run on: the local stack's head, or one named by
`LOOPSTREAM_RAY_ADDRESS`. One place for the address, the namespace and the auth token, so the
replica controller, the gateway and the tests connect the same way.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from infra.settings import Settings

log = logging.getLogger("loopstream.ray")


def ray_token_path(settings: Settings) -> Path:
    """The cluster's auth token: `ray_auth_token_path`, else the local head's own."""
    return settings.ray_auth_token_path or settings.data_dir / "ray-auth-token"


def ray_auth_env(settings: Settings) -> dict[str, str]:
    """Environment that makes Ray (head, workers and drivers) use token authentication with
    this cluster's token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_path(settings))}


def connect_ray(settings: Settings) -> None:
    """ray.init against the configured cluster, in the replicas' namespace (idempotent)."""
    # Ray reads its auth settings when it is first imported: set them before (a process that
    # imported ray earlier would hang in ray.init, refused by the GCS without saying so).
    if "ray" in sys.modules and os.environ.get("RAY_AUTH_MODE") != "token":
        raise RuntimeError("connect_ray must run before the first `import ray` of the process")
    token = ray_token_path(settings)
    if not token.is_file():  # ray.init would retry against the GCS forever, saying nothing
        raise RuntimeError(
            f"no Ray auth token at {token}: start the local head with `loopstream stack up`, "
            "or set LOOPSTREAM_RAY_AUTH_TOKEN_PATH to the cluster's"
        )
    os.environ.update(ray_auth_env(settings))
    import ray

    if ray.is_initialized():
        return
    ray.init(
        address=settings.ray_cluster_address,
        namespace=settings.replica_namespace,
        logging_level=logging.WARNING,
        log_to_driver=False,
        # The local head listens on loopback; a driver would otherwise look for a raylet on
        # the host's outward address.
        _node_ip_address="127.0.0.1" if not settings.ray_address else None,
    )
    log.info("connected to ray", extra={"address": settings.ray_cluster_address,
                                        "namespace": settings.replica_namespace})  # fmt: skip
