"""JSON Schemas of every command and event: the contract for external producers and consumers.

`loopstream schemas export` writes them to docs/schemas/; a unit test fails when the committed
files differ from what the code would generate, so the contract can't drift silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from commands.envelope import CommandEnvelope, CommandResult
from commands.registry import AGGREGATES
from events.catalog import CATALOG
from events.envelope import EventEnvelope
from infra.settings import REPO_ROOT

SCHEMA_DIR = REPO_ROOT / "docs" / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _with_payload(envelope_schema: dict[str, Any], name: str, version: int, payload: dict) -> dict:
    """An envelope schema whose `type`, `schema_version` and `payload` are pinned to one message."""
    schema = json.loads(json.dumps(envelope_schema))
    defs = {**schema.pop("$defs", {}), **payload.pop("$defs", {})}
    schema["title"] = f"{name} v{version}"
    schema["properties"]["type"] = {"const": name}
    schema["properties"]["schema_version"] = {"const": version}
    schema["properties"]["payload"] = payload
    if "payload" not in schema.get("required", []):
        schema.setdefault("required", []).append("payload")
    if defs:
        schema["$defs"] = defs
    return {"$schema": DIALECT, **schema}


def generate() -> dict[str, dict[str, Any]]:
    """Relative path -> schema, for every file under docs/schemas/."""
    files: dict[str, dict[str, Any]] = {}
    command_envelope = CommandEnvelope.model_json_schema()
    event_envelope = EventEnvelope.model_json_schema()
    for spec in AGGREGATES.values():
        for command in spec.commands:
            version = command.model_fields["schema_version"].default
            payload = command.model_json_schema()
            payload["properties"].pop("schema_version", None)
            name = command.__name__
            files[f"commands/{name}.v{version}.json"] = _with_payload(
                command_envelope, name, version, payload
            )
    for name, event in CATALOG.types.items():
        files[f"events/{name}.v{event.schema_version}.json"] = _with_payload(
            event_envelope, name, event.schema_version, event.model_json_schema()
        )
    files["CommandEnvelope.json"] = {"$schema": DIALECT, **command_envelope}
    files["EventEnvelope.json"] = {"$schema": DIALECT, **event_envelope}
    files["CommandResult.json"] = {"$schema": DIALECT, **CommandResult.model_json_schema()}
    return files


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export(out_dir: Path = SCHEMA_DIR) -> list[Path]:
    written = []
    for relative, schema in generate().items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(schema))
        written.append(path)
    return written
