"""Long-polls hold no database connection while they wait: many futures polled at once (the
cookbook's async RL keeps dozens in flight) must not drain the API's connection pool (5 + 10)
for every other request. Before, each poll kept the request's read connection for its whole
wait and the 16th request got a 500 (QueuePool limit reached) after 30 s."""

from __future__ import annotations

import asyncio

import httpx

from infra.settings import Settings

POLLS = 40  # more than the pool's 15 connections


def test_many_waiting_futures_leave_the_pool_to_other_requests(
    services: Settings, api_key: str
) -> None:
    from api.config import get_api_settings

    api = get_api_settings()
    base = f"http://{api.api_host}:{api.api_port}"
    headers = {"X-API-Key": api_key}

    async def main() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=90) as client:
            # Tinker futures nobody sent: each waits its full long-poll, then answers 410.
            polls = [
                client.post("/api/v1/retrieve_future", json={"request_id": f"never-sent-{i}"})
                for i in range(POLLS)
            ]
            waiting = asyncio.gather(*polls)
            await asyncio.sleep(2)  # every poll is waiting now
            others = [await client.get("/v1/loops/sessions") for _ in range(5)]
            return [r.status_code for r in await waiting], [r.status_code for r in others]

    polled, others = asyncio.run(main())
    assert others == [200] * 5
    assert polled == [410] * POLLS
