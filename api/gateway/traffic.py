"""Request records of the gateway: Prometheus metrics for operators, and per-deployment counts
on Kafka (`deployment-traffic`) for the replica controller and the autoscaler to come.

Counts are batched: one record per deployment with traffic per `FLUSH_S` per gateway (never one
per request, let alone per token), plus one at once when a request parks at a deployment with
no replica, so a cold start begins without waiting for the next flush.

Record (JSON, keyed by deployment id; schema in docs/schemas/deployment-traffic.json):
    {"deployment_id", "model_id", "workspace_id", "gateway_id", "at" (ISO 8601, UTC),
     "window_s", "requests", "errors", "parked", "in_flight", "queued", "ongoing",
     "latency_ms_sum", "latency_ms_max"}
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Producer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from events.envelope import utc_now
from events.kafka_log import producer_config
from infra.settings import Settings

log = logging.getLogger("loopstream.gateway")

FLUSH_S = 1.0
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class _Window:
    model_id: str = ""
    workspace_id: str = ""
    requests: int = 0
    errors: int = 0
    latency_ms_sum: float = 0.0
    latency_ms_max: float = 0.0


class TrafficRecorder:
    def __init__(self, settings: Settings, *, in_flight: Any, queued: Any, parked: Any) -> None:
        self.settings = settings
        self.gateway_id = uuid.uuid4().hex[:8]
        # deployment -> live counts, read at flush time from the replica pool
        self._in_flight, self._queued, self._parked = in_flight, queued, parked
        self._windows: dict[str, _Window] = defaultdict(_Window)
        # deployment -> (model, workspace, requests in the gateway now: waiting or at a replica)
        self._active: dict[str, tuple[str, str, int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._producer = Producer(producer_config(self.settings))
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "loopstream_gateway_requests", "Requests answered, by deployment, route and status",
            ["deployment_id", "route", "status"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "loopstream_gateway_request_seconds", "Time from arrival to answer",
            ["deployment_id", "route"], buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.in_flight_gauge = Gauge(
            "loopstream_gateway_in_flight", "Requests being served by a replica",
            ["deployment_id"], registry=self.registry,
        )  # fmt: skip
        self.queue_gauge = Gauge(
            "loopstream_gateway_queue_depth", "Requests waiting for a replica slot (parked too)",
            ["deployment_id"], registry=self.registry,
        )  # fmt: skip
        self.replicas_gauge = Gauge(
            "loopstream_gateway_replicas", "Replicas by state, as the gateway last read them",
            ["deployment_id", "state"], registry=self.registry,
        )  # fmt: skip

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self._producer.flush(5)

    def begin(self, deployment_id: str, model_id: str, workspace_id: str) -> None:
        with self._lock:
            _, _, ongoing = self._active.get(deployment_id, ("", "", 0))
            self._active[deployment_id] = (model_id, workspace_id, ongoing + 1)

    def finished(
        self, deployment_id: str, *, route: str, status: int, seconds: float, counted: bool = True
    ) -> None:
        self.requests.labels(deployment_id, route, str(status)).inc()
        self.latency.labels(deployment_id, route).observe(seconds)
        with self._lock:
            model_id, workspace_id, ongoing = self._active.get(deployment_id, ("", "", 1))
            if ongoing <= 1:
                self._active.pop(deployment_id, None)
            else:
                self._active[deployment_id] = (model_id, workspace_id, ongoing - 1)
            if not counted:
                return
            self._windows[deployment_id].model_id = model_id
            self._windows[deployment_id].workspace_id = workspace_id
            window = self._windows[deployment_id]
            window.requests += 1
            window.errors += status >= 500
            window.latency_ms_sum += seconds * 1000
            window.latency_ms_max = max(window.latency_ms_max, seconds * 1000)

    def parked(self, deployment_id: str) -> None:
        """A request waits at a deployment with no replica: tell the controller now."""
        self._wake.set()

    def set_replica_states(self, states: dict[str, dict[str, int]]) -> None:
        self.replicas_gauge.clear()
        for deployment_id, counts in states.items():
            for state, n in counts.items():
                self.replicas_gauge.labels(deployment_id, state).set(n)

    # --- the flusher ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_S)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # a broker away: counts of this window are dropped, not the gateway
                log.warning("traffic flush failed", exc_info=True)

    def flush(self) -> None:
        with self._lock:
            windows, self._windows = self._windows, defaultdict(_Window)
            active = dict(self._active)
        now = utc_now().isoformat()
        for deployment_id in set(windows) | set(active):
            in_flight = self._in_flight(deployment_id)
            queued = self._queued(deployment_id)
            parked = self._parked(deployment_id)
            self.in_flight_gauge.labels(deployment_id).set(in_flight)
            self.queue_gauge.labels(deployment_id).set(queued)
            window = windows.get(deployment_id, _Window())
            model_id, workspace_id, ongoing = active.get(
                deployment_id, (window.model_id, window.workspace_id, 0)
            )
            if not (window.requests or ongoing or in_flight or queued):
                continue
            record = {
                "deployment_id": deployment_id,
                "model_id": model_id,
                "workspace_id": workspace_id,
                "gateway_id": self.gateway_id,
                "at": now,
                "window_s": FLUSH_S,
                "requests": window.requests,
                "errors": window.errors,
                "parked": parked,
                "in_flight": in_flight,
                "queued": queued,
                "ongoing": ongoing,
                "latency_ms_sum": round(window.latency_ms_sum, 3),
                "latency_ms_max": round(window.latency_ms_max, 3),
            }
            self._producer.produce(
                self.settings.topic("deployment-traffic"),
                key=deployment_id.encode(),
                value=json.dumps(record).encode(),
            )
        self._producer.poll(0)
