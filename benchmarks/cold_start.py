"""Cold start: a request parked at a deployment with no replica, from its arrival to its answer,
against the raw time to load the same weights into an engine in this process (the baseline:
fetch + verify the checkpoint from S3, build the engine, load the weights).

The gap is what the platform adds: the traffic record, the controller's decision, Ray placing
and starting an actor process (torch and transformers imported there), the replica's own load,
the read model catching up, and the gateway noticing the ready replica. Runs `--rounds` times on
fresh deployments of one run's checkpoint.

Needs the stack and services (`make demo` leaves them running).

    .venv/bin/python benchmarks/cold_start.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from api.bootstrap import ensure_default_key
from api.client import ServiceClient
from api.deploy_client import DeploymentsClient
from gpu_workers.replica import Replica, ReplicaSpec, replica_settings
from infra.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "cold_start.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = get_settings()
    key = ensure_default_key(settings)
    url = f"http://{settings.gateway_host}:{settings.gateway_port}"
    service = ServiceClient()
    deploys = DeploymentsClient(service)
    session = service.create_session(settings.tiny_model_name, project="bench-cold-start")
    training = service.create_training_client(session, max_seq_len=64)
    training.save_weights_for_sampler("cold", hotload=False).result(120)
    uri = f"bt://loops:{training.run_id}/sampler_weights/cold"

    cold: list[float] = []
    raw: list[float] = []
    for round_ in range(args.rounds):
        model = deploys.create_model(
            checkpoint_uri=uri, name=f"bench-cold-{round_}", deployment={"name": "cold"}
        ).result(60)
        path = f"/model/{model['model_id']}/deployment/{model['deployment_id']}/predict"
        with httpx.Client(base_url=url, headers={"Authorization": f"Api-Key {key}"},
                          timeout=300) as client:  # fmt: skip
            t0 = time.perf_counter()
            client.post(path, json={"prompt_tokens": [5, 6], "max_tokens": 1}).raise_for_status()
            cold.append(time.perf_counter() - t0)
        deploys.delete(model["model_id"], model["deployment_id"])
        t0 = time.perf_counter()
        Replica(ReplicaSpec(replica_id="bench", deployment_id="bench", model_id="bench",
                            base_model=settings.tiny_model_name, weights_uri=uri,
                            predict_concurrency=1,
                            settings=replica_settings(settings))).load()  # fmt: skip
        raw.append(time.perf_counter() - t0)
    service.end_session(session.session_id, reason="benchmark over").result(60)

    figures = {
        "parked request -> answer (s)": cold,
        "raw in-process load (s)": raw,
    }
    table = Table(title="cold start: parked request vs raw weights load")
    for column in ("what", "median s", "min s", "max s"):
        table.add_column(column, justify="right")
    for what, samples in figures.items():
        table.add_row(what, f"{statistics.median(samples):.2f}", f"{min(samples):.2f}",
                      f"{max(samples):.2f}")  # fmt: skip
    Console().print(table)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    rounded = {k: [round(v, 3) for v in vals] for k, vals in figures.items()}
    record = {"commit": commit, "rounds": args.rounds, "figures": rounded}
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
