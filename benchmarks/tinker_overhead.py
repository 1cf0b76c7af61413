"""The Tinker front door (/api/v1) vs the /v1/loops one, on the same training calls.

Both doors send the same ForwardBackward and OptimStep work requests to the same trainer worker;
what differs is the wire (protobuf forward_backward and futures long-polled by the official
`tinker` SDK, vs JSON through loopstream's own client) and the SDK's own machinery (its event
loop thread, seq_id ordering). Measured per call, waited on one at a time, on the tiny model with
the same batch, alternating blocks of calls so that drift on the machine hits both doors alike.

Needs the stack and services (`make demo` leaves them running).

    .venv/bin/python benchmarks/tinker_overhead.py --calls 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tinker
from rich.console import Console
from rich.table import Table
from tinker import types

from api.client import ServiceClient, resolve_api_key
from api.config import get_api_settings

RESULTS = Path(__file__).parent / "results" / "tinker_overhead.json"
BASE_MODEL = "loopstream/tiny-llama"
WARMUP = 3  # the first calls load the run's engine
BLOCK = 10  # calls per door before switching to the other


def batch(n: int = 8, length: int = 32) -> list[list[int]]:
    return [[(i * 7 + t * 13) % 256 for t in range(length + 1)] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(call: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1000


class LoopsDoor:
    """/v1/loops through loopstream's own REST client."""

    def __init__(self, sequences: list[list[int]]) -> None:
        self.service = ServiceClient()
        self.session = self.service.create_session(BASE_MODEL, project="bench-tinker-overhead")
        self.training = self.service.create_training_client(self.session, max_seq_len=64)
        self.data = [
            {
                "model_input": s[:-1],
                "loss_fn_inputs": {"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)},
            }
            for s in sequences
        ]

    def forward_backward(self) -> None:
        self.training.forward_backward(self.data).result()

    def optim_step(self) -> None:
        self.training.optim_step({"learning_rate": 1e-4}).result()

    def close(self) -> None:
        self.service.end_session(self.session.session_id).result()
        self.service.close()


class TinkerDoor:
    """/api/v1 through the official tinker SDK."""

    def __init__(self, sequences: list[list[int]]) -> None:
        self.service = tinker.ServiceClient(  # the same issued key as the loops side's
            base_url=get_api_settings().base_url, api_key=resolve_api_key()
        )
        self.training = self.service.create_lora_training_client(
            base_model=BASE_MODEL, rank=0
        ).result()
        self.data = [
            tinker.Datum(
                model_input=types.ModelInput.from_ints(s[:-1]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData(
                        data=s[1:], dtype="int64", shape=[len(s) - 1]
                    ),
                    "weights": types.TensorData(
                        data=[1.0] * (len(s) - 1), dtype="float32", shape=[len(s) - 1]
                    ),
                },
            )
            for s in sequences
        ]

    def forward_backward(self) -> None:
        self.training.forward_backward(self.data, "cross_entropy").result()

    def optim_step(self) -> None:
        self.training.optim_step(types.AdamParams(learning_rate=1e-4)).result()

    def close(self) -> None:
        self.service.close("success").result()


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(ms), 2), "p99_ms": round(percentile(ms, 0.99), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=100, help="calls of each kind per door")
    args = parser.parse_args()
    sequences = batch()
    doors: dict[str, Any] = {"loops": LoopsDoor(sequences), "tinker": TinkerDoor(sequences)}
    times: dict[str, dict[str, list[float]]] = {
        door: {"forward_backward": [], "optim_step": []} for door in doors
    }
    for door in doors.values():
        for _ in range(WARMUP):
            door.forward_backward()
            door.optim_step()
    for _ in range(0, args.calls, BLOCK):
        for name, door in doors.items():
            for _ in range(BLOCK):
                times[name]["forward_backward"].append(timed(door.forward_backward))
                times[name]["optim_step"].append(timed(door.optim_step))
    for door in doors.values():
        door.close()

    figures: dict[str, Any] = {
        "calls": args.calls,
        "batch": "8 sequences x 32 tokens, cross_entropy; AdamW step; each call awaited alone",
    }
    table = Table("call", "door", "p50 ms", "p99 ms", title="Tinker vs /v1/loops, per call")
    for call in ("forward_backward", "optim_step"):
        loops, tink = summary(times["loops"][call]), summary(times["tinker"][call])
        figures[call] = {
            "loops": loops,
            "tinker": tink,
            "ratio_p50": round(tink["p50_ms"] / loops["p50_ms"], 2),
            "ratio_p99": round(tink["p99_ms"] / loops["p99_ms"], 2),
        }
        for door, s in (("loops", loops), ("tinker", tink)):
            table.add_row(call, door, f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}")
        table.add_row(
            call,
            "ratio",
            f"{figures[call]['ratio_p50']:.2f}x",
            f"{figures[call]['ratio_p99']:.2f}x",
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    Console().print(table)


if __name__ == "__main__":
    main()
