"""One place for every setting loopstream reads.

Every component finds the local stack with no configuration at all; pointing it at a real Kafka
cluster, a managed PostgreSQL or an S3 endpoint is a matter of environment variables
(prefix ``LOOPSTREAM_``), never of code.
"""

from __future__ import annotations

import base64
import binascii
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent

# PostgreSQL schema names are spliced into SQL text (a schema cannot be a bound parameter), so
# every one is checked here, and only here: a plain lowercase identifier of at most 63 bytes
# (PostgreSQL's NAMEDATALEN - 1). `read_schema` is shorter still, so each name derived from it
# (`<read_schema>__shadow`, `__retired`, `_tinker`, `_secrets`) fits too.
SQL_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
READ_SCHEMA_PATTERN = r"^[a-z_][a-z0-9_]{0,39}$"

# The local stack's credentials and keys. Public (they are in this file), so the API refuses
# to listen off loopback while any is in use (api/config.py, `refuse_public_defaults`).
DEV_PG_PASSWORD = "loopstream"
DEV_S3_ACCESS_KEY = "loopstream"
DEV_S3_SECRET_KEY = "loopstream-secret"
DEV_SECRETS_KEK = base64.b64encode(b"loopstream-dev-secrets-kek-32by!").decode()


def checked_identifier(name: str) -> str:
    """`name` if it is safe to splice into SQL as a schema (or table) name; else ValueError."""
    if not SQL_IDENTIFIER.match(name):
        raise ValueError(f"not a plain lowercase SQL identifier: {name!r}")
    return name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOPSTREAM_", env_file=".env", extra="ignore")

    # Where the local stack keeps its data, pids and logs. Ignored by git.
    data_dir: Path = REPO_ROOT / ".loopstream"
    # Downloads (Kafka jars) live outside the clone so a second clone does not fetch them again.
    cache_dir: Path = Path.home() / ".cache" / "loopstream"

    # --- Kafka ---------------------------------------------------------------------------
    kafka_bootstrap_servers: str = "127.0.0.1:19092"
    # Used only by the local stack: the KRaft controller listener.
    kafka_controller_port: int = 19093
    # One pinned broker version; 4.x speaks to both confluent-kafka and aiokafka >= 0.12.
    kafka_version: str = "4.1.1"
    # The broker's JVM heap; a single-node dev broker is happy with far less than 1 GiB.
    kafka_heap: str = "768m"
    # Topic names are prefixed so several environments can share one cluster.
    topic_prefix: str = "loopstream"

    # --- command processor -----------------------------------------------------------------
    # A stable id per processor instance: its transactional.id derives from it, so a restarted
    # instance fences its dead predecessor instead of leaving a transaction open.
    processor_instance_id: str = "0"
    # Commands per Kafka transaction; each transaction costs broker round trips.
    processor_batch_size: int = Field(default=500, ge=1)
    processor_batch_timeout_s: float = Field(default=0.05, gt=0)
    # Fault injection for crash tests only: sleep between producing a batch and committing it.
    processor_commit_delay_ms: int = Field(default=0, ge=0)

    # --- GPU workers -------------------------------------------------------------------------
    worker_instance_id: str = "0"
    # The base model name served by the project's own tiny random-init Llama (no hub access).
    tiny_model_name: str = "loopstream/tiny-llama"
    # Where other base models live as Hugging Face folders: <model_root>/<base_model name>.
    model_root: Path = Path.home() / ".cache" / "loopstream" / "models"
    torch_device: str = "cpu"
    # The sampler's engine: plain torch (any host), or vLLM (a CUDA host with the `gpu` extra).
    sampler_engine: Literal["torch", "vllm"] = "torch"
    # vLLM engine only (docs/vllm.md). The fraction of the whole GPU each engine reserves for
    # weights and KV cache: one engine per hosted sampler, so a worker hosting k samplers on one
    # GPU needs k x this below about 0.9 (vLLM refuses to start an engine that does not fit).
    vllm_gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    # The dtype vLLM serves: "checkpoint" = the checkpoint's own (config.json), the precision the
    # trainer's logprobs have; "auto" = vLLM's choice (an fp32 checkpoint served as bf16).
    vllm_dtype: Literal["checkpoint", "auto", "float32", "bfloat16", "float16"] = "checkpoint"
    # A training step runs inside the worker's Kafka transaction: allow long steps.
    worker_transaction_timeout_ms: int = Field(default=300_000, ge=10_000)
    # The PostgreSQL schema of the Loops read models (projections/, docs/projections.md).
    # A plain lowercase identifier (READ_SCHEMA_PATTERN): it is spliced into SQL.
    read_schema: str = Field(default="loops", pattern=READ_SCHEMA_PATTERN)
    # A Tinker session (SDK ServiceClient) that sends no heartbeat for this long is ended by
    # the janitor: its runs stop and their engines are released. The SDK beats every 10 s.
    tinker_session_timeout_s: float = Field(default=600.0, gt=0)

    # --- serving: Ray replicas and the gateway (docs/serving.md) -----------------------------
    # The Ray cluster replicas run on. Empty: the local stack's own head (`stack up` starts it at
    # 127.0.0.1:ray_port); otherwise the address of an existing cluster ("host:6379").
    ray_address: str = ""
    ray_port: int = 16379
    # The token of a cluster with token authentication; unset: the local head's own (data dir).
    ray_auth_token_path: Path | None = None
    # Whether `stack up` starts the local Ray head (isolated test stacks that serve nothing
    # leave it off).
    ray_local_head: bool = True
    # Replicas of each CPU-only instance type the local head offers. A replica asks Ray for one
    # unit of the custom resource `loopstream/<instance type>` (and the type's GPUs), so placement
    # is Ray's: on a cluster, each node is started with the units it has, and a type no node
    # offers stays pending (the gateway answers 503 after its wait).
    ray_local_slots_per_instance_type: int = Field(default=4, ge=0, le=64)
    # Ray namespace of the replica actors; the topic prefix keeps isolated copies apart.
    ray_namespace: str = ""
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 18100
    # How long a request to a deployment with no ready replica is parked before a 503.
    gateway_cold_start_wait_s: float = Field(default=120.0, gt=0, le=3600)
    # Async predict (api/gateway/async_requests.py, docs/async.md): requests each gateway's
    # worker runs at once (each still waits for a replica slot behind sync requests), webhook
    # attempts in all (first + retries), the wait before the first retry (doubled each time),
    # and one attempt's HTTP timeout.
    gateway_async_concurrency: int = Field(default=8, ge=1, le=256)
    gateway_webhook_attempts: int = Field(default=3, ge=1, le=20)
    gateway_webhook_backoff_s: float = Field(default=1.0, ge=0, le=600)
    gateway_webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # A deployment with min_replica 0 keeps its last replica this long after its last request
    # (the seed's scale_down_delay default, 900 s).
    replica_idle_scale_down_s: float = Field(default=900.0, ge=0)
    # A replica that does not answer a health ping for this long is replaced.
    replica_ping_timeout_s: float = Field(default=10.0, gt=0)

    # --- PostgreSQL ----------------------------------------------------------------------
    pg_host: str = "127.0.0.1"
    pg_port: int = 15432
    pg_user: str = "loopstream"
    pg_password: str = Field(default=DEV_PG_PASSWORD, repr=False)
    pg_database: str = "loopstream"

    # --- S3 (any S3/MinIO endpoint; the local stack runs SeaweedFS) ---------------------------
    s3_endpoint: str = "127.0.0.1:19000"
    s3_access_key: str = DEV_S3_ACCESS_KEY
    s3_secret_key: str = Field(default=DEV_S3_SECRET_KEY, repr=False)
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    checkpoint_bucket: str = "loopstream-checkpoints"
    # Internal SeaweedFS ports of the local stack (master, volume, filer, admin).
    seaweed_master_port: int = 19333
    seaweed_volume_port: int = 19340
    seaweed_filer_port: int = 18888
    seaweed_admin_port: int = 19646

    # --- secrets store (infra/secret_store.py) ---------------------------------------------
    # Key-encryption key of secret values at rest: base64 of 32 random bytes (AES-256-GCM).
    # Also the HMAC key of the digests events carry. Changing it makes stored values unreadable.
    secrets_kek: str = Field(default=DEV_SECRETS_KEK, repr=False)

    @model_validator(mode="after")
    def _absolute_paths(self) -> Settings:
        # Relative paths from the environment are taken relative to the repo, not to whatever
        # directory a process happened to start in.
        if not self.data_dir.is_absolute():
            self.data_dir = (REPO_ROOT / self.data_dir).resolve()
        if not self.cache_dir.is_absolute():
            self.cache_dir = (REPO_ROOT / self.cache_dir).resolve()
        return self

    @model_validator(mode="after")
    def _kek_is_32_bytes(self) -> Settings:
        self.secrets_kek_bytes  # noqa: B018  # raises a ValueError naming the setting
        return self

    @property
    def secrets_kek_bytes(self) -> bytes:
        try:
            key = base64.b64decode(self.secrets_kek, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise ValueError("secrets_kek: must be the base64 of 32 bytes (AES-256)")
        return key

    @property
    def pg_dsn(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver)."""
        return (
            f"postgresql+psycopg://{self.pg_user}:{self.pg_password}"
            f"@{self.pg_host}:{self.pg_port}/{self.pg_database}"
        )

    @property
    def pg_conninfo(self) -> str:
        """libpq connection string, for raw psycopg."""
        return (
            f"host={self.pg_host} port={self.pg_port} user={self.pg_user} "
            f"password={self.pg_password} dbname={self.pg_database}"
        )

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"

    @property
    def ray_cluster_address(self) -> str:
        return self.ray_address or f"127.0.0.1:{self.ray_port}"

    @property
    def replica_namespace(self) -> str:
        return self.ray_namespace or self.topic_prefix


@lru_cache
def get_settings() -> Settings:
    return Settings()
