"""WeightSyncer's own rules, without a server: constructor checks and the base/delta choice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api.client import ServiceClient, TrainingClient
from api.weight_syncer import WeightSyncer


@pytest.fixture
def trainer() -> Iterator[TrainingClient]:
    # Nothing listens there: these tests must not make a request.
    with ServiceClient("http://127.0.0.1:9") as service:
        yield TrainingClient(service, run_id="r1", sampler_id="p1", max_seq_len=64)


def test_defaults_are_the_seeds(trainer: TrainingClient) -> None:
    syncer = WeightSyncer(trainer)
    assert syncer.hotload_timeout == 600
    assert syncer.first_checkpoint_type == "base"
    assert syncer.options.warmup is True
    assert syncer.options.warmup_max_retries == 10
    assert syncer.options.reset_prompt_cache is True
    assert syncer.lora_rank == 0
    assert syncer.deployment_id == "p1"  # the run's paired sampler


def test_first_save_is_a_base_then_deltas_until_a_reset(trainer: TrainingClient) -> None:
    syncer = WeightSyncer(trainer)
    assert syncer._next_type(None) == "base"
    syncer._chain_started = True  # what a successful save does
    assert syncer._next_type(None) == "delta"
    assert syncer._next_type("base") == "base"  # asked for explicitly
    syncer.reset_delta_chain()
    assert syncer._next_type(None) == "base"


def test_first_checkpoint_type_delta_and_lora_forcing_base(trainer: TrainingClient) -> None:
    assert WeightSyncer(trainer, first_checkpoint_type="delta")._next_type(None) == "delta"
    lora = WeightSyncer(trainer, lora_rank=8)
    lora._chain_started = True
    assert lora._next_type(None) == "base"
    assert lora._next_type("delta") == "base"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"first_checkpoint_type": "full"}, "first_checkpoint_type"),
        ({"compression_format": "arc_v2"}, "compression_format 'arc_v2' is not one of"),
        ({"hotload_timeout": 0}, "hotload_timeout"),
        ({"lora_rank": -1}, "lora_rank"),
        ({"deployment_id": "other"}, "paired sampler 'p1'"),
    ],
)
def test_bad_options_name_the_option(
    trainer: TrainingClient, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        WeightSyncer(trainer, **kwargs)  # type: ignore[arg-type]


def test_without_a_deploy_mgr_there_is_nothing_to_sync_to(trainer: TrainingClient) -> None:
    syncer = WeightSyncer(trainer)
    with pytest.raises(RuntimeError, match="no deploy_mgr"):
        syncer.hotload("a", "base")
    with pytest.raises(RuntimeError, match="no deploy_mgr"):
        syncer.check_deployment_state()
    with pytest.raises(ValueError, match="checkpoint_type"):
        syncer._next_type("full")


def test_a_failed_hotload_logs_its_reason_in_the_message(
    trainer: TrainingClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from api.client import RequestFailedError

    def refused(*args: object, **kwargs: object) -> None:
        raise RequestFailedError("req-1", "rejected", "no sampler snapshot named 'step-9'", "name")

    monkeypatch.setattr(trainer, "hotload", refused)
    syncer = WeightSyncer(trainer, deploy_mgr=trainer.service)
    with caplog.at_level("WARNING", logger="loopstream.weight_syncer"):
        assert syncer.hotload("step-9", "base") is False
    (record,) = caplog.records
    # The default log format prints the message only: the reason must be in it.
    assert "step-9" in record.getMessage() and "no sampler snapshot" in record.getMessage()


def test_wait_for_hotload_ready_checks_first_then_polls_from_short_intervals(
    trainer: TrainingClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import api.weight_syncer as module

    syncer = WeightSyncer(trainer, deploy_mgr=trainer.service)
    answers = iter([{"ready": False}, {"ready": False}, {"ready": True}])
    monkeypatch.setattr(syncer, "check_deployment_state", lambda: next(answers))
    slept: list[float] = []
    monkeypatch.setattr(module.time, "sleep", slept.append)
    assert syncer.wait_for_hotload_ready(poll_interval_s=5)["ready"]
    assert slept == [0.05, 0.1]  # not 5 s each

    ready_at_once = iter([{"ready": True}])
    monkeypatch.setattr(syncer, "check_deployment_state", lambda: next(ready_at_once))
    slept.clear()
    assert syncer.wait_for_hotload_ready()["ready"] and slept == []
