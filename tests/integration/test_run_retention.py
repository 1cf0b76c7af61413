"""`keep_last_checkpoints`, the run's retention, through the REST API and the loops SDK."""

from __future__ import annotations

import time

import httpx

from api.client import ServiceClient
from api.config import get_api_settings
from infra.settings import Settings

TINY = "loopstream/tiny-llama"


def test_a_run_keeping_the_last_one_deletes_the_older_save_of_the_same_kind(
    services: Settings,
) -> None:
    with ServiceClient() as service:
        session = service.create_session(TINY)
        training = service.create_training_client(session, max_seq_len=32, keep_last_checkpoints=1)
        first = training.save_weights("first").result(120)
        second = training.save_weights("second").result(120)
        # A save of the other kind counts apart: it deletes no `weights` checkpoint.
        training.save_weights_for_sampler("served").result(120)

        deadline = time.monotonic() + 30
        while True:
            rows = {
                c["checkpoint_id"]: c
                for c in service.list_checkpoints(training.run_id, include_deleted=True)
            }
            if rows.get(first["checkpoint_id"], {}).get("status") == "deleted":
                break
            assert time.monotonic() < deadline, f"the older save was kept: {rows}"
            time.sleep(0.2)
        assert rows[first["checkpoint_id"]]["delete_reason"] == "retention"
        assert rows[second["checkpoint_id"]]["status"] == "active"
        assert {c["name"] for c in rows.values() if c["status"] == "active"} == {"second", "served"}
        service.end_session(session.session_id).result(60)


def test_keep_last_checkpoints_below_one_is_refused_by_name(api_key: str) -> None:
    with httpx.Client(
        base_url=get_api_settings().base_url,
        headers={"Authorization": f"Api-Key {api_key}"},
        timeout=60,
    ) as client:
        answer = client.post(
            "/v1/loops/runs",
            json={"session_id": "nosuchsession", "max_seq_len": 8, "keep_last_checkpoints": 0},
        )
    assert answer.status_code == 422, answer.text
    assert "keep_last_checkpoints" in answer.text
