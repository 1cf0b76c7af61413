"""The replica controller: the process manager that keeps each deployment's replicas on Ray.

    python -m gpu_workers.replica_controller

It reads the whole event log (models, deployments, its own replica events) and the gateway's
traffic records, asks `commands.replica_control.plan` what should change, does it on Ray, and
records every step as a replica event (it is their single writer). Ray places, runs and reports;
loopstream decides how many replicas and which weights.

Restart-safe: the log is read to its end before anything is decided, so a restarted controller
knows every replica its predecessor started; replicas are detached actors, so they outlive the
controller and are found again by name. A replica whose actor is gone is recorded as failed and
replaced; one the controller cannot account for (a start cut short by the restart) is stopped
and replaced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaException,
    Producer,
    TopicPartition,
)

from commands.replica_control import (
    ControlState,
    DeploymentTarget,
    DrainReplica,
    HotloadReplica,
    StartReplica,
    TargetWeights,
    evolve,
    plan,
    record_demand,
)
from events.catalog import UnknownEventType, decode_payload
from events.envelope import EventEnvelope, utc_now
from events.ids import new_event_id
from events.kafka_log import assign_all, consumer_config, producer_config
from events.replicas import (
    ReplicaDraining,
    ReplicaEvent,
    ReplicaFailed,
    ReplicaHotloadFailed,
    ReplicaHotloadStarted,
    ReplicaReady,
    ReplicaRequested,
    ReplicaStarting,
    ReplicaStopped,
    ReplicaWeightsLoaded,
)
from events.transactional import dead_letter
from gpu_workers.replica import Replica, ReplicaSpec, replica_settings
from infra.logs import configure_logging
from infra.ray_cluster import connect_ray
from infra.settings import Settings, get_settings
from infra.stack.ray_head import replica_resource

log = logging.getLogger("loopstream.replica_controller")

ACTOR_NAME = "replica-{replica_id}"
TICK_S = 0.25
PING_EVERY_S = 2.0
DRAIN_TIMEOUT_S = 30.0
# Ray runs a replica's calls on this many threads beyond its predict_concurrency: health pings
# and drains must never wait behind predictions.
CONTROL_THREADS = 4
NAME = "replica-controller"


@dataclass
class Tracked:
    """What the controller watches of a replica it is responsible for, on Ray."""

    handle: Any  # ray.actor.ActorHandle
    requested_mono: float  # time.monotonic() of ReplicaRequested (or of adoption)
    load_ref: Any = None  # the pending `load` call while starting
    ping_ref: Any = None
    ping_sent: float = 0.0
    last_ping: float = 0.0
    drain_ref: Any = None
    drain_reason: str = "drained"
    ready_mono: float | None = None
    hotload_ref: Any = None  # the pending `hotload` call
    hotload_weights: TargetWeights | None = None
    hotload_mono: float = 0.0


def actor_name(replica_id: str) -> str:
    return ACTOR_NAME.format(replica_id=replica_id)


class ReplicaController:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = ControlState()
        self.versions: dict[str, int] = {}  # replica id -> sequence of its last event
        self.workspaces: dict[str, str | None] = {}  # deployment id -> workspace
        self.tracked: dict[str, Tracked] = {}
        self.stop_requested = threading.Event()
        self.producer = Producer(
            producer_config(
                settings,
                transactional_id=f"{settings.topic_prefix}.{NAME}.{settings.worker_instance_id}",
            )
        )
        self.consumer = Consumer(
            consumer_config(
                settings,
                group_id=f"{settings.topic_prefix}.{NAME}",
                **{"enable.partition.eof": False},
            )
        )

    # --- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        # Fences a predecessor still running (its open transaction is aborted) before the log is
        # read: nothing it writes afterwards can land.
        self.producer.init_transactions(30)
        connect_ray(self.settings)
        import ray

        self._ray = ray
        events = self.settings.topic("events")
        assign_all(self.consumer, self.settings, events, OFFSET_BEGINNING)
        self._catch_up(events)
        traffic = self.settings.topic("deployment-traffic")
        partitions = self.consumer.assignment()
        count = len(self.consumer.list_topics(traffic, timeout=10).topics[traffic].partitions)
        if count == 0:  # without it no request could ever scale a deployment from zero
            raise RuntimeError(f"topic {traffic} is missing: `loopstream stack up` provisions it")
        self.consumer.incremental_assign(
            [TopicPartition(traffic, p, OFFSET_END) for p in range(count)]
        )
        log.info("caught up", extra={"replicas": len(self.state.replicas),
                                     "deployments": len(self.state.deployments),
                                     "partitions": len(partitions)})  # fmt: skip
        self._adopt()

    def _catch_up(self, topic: str) -> None:
        """Read the log to the end offsets of now, so every decision sees everything before."""
        ends = {}
        for tp in self.consumer.assignment():
            _, high = self.consumer.get_watermark_offsets(tp, timeout=10)
            ends[tp.partition] = high
        done = {p for p, high in ends.items() if high == 0}
        while len(done) < len(ends):
            message = self.consumer.poll(0.5)
            if message is None:
                for tp in self.consumer.position(self.consumer.assignment()):
                    if tp.offset >= ends.get(tp.partition, 0):
                        done.add(tp.partition)
                continue
            if message.error():
                continue
            self._apply_record(message)
            if message.offset() + 1 >= ends[message.partition()]:
                done.add(message.partition())

    def _adopt(self) -> None:
        """Find, after a (re)start, the actors of the replicas the log says are alive."""
        for replica in list(self.state.replicas.values()):
            if replica.status not in ("REQUESTED", "STARTING", "READY", "DRAINING"):
                continue
            try:
                handle = self._ray.get_actor(
                    actor_name(replica.replica_id), namespace=self.settings.replica_namespace
                )
            except ValueError:
                handle = None
            if handle is None:
                phase = "serving" if replica.status == "READY" else "starting"
                self._emit_failed(replica.replica_id, "actor gone while the controller was down",
                                  phase=phase)  # fmt: skip
                continue
            tracked = Tracked(handle, time.monotonic())
            self.tracked[replica.replica_id] = tracked
            if replica.status == "READY":
                tracked.ready_mono = time.monotonic()
                if replica.hotloading is not None:
                    # The predecessor's hotload: ask again (the replica serves one swap at a
                    # time, and answers at once for weights it already serves).
                    deployment = self.state.deployments.get(replica.deployment_id)
                    for weights in deployment.weights if deployment else ():
                        if weights.weights_version == replica.hotloading:
                            self._send_hotload(tracked, weights)
            elif replica.status == "DRAINING":
                tracked.drain_ref = handle.drain.remote(DRAIN_TIMEOUT_S)
            else:
                # A start the predecessor did not see through: begin it again on a clean actor.
                self._ray.kill(handle)
                self.tracked.pop(replica.replica_id)
                self._emit_failed(replica.replica_id, "start interrupted by a controller restart",
                                  phase="starting")  # fmt: skip

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop_requested.set())
        self.start()
        next_tick = 0.0
        while not self.stop_requested.is_set():
            message = self.consumer.poll(TICK_S)
            if message is not None and not message.error():
                self._apply_record(message)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                try:
                    self.tick()
                except Exception:  # one bad step must not take replica control down with it
                    log.error("tick failed", extra={"trace": traceback.format_exc()})
        self.consumer.close()
        self.producer.flush(10)

    def tick(self) -> None:
        self._watch_starts()
        self._watch_health()
        self._watch_drains()
        self._watch_hotloads()
        for action in plan(self.state, now=utc_now(),
                           idle_scale_down_s=self.settings.replica_idle_scale_down_s):  # fmt: skip
            if isinstance(action, StartReplica):
                self._start(action)
            elif isinstance(action, DrainReplica):
                self._drain(action.replica_id, action.reason)
            elif isinstance(action, HotloadReplica):
                self._hotload(action)

    # --- reading --------------------------------------------------------------------------------

    def _apply_record(self, message: Any) -> None:
        topic = message.topic()
        try:
            if topic == self.settings.topic("deployment-traffic"):
                self._apply_traffic(message.value())
                return
            envelope = EventEnvelope.from_bytes(message.value())
            if envelope.aggregate_type not in ("model", "replica"):
                return
            event = decode_payload(envelope)
        except UnknownEventType:
            return  # a newer producer's event type: not ours to act on
        except Exception as exc:
            # Garbage on a topic must not stop replica control: park it with the reason.
            self._dead_letter(message, f"{type(exc).__name__}: {exc}")
            return
        if envelope.aggregate_type == "replica":
            self.versions[envelope.aggregate_id] = envelope.sequence
        deployment_id = getattr(event, "deployment_id", None)
        if envelope.aggregate_type == "model" and deployment_id is not None:
            self.workspaces.setdefault(deployment_id, envelope.workspace_id)
        evolve(self.state, event, workspace_id=envelope.workspace_id,
               occurred_at=envelope.occurred_at)  # fmt: skip

    def _apply_traffic(self, value: bytes | None) -> None:
        record = json.loads(value or b"")
        deployment_id = record["deployment_id"]
        if not isinstance(deployment_id, str):
            raise ValueError("deployment_id: must be a string")
        counts = ("requests", "parked", "in_flight", "queued", "ongoing")
        if any(record.get(name, 0) for name in counts):
            at = datetime.fromisoformat(record["at"])
            if at.tzinfo is None:
                raise ValueError("at: must carry a time zone")
            record_demand(self.state, deployment_id, min(at, utc_now()))

    def _dead_letter(self, message: Any, reason: str) -> None:
        def produce() -> None:
            dead_letter(self.producer, self.settings.topic("events.dlq"), message, reason)

        try:
            self._transact(produce)
        except KafkaException:
            log.error("dead letter not written", extra={"trace": traceback.format_exc()})

    # --- acting on Ray --------------------------------------------------------------------------

    def _start(self, action: StartReplica) -> None:
        deployment = action.deployment
        model = self.state.models.get(deployment.model_id)
        if model is None:
            return  # its model's event is not read yet
        replica_id = uuid.uuid4().hex[:12]
        resources = {replica_resource(deployment.instance_type): 1.0}
        # The deployment's newest weights not refused (base then the chain: the replica's
        # fetch walks it), else the model's own.
        target = deployment.target
        weights_uri = target.checkpoint_uri if target else model.weights_uri
        self._emit(ReplicaRequested(
            replica_id=replica_id, deployment_id=deployment.deployment_id,
            model_id=deployment.model_id, reason=action.reason,
            instance_type=deployment.instance_type, ray_resources=resources,
            num_gpus=deployment.gpu_count, replaces=action.replaces,
            weights_uri=weights_uri, base_model=model.base_model,
            weights_version=deployment.target_version,
        ), deployment)  # fmt: skip
        concurrency = 1
        spec = ReplicaSpec(
            replica_id=replica_id,
            deployment_id=deployment.deployment_id,
            model_id=deployment.model_id,
            base_model=model.base_model,
            weights_uri=weights_uri,
            predict_concurrency=concurrency,
            settings=replica_settings(self.settings),
            gpu_memory_utilization=_gpu_share(deployment),
        )
        remote = self._ray.remote(Replica)
        handle = remote.options(
            name=actor_name(replica_id),
            namespace=self.settings.replica_namespace,
            lifetime="detached",
            num_cpus=0,
            num_gpus=deployment.gpu_count,
            resources=resources,
            max_concurrency=concurrency + CONTROL_THREADS,
            max_restarts=0,
        ).remote(spec)
        tracked = Tracked(handle, time.monotonic(), load_ref=handle.load.remote())
        self.tracked[replica_id] = tracked
        self._emit(ReplicaStarting(replica_id=replica_id, deployment_id=deployment.deployment_id,
                                   model_id=deployment.model_id,
                                   actor_name=actor_name(replica_id)), deployment)  # fmt: skip

    def _watch_starts(self) -> None:
        for replica_id, tracked in list(self.tracked.items()):
            if tracked.load_ref is None:
                continue
            done, _ = self._ray.wait([tracked.load_ref], timeout=0)
            if not done:
                continue
            ref, tracked.load_ref = tracked.load_ref, None
            try:
                loaded = self._ray.get(ref)
            except Exception as exc:
                self._kill(replica_id)
                self._emit_failed(replica_id, _reason(exc), phase="starting")
                continue
            tracked.ready_mono = tracked.last_ping = time.monotonic()
            replica = self.state.replicas[replica_id]
            self._emit(ReplicaReady(
                replica_id=replica_id, deployment_id=replica.deployment_id,
                model_id=replica.model_id, actor_name=actor_name(replica_id),
                content_digest=loaded["content_digest"], checkpoint_id=loaded["checkpoint_id"],
                node_ip=loaded.get("node_ip"), pid=loaded.get("pid"),
                start_ms=(time.monotonic() - tracked.requested_mono) * 1000,
                load_ms=loaded["load_ms"], predict_concurrency=1,
            ), self.state.deployments.get(replica.deployment_id))  # fmt: skip

    def _hotload(self, action: HotloadReplica) -> None:
        tracked = self.tracked.get(action.replica_id)
        if tracked is None or tracked.hotload_ref is not None or tracked.drain_ref is not None:
            return  # not ours to reach (yet), or busy
        replica = self.state.replicas[action.replica_id]
        weights = action.weights
        self._emit(ReplicaHotloadStarted(
            replica_id=replica.replica_id, deployment_id=replica.deployment_id,
            model_id=replica.model_id, weights_version=weights.weights_version,
            checkpoint_uri=weights.checkpoint_uri,
        ), self.state.deployments.get(replica.deployment_id))  # fmt: skip
        self._send_hotload(tracked, weights)

    def _send_hotload(self, tracked: Tracked, weights: TargetWeights) -> None:
        options = {"warmup": weights.warmup, "warmup_max_retries": weights.warmup_max_retries,
                   "reset_prompt_cache": weights.reset_prompt_cache}  # fmt: skip
        tracked.hotload_ref = tracked.handle.hotload.remote(weights.checkpoint_uri, options)
        tracked.hotload_weights = weights
        tracked.hotload_mono = time.monotonic()

    def _watch_hotloads(self) -> None:
        for replica_id, tracked in list(self.tracked.items()):
            if tracked.hotload_ref is None:
                continue
            done, _ = self._ray.wait([tracked.hotload_ref], timeout=0)
            if not done:
                continue
            ref, tracked.hotload_ref = tracked.hotload_ref, None
            weights = tracked.hotload_weights
            replica = self.state.replicas[replica_id]
            deployment = self.state.deployments.get(replica.deployment_id)
            assert weights is not None
            common = {"replica_id": replica_id, "deployment_id": replica.deployment_id,
                      "model_id": replica.model_id, "weights_version": weights.weights_version,
                      "checkpoint_uri": weights.checkpoint_uri}  # fmt: skip
            try:
                loaded = self._ray.get(ref)
            except Exception as exc:
                if replica.status != "READY" or _actor_died(exc):
                    continue  # drained or died meanwhile: its own events (and pings) tell
                loaded = {"refused": True, "reason": _reason(exc), "rolled_back": False,
                          "serving_digest": None}  # fmt: skip
            if loaded.pop("refused", False):
                loaded["reason"] = loaded["reason"][:2000]
                self._emit(ReplicaHotloadFailed(**common, **loaded), deployment)
                continue
            total_ms = (time.monotonic() - tracked.hotload_mono) * 1000
            self._emit(ReplicaWeightsLoaded(**common, **loaded, total_ms=total_ms), deployment)

    def _watch_health(self) -> None:
        now = time.monotonic()
        for replica_id, tracked in list(self.tracked.items()):
            replica = self.state.replicas.get(replica_id)
            if replica is None or replica.status != "READY":
                continue
            if tracked.ping_ref is not None:
                done, _ = self._ray.wait([tracked.ping_ref], timeout=0)
                if done:
                    ref, tracked.ping_ref = tracked.ping_ref, None
                    try:
                        self._ray.get(ref)
                        tracked.last_ping = now
                    except Exception as exc:
                        self._kill(replica_id)
                        self._emit_failed(replica_id, _reason(exc), phase="serving")
                        continue
                elif now - tracked.ping_sent > self.settings.replica_ping_timeout_s:
                    self._kill(replica_id)
                    self._emit_failed(replica_id, "no answer to a health ping for "
                                      f"{self.settings.replica_ping_timeout_s:g} s",
                                      phase="serving")  # fmt: skip
                    continue
            if tracked.ping_ref is None and now - tracked.last_ping >= PING_EVERY_S:
                tracked.ping_ref = tracked.handle.ping.remote()
                tracked.ping_sent = now

    def _drain(self, replica_id: str, reason: str) -> None:
        replica = self.state.replicas[replica_id]
        tracked = self.tracked.get(replica_id)
        self._emit(ReplicaDraining(replica_id=replica_id, deployment_id=replica.deployment_id,
                                   model_id=replica.model_id, reason=reason),
                   self.state.deployments.get(replica.deployment_id))  # fmt: skip
        if tracked is None:
            self._stopped(replica_id, reason)
            return
        tracked.load_ref = None
        tracked.drain_ref = tracked.handle.drain.remote(DRAIN_TIMEOUT_S)
        tracked.drain_reason = reason

    def _watch_drains(self) -> None:
        for replica_id, tracked in list(self.tracked.items()):
            if tracked.drain_ref is None:
                continue
            done, _ = self._ray.wait([tracked.drain_ref], timeout=0)
            if done:
                self._kill(replica_id)
                self._stopped(replica_id, tracked.drain_reason)

    def _stopped(self, replica_id: str, reason: str) -> None:
        replica = self.state.replicas[replica_id]
        tracked = self.tracked.pop(replica_id, None)
        uptime = None
        if tracked is not None and tracked.ready_mono is not None:
            uptime = time.monotonic() - tracked.ready_mono
        self._emit(ReplicaStopped(replica_id=replica_id, deployment_id=replica.deployment_id,
                                  model_id=replica.model_id, reason=reason, uptime_s=uptime),
                   self.state.deployments.get(replica.deployment_id))  # fmt: skip

    def _kill(self, replica_id: str) -> None:
        tracked = self.tracked.pop(replica_id, None)
        if tracked is not None:
            with contextlib.suppress(Exception):  # already gone
                self._ray.kill(tracked.handle, no_restart=True)

    # --- writing events -------------------------------------------------------------------------

    def _emit_failed(self, replica_id: str, reason: str, *, phase: str) -> None:
        replica = self.state.replicas[replica_id]
        log.warning("replica failed", extra={"replica_id": replica_id, "reason": reason})
        self._emit(ReplicaFailed(replica_id=replica_id, deployment_id=replica.deployment_id,
                                 model_id=replica.model_id, phase=phase,  # type: ignore[arg-type]
                                 reason=reason[:2000]),
                   self.state.deployments.get(replica.deployment_id))  # fmt: skip

    def _emit(self, event: ReplicaEvent, deployment: DeploymentTarget | None) -> None:
        """Write one replica event (its own small transaction) and fold it into the state."""
        sequence = self.versions.get(event.replica_id, 0) + 1
        workspace = deployment.workspace_id if deployment else None
        now = utc_now()
        envelope = EventEnvelope(
            event_id=new_event_id(),
            type=type(event).__name__,
            schema_version=event.schema_version,
            aggregate_type="replica",
            aggregate_id=event.replica_id,
            sequence=sequence,
            occurred_at=now,
            causation_id=event.deployment_id,
            correlation_id=event.deployment_id,
            actor=NAME,
            workspace_id=workspace,
            payload=event.model_dump(mode="json"),
        )

        def produce() -> None:
            self.producer.produce(
                self.settings.topic("events"),
                key=envelope.aggregate_id.encode(),
                value=envelope.to_bytes(),
                headers=envelope.kafka_headers(),
            )

        self._transact(produce)
        self.versions[event.replica_id] = sequence
        evolve(self.state, event, workspace_id=workspace, occurred_at=now)
        log.info(type(event).__name__, extra=event.model_dump(mode="json"))

    def _transact(self, produce: Any) -> None:
        """One event in one transaction, retried while Kafka is away: what the controller did
        on Ray has happened and must be recorded before it decides anything else."""
        delay = 0.2
        while True:
            try:
                self.producer.begin_transaction()
                produce()
                self.producer.commit_transaction(30)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if error.fatal():
                    raise
                with contextlib.suppress(KafkaException):
                    self.producer.abort_transaction(30)
                log.warning("event not written yet; retrying", extra={"error": str(error)})
                if self.stop_requested.wait(delay):
                    raise
                delay = min(delay * 2, 5.0)


def _gpu_share(deployment: DeploymentTarget) -> float | None:
    """The fraction of each GPU a replica's vLLM engine may reserve: the whole GPUs it asked for
    (one replica per instance, as on Baseten)."""
    return 0.85 if deployment.gpu_count else None


def _actor_died(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {cause}"


def main() -> None:
    configure_logging()
    settings = get_settings()
    ReplicaController(settings).run()


if __name__ == "__main__":
    main()
