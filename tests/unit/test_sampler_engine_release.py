"""A sampler worker closes the engine of a sampler it stops hosting (a vLLM engine holds a share
of the GPU until then, and the next engine could not start), and a failing close does not take
the worker down. No Kafka or PostgreSQL: the worker is built without its connections."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

from events.work import SamplerReleased
from gpu_workers.engine.sampler import SamplerEngine, SamplerEngineProtocol
from gpu_workers.engine.types import SamplingParams
from gpu_workers.sampler_worker import HostedSampler, SamplerWorker
from gpu_workers.tiny_model import BOS_ID, ensure_tiny_model


class ClosingEngine:
    """Only what dropping a sampler touches: `close`."""

    def __init__(self, *, fails: bool = False) -> None:
        self.closes = 0
        self.fails = fails

    def close(self) -> None:
        self.closes += 1
        if self.fails:
            raise RuntimeError("engine core already dead")


def hosting(engines: dict[str, ClosingEngine]) -> tuple[SamplerWorker, list[Any]]:
    """A worker hosting these samplers, whose emitted events land in the returned list."""
    worker = SamplerWorker.__new__(SamplerWorker)
    worker.samplers = {
        sampler_id: HostedSampler(sampler_id=sampler_id, run_id="r1", base_model="tiny",
                                  base_dir=Path("/nowhere"), engine=engine, uri=None)  # type: ignore[arg-type]
        for sampler_id, engine in engines.items()
    }  # fmt: skip
    worker.stopped = OrderedDict()
    worker.to_host, worker.latest_ready, worker.workspaces = {}, {}, {}
    emitted: list[Any] = []
    worker.emit = lambda aggregate_id, events, **_: emitted.extend(e for e, _ in events)  # type: ignore[method-assign]
    return worker, emitted


def test_a_released_sampler_has_its_engine_closed() -> None:
    kept, released = ClosingEngine(), ClosingEngine()
    worker, emitted = hosting({"s1": kept, "s2": released})

    worker._release("s2", "session ended")

    assert (released.closes, kept.closes) == (1, 0)
    assert set(worker.samplers) == {"s1"}
    (event,) = emitted
    assert isinstance(event, SamplerReleased) and event.engines_held == 1


def test_engines_forgotten_after_a_failed_transaction_are_closed() -> None:
    first, second = ClosingEngine(), ClosingEngine()
    worker, _ = hosting({"s1": first, "s2": second})

    worker.forget({"s1", "s2", "never-hosted"})

    assert (first.closes, second.closes) == (1, 1) and worker.samplers == {}


def test_an_engine_that_fails_to_close_is_logged_and_still_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = ClosingEngine(fails=True)
    worker, emitted = hosting({"s1": broken})

    with caplog.at_level(logging.ERROR):
        worker._release("s1", "session ended")

    assert broken.closes == 1 and worker.samplers == {} and len(emitted) == 1
    assert any(r.getMessage() == "closing an engine failed" for r in caplog.records)


def test_the_torch_engine_closes_by_dropping_its_cached_prefills(tmp_path: Path) -> None:
    engine = SamplerEngine(ensure_tiny_model(tmp_path / "model"))
    engine.sample([BOS_ID, 65], 2, SamplingParams(max_tokens=2, seed=0))
    assert isinstance(engine, SamplerEngineProtocol)
    assert len(engine._prompt_cache) == 1  # the prompt's prefill, kept for its next samples

    engine.close()
    engine.close()

    assert engine.reset_prompt_cache() == 0  # nothing was left cached
