"""What the gateway adds to a prediction: the same request on the same replica, in the same run,
through the gateway (HTTP, API key check, deployment lookup, least-outstanding routing, traffic
records, the Ray call) and as a direct Ray actor call from this process (the baseline).

The replica serves the tiny model (8 prompt tokens -> 8 new tokens, fixed seed). Blocks of
requests alternate between the two sides so drift on the machine hits both alike. With one
client the difference is the gateway's own cost; with 32 concurrent clients both sides queue
on the replica (predict_concurrency 1), so the figures show whether the gateway adds to the
queueing.

Needs the stack and services (`make demo` leaves them running).

    .venv/bin/python benchmarks/gateway_overhead.py --requests 400
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from api.bootstrap import ensure_default_key
from api.client import ServiceClient
from api.deploy_client import DeploymentsClient
from infra.ray_cluster import connect_ray
from infra.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "gateway_overhead.json"
BODY = {"prompt_tokens": [5, 6, 7, 8, 9, 10, 11, 12], "max_tokens": 8, "seed": 1}
BLOCK = 20


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="per side and concurrency")
    args = parser.parse_args()
    settings = get_settings()
    connect_ray(settings)
    import ray

    key = ensure_default_key(settings)
    url = f"http://{settings.gateway_host}:{settings.gateway_port}"
    deploys = DeploymentsClient(ServiceClient())
    model = deploys.create_model(
        base_model=settings.tiny_model_name, name="bench-gateway",
        deployment={"min_replica": 1, "max_replica": 1},
    ).result(60)  # fmt: skip
    path = f"/model/{model['model_id']}/deployment/{model['deployment_id']}/predict"
    results: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Api-Key {key}"},
                          timeout=300) as first:  # fmt: skip
            answer = first.post(path, json=BODY)  # parks until the replica is ready
            answer.raise_for_status()
            replica_id = answer.json()["replica_id"]
        handle = ray.get_actor(f"replica-{replica_id}", namespace=settings.replica_namespace)

        for clients in (1, 32):
            timings: dict[str, list[float]] = {"gateway": [], "direct": []}
            http = [httpx.Client(base_url=url, headers={"Authorization": f"Api-Key {key}"},
                                 timeout=300) for _ in range(clients)]  # fmt: skip

            def via_gateway(i: int, http: list[httpx.Client] = http) -> float:
                t0 = time.perf_counter()
                http[i].post(path, json=BODY).raise_for_status()
                return time.perf_counter() - t0

            def direct(_i: int) -> float:
                t0 = time.perf_counter()
                ray.get(handle.predict.remote(BODY))
                return time.perf_counter() - t0

            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                for call in (via_gateway, direct):
                    list(pool.map(call, range(clients)))  # warm: connections, first calls
                done = 0
                while done < args.requests:
                    for side, call in (("gateway", via_gateway), ("direct", direct)):
                        n = BLOCK * clients
                        timings[side] += list(pool.map(call, [i % clients for i in range(n)]))
                    done += BLOCK * clients
            for client in http:
                client.close()
            results[f"{clients} client{'s' if clients > 1 else ''}"] = {
                side: {
                    "n": len(samples),
                    "p50_ms": round(statistics.median(samples) * 1000, 3),
                    "p99_ms": round(percentile(samples, 0.99) * 1000, 3),
                }
                for side, samples in timings.items()
            }
    finally:
        deploys.delete(model["model_id"], model["deployment_id"])

    table = Table(title="predict: through the gateway vs a direct Ray actor call")
    for column in ("clients", "side", "n", "p50 ms", "p99 ms", "added p50 ms"):
        table.add_column(column, justify="right")
    for clients, sides in results.items():
        added = sides["gateway"]["p50_ms"] - sides["direct"]["p50_ms"]
        for side, figures in sides.items():
            table.add_row(clients, side, str(figures["n"]), f"{figures['p50_ms']:.2f}",
                          f"{figures['p99_ms']:.2f}",
                          f"{added:.2f}" if side == "gateway" else "")  # fmt: skip
    Console().print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"commit": commit, "requests": args.requests,
                                   "results": results}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
