"""The local default key: an admin key of the `default` workspace, kept in a 0600 file.

`loopstream services up` and the tests' `services` fixture call `ensure_default_key` once the
command processor and projections run: it reuses the key in `<data_dir>/api-key` while that key
still authenticates, and otherwise issues a new one (CreateApiKey straight to Kafka, as an
operator tool may) and waits until its row is projected. The SDK, the CLI and the examples find
it with `default_api_key` when no key is given (`LOOPSTREAM_API_KEY` first).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from api.auth import new_key, parse_key, verify
from api.config import ApiSettings, get_api_settings
from api.queries import ReadModels
from commands.access import CreateApiKey, aggregate_id_of
from commands.bus import CommandBus
from commands.envelope import DEFAULT_WORKSPACE, CommandEnvelope
from events.ids import new_event_id
from infra.settings import Settings
from projections.db import get_engine

KEY_FILE = "api-key"
ENV_VAR = "LOOPSTREAM_API_KEY"


def key_file(settings: Settings) -> Path:
    return settings.data_dir / KEY_FILE


def default_api_key(settings: Settings) -> str | None:
    """`LOOPSTREAM_API_KEY`, else the default key file, else None."""
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        return from_env
    try:
        return key_file(settings).read_text().strip() or None
    except OSError:
        return None


def key_row_authenticates(
    settings: Settings, key: str, api_settings: ApiSettings | None = None
) -> bool:
    """Whether `key` would authenticate now (same check as `api.auth.authenticate`)."""
    api_settings = api_settings or get_api_settings()
    parsed = parse_key(key)
    if parsed is None:
        return False
    key_id, secret = parsed
    with get_engine(settings).connect() as conn:
        row = ReadModels(conn, settings.read_schema).api_key(key_id)
    return (
        row is not None
        and row["revoked_at"] is None
        and verify(secret, row["key_hash"], hash_key=api_settings.api_key_hash_secret)
    )


def issue_key(
    settings: Settings,
    *,
    workspace_id: str = DEFAULT_WORKSPACE,
    scopes: tuple[str, ...] = ("admin",),
    name: str | None = None,
    actor: str = "operator",
    api_settings: ApiSettings | None = None,
    wait_s: float = 60.0,
) -> str:
    """Issue a key straight through Kafka and wait until it authenticates; returns the key.
    Raises TimeoutError when it is not projected in time, RuntimeError when refused."""
    api_settings = api_settings or get_api_settings()
    issued = new_key(hash_key=api_settings.api_key_hash_secret)
    command = CreateApiKey(
        key_id=issued.key_id,
        name=name,
        scopes=scopes,  # type: ignore[arg-type]  # validated by the model
        prefix=issued.prefix,
        key_hash=issued.key_hash,
    )
    envelope = CommandEnvelope(
        command_id=f"issue-key:{new_event_id()}",
        type="CreateApiKey",
        aggregate_id=aggregate_id_of(workspace_id),
        actor=actor,
        workspace_id=workspace_id,
        payload=command.model_dump(mode="json"),
    )
    send_and_wait(settings, envelope, wait_s=wait_s)
    deadline = time.monotonic() + wait_s
    while not key_row_authenticates(settings, issued.key, api_settings):
        if time.monotonic() > deadline:
            raise TimeoutError(f"key {issued.key_id} not projected within {wait_s:.0f} s")
        time.sleep(0.1)
    return issued.key


def send_and_wait(settings: Settings, envelope: CommandEnvelope, *, wait_s: float = 60.0) -> None:
    """Send a command and wait for its result; RuntimeError naming the reason if refused."""
    CommandBus(settings).send(envelope, to="commands")
    deadline = time.monotonic() + wait_s
    with get_engine(settings).connect() as conn:
        reads = ReadModels(conn, settings.read_schema)
        while True:
            result = reads.command_result(envelope.command_id, workspace=envelope.workspace_id)
            if result is not None:
                if result.status != "accepted":
                    raise RuntimeError(f"{envelope.type} refused: {result.reason}")
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{envelope.type} not answered within {wait_s:.0f} s")
            conn.rollback()  # a fresh snapshot for the next look
            time.sleep(0.1)


def ensure_default_key(settings: Settings, api_settings: ApiSettings | None = None) -> str:
    """The default workspace's admin key from its file, issued anew when missing or dead."""
    path = key_file(settings)
    existing = default_key_in_file(path)
    if existing and key_row_authenticates(settings, existing, api_settings):
        return existing
    key = issue_key(
        settings, name="default admin key", actor="bootstrap", api_settings=api_settings
    )
    write_key_file(path, key)
    return key


def default_key_in_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def write_key_file(path: Path, key: str) -> None:
    """Write with mode 0600 from the start (never world-readable, even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
