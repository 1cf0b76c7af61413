"""What authentication costs per request: the same route of the same app, in the same run, with
the real key check and with the check's body replaced by a fixed caller.

The route is `GET /v1/loops/sessions/{id}` on a session of the default workspace: one read-model
query scoped to the caller's workspace either way. Both sides resolve the same dependencies
(the key check's state and read-model session are the route's own); what differs is the check
itself: parse the header, the `api_keys` row (re-read every `api_key_cache_s`), HMAC and
constant-time compare, the Caller. The stand-in is swapped into `authenticate` between blocks of
requests (its code object: FastAPI holds the function, and `dependency_overrides` would make
FastAPI re-analyse every dependency on every request, slowing one side by more than the check
costs). Requests go through the ASGI app in process, alternating blocks so that drift on the
machine hits both sides alike.

Needs the stack and services (`make demo` leaves them running).

    .venv/bin/python benchmarks/auth_overhead.py --requests 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from rich.console import Console
from rich.table import Table

import api.auth
from api.app import create_app
from api.auth import Caller, authenticate
from api.bootstrap import ensure_default_key
from events.envelope import DEFAULT_WORKSPACE
from infra.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "auth_overhead.json"
BLOCK = 50  # requests per side before switching to the other


async def fixed_caller(
    state: Any, reads: Any, authorization: str | None = None, x_api_key: str | None = None
) -> Caller:
    """`authenticate`'s signature, no check: the baseline (runs with api.auth's globals)."""
    return _BENCH_CALLER  # type: ignore[name-defined]  # noqa: F821


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per side")
    args = parser.parse_args()

    settings = get_settings()
    headers = {"Authorization": f"Api-Key {ensure_default_key(settings)}"}
    api.auth._BENCH_CALLER = Caller(  # type: ignore[attr-defined]
        workspace_id=DEFAULT_WORKSPACE, key_id="bench", scopes=frozenset({"admin"})
    )
    real_code, stand_in_code = authenticate.__code__, fixed_caller.__code__

    with TestClient(create_app(settings), headers=headers) as client:
        created = client.post("/v1/loops/sessions", json={"base_model": "loopstream/tiny-llama"})
        session_id = created.json()["session_id"]
        path = f"/v1/loops/sessions/{session_id}"
        deadline = time.monotonic() + 30
        while client.get(path).status_code != 200:  # until the projection has it
            if time.monotonic() > deadline:
                raise SystemExit("the session never reached the read model: are services up?")
            time.sleep(0.05)
        for _ in range(100):  # warm: connections, first-call imports
            client.get(path)

        timings: dict[str, list[float]] = {"with key check": [], "fixed caller": []}
        try:
            while len(timings["fixed caller"]) < args.requests:
                for name, code in (("with key check", real_code), ("fixed caller", stand_in_code)):
                    authenticate.__code__ = code
                    for _ in range(BLOCK):
                        started = time.perf_counter()
                        response = client.get(path)
                        timings[name].append((time.perf_counter() - started) * 1000)
                        assert response.status_code == 200, response.text
        finally:
            authenticate.__code__ = real_code
        client.delete(path)

    figures = {
        name: {
            "p50_ms": round(statistics.median(samples), 3),
            "p99_ms": round(percentile(samples, 0.99), 3),
            "requests": len(samples),
        }
        for name, samples in timings.items()
    }
    added = {
        q: round(figures["with key check"][q] - figures["fixed caller"][q], 3)
        for q in ("p50_ms", "p99_ms")
    }
    table = Table(title=f"GET /v1/loops/sessions/{{id}}, in process, {args.requests} per side")
    for column in ("", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for name, row in figures.items():
        table.add_row(name, f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}")
    table.add_row("added by the key check", f"{added['p50_ms']:.3f}", f"{added['p99_ms']:.3f}")
    Console().print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"sides": figures, "added": added}, indent=2) + "\n")


if __name__ == "__main__":
    main()
