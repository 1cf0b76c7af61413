"""Control-plane overhead per training call: API -> Kafka -> worker -> event -> future, vs torch.

Baseline, in this process: the same TrainerEngine calls (forward_backward + optim_step on the
tiny model, the same batch) made directly. Through loopstream: the SDK posts both calls to the
REST API, the API sends them to Kafka, the trainer worker runs them in a Kafka transaction with
their events and results, the projection writes the results, and the SDK's futures long-poll
them. Overhead = loopstream time - direct time, per (forward_backward + optim_step) pair.

Needs the stack and services (`make demo` leaves them running).

    .venv/bin/python benchmarks/control_plane_overhead.py --calls 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from api.client import ServiceClient
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import AdamParams, Datum
from gpu_workers.models import resolve_base_model
from infra.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "control_plane_overhead.json"
BASE_MODEL = "loopstream/tiny-llama"


def batch(n: int = 8, length: int = 32) -> list[dict]:
    data = []
    for i in range(n):
        tokens = [(i * 7 + t * 13) % 256 for t in range(length + 1)]
        inputs = {"target_tokens": tokens[1:], "weights": [1.0] * length}
        data.append({"model_input": tokens[:-1], "loss_fn_inputs": inputs})
    return data


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def direct(calls: int, data: list[dict]) -> list[float]:
    engine = TrainerEngine(resolve_base_model(get_settings(), BASE_MODEL), max_seq_len=64)
    data_in = [
        Datum(model_input=d["model_input"], loss_fn_inputs=d["loss_fn_inputs"]) for d in data
    ]
    times = []
    for i in range(calls + 3):
        t0 = time.perf_counter()
        engine.forward_backward(data_in, "cross_entropy")
        engine.optim_step(AdamParams(learning_rate=1e-4))
        if i >= 3:  # warm-up
            times.append((time.perf_counter() - t0) * 1000)
    return times


def through_loopstream(calls: int, data: list[dict]) -> list[float]:
    service = ServiceClient()
    session = service.create_session(BASE_MODEL, project="bench-overhead")
    training = service.create_training_client(session, max_seq_len=64)
    times = []
    for i in range(calls + 3):
        t0 = time.perf_counter()
        training.forward_backward(data).result()
        training.optim_step({"learning_rate": 1e-4}).result()
        if i >= 3:  # the first call loads the run's engine
            times.append((time.perf_counter() - t0) * 1000)
    service.end_session(session.session_id)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    data = batch()
    direct_ms = direct(args.calls, data)
    loop_ms = through_loopstream(args.calls, data)
    d50, l50 = statistics.median(direct_ms), statistics.median(loop_ms)
    figures = {
        "calls": args.calls,
        "batch": "8 sequences x 32 tokens, cross_entropy + AdamW step",
        "direct_ms_p50": round(d50, 1),
        "direct_ms_p99": round(percentile(direct_ms, 0.99), 1),
        "loopstream_ms_p50": round(l50, 1),
        "loopstream_ms_p99": round(percentile(loop_ms, 0.99), 1),
        "overhead_ms_p50": round(l50 - d50, 1),
        "overhead_ms_p99": round(percentile(loop_ms, 0.99) - percentile(direct_ms, 0.99), 1),
        "overhead_per_call_ms_p50": round((l50 - d50) / 2, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    table = Table("measure", "value", title="control-plane overhead (fb + optim pair)")
    for key, value in figures.items():
        table.add_row(key, str(value))
    Console().print(table)


if __name__ == "__main__":
    main()
