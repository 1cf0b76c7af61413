"""The trainer worker: serves training calls for the runs whose requests land on its partitions.

    python -m gpu_workers.trainer_worker

Per run it holds one TrainerEngine (weights, AdamW state, accumulated gradients), created on the
run's first request from its base model, restored from the run's latest full-state checkpoint
when there is one (a restarted worker resumes from there; work since that save is lost with the
process, as on any trainer). Saving uploads the folder to the S3 store and records the
checkpoint on the session in the same Kafka transaction as the result.

Engines live as long as their run: the worker follows `RunStopped` on the events topic (and
checks the read model every `RELEASE_SWEEP_S` for a stop it missed, e.g. one before it started)
and drops a stopped run's engine with a `TrainerReleased` event; work for a stopped run is then
refused ("run X is stopped"), never served.

S3 transfers that fail on infrastructure (store down, 5xx, timeouts) are retried with back-off
(gpu_workers/failures.py), then answered "failed" with category "server"; a checkpoint that
does not exist or does not match its manifest is the request's fault ("user").
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_END, Consumer
from pydantic import BaseModel

from commands.envelope import CommandEnvelope
from commands.loops import CHECKPOINT_URI, checkpoint_uri
from commands.work import (
    TRAINER_REQUESTS,
    ComputeLogprobs,
    Forward,
    ForwardBackward,
    LoadState,
    OptimStep,
    SaveWeights,
)
from events.catalog import decode_payload
from events.envelope import DEFAULT_WORKSPACE, EventEnvelope, utc_now
from events.kafka_log import assign_all, consumer_config
from events.loops import RunStopped
from events.work import (
    ForwardBackwardCompleted,
    ForwardCompleted,
    LogprobsComputed,
    OptimStepCompleted,
    StateLoaded,
    TrainerReleased,
    WeightsSaved,
)
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from gpu_workers.deltas import ChainLink, DeltaChainError, read_link
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import AdamParams as EngineAdamParams
from gpu_workers.engine.types import Datum as EngineDatum
from gpu_workers.failures import category_of, with_retries
from gpu_workers.models import UnknownBaseModel, resolve_base_model
from gpu_workers.read_models import ReadModelConnection
from gpu_workers.service import WorkDone, WorkerService, WorkRejected
from infra.s3 import ObjectStore
from infra.settings import Settings

log = logging.getLogger("loopstream.trainer_worker")

# How often held engines are checked against the read model for a stop the events feed missed.
RELEASE_SWEEP_S = 10.0
# Stopped runs remembered so a request racing the read model is refused, not served by a fresh
# engine; bounded, so memory does not grow with the number of runs ever ended.
REMEMBERED_STOPS = 4096


@dataclass
class RunEngine:
    run_id: str
    session_id: str
    engine: TrainerEngine


class TrainerWorker(WorkerService):
    name = "trainer-worker"
    requests_topic = "trainer-requests"
    aggregate_type = "trainer"
    request_types = TRAINER_REQUESTS

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.runs: dict[str, RunEngine] = {}
        self.stopped: OrderedDict[str, str] = OrderedDict()  # run_id -> why, newest last
        self.checkpoints = CheckpointStore(ObjectStore.from_settings(settings))
        self.db = ReadModelConnection(settings.pg_conninfo)  # reconnects after a restart
        self.next_sweep = time.monotonic() + RELEASE_SWEEP_S
        self.stops_feed = self._subscribe_to_stops()

    def forget(self, aggregate_ids: set[str]) -> None:
        for run_id in aggregate_ids:
            self.runs.pop(run_id, None)

    # --- engine lifecycle ----------------------------------------------------------------------

    def _subscribe_to_stops(self) -> Consumer:
        # Every partition, from now on: a stop before start is found by the read-model sweep.
        topic = self.settings.topic("events")
        consumer = Consumer(consumer_config(self.settings, group_id=f"{self.loop.group_id}-stops"))
        assign_all(consumer, self.settings, topic, OFFSET_END)
        return consumer

    def between_batches(self) -> None:
        for message in self.stops_feed.consume(num_messages=200, timeout=0):
            if message.error() is not None:
                continue
            if dict(message.headers() or []).get("event_type") != b"RunStopped":
                continue
            envelope = EventEnvelope.from_bytes(message.value())
            event = decode_payload(envelope)
            if isinstance(event, RunStopped):
                self.workspaces.setdefault(event.run_id, envelope.workspace)
                self._note_stopped(event.run_id, event.reason)
        if time.monotonic() >= self.next_sweep:
            self.next_sweep = time.monotonic() + RELEASE_SWEEP_S
            self._sweep()

    def _sweep(self) -> None:
        """Release held engines whose run the read model says is no longer active."""
        if not self.runs:
            return
        rows = self.db.execute(
            f"select run_id, status, stop_reason, workspace_id from {self.settings.read_schema}"
            ".runs where run_id = any(%s) and status <> 'active'",
            (list(self.runs),),
        ).fetchall()
        for row in rows:
            self.workspaces.setdefault(row["run_id"], row["workspace_id"] or DEFAULT_WORKSPACE)
            self._note_stopped(row["run_id"], row["stop_reason"] or row["status"])

    def _note_stopped(self, run_id: str, reason: str) -> None:
        self.stopped[run_id] = reason
        self.stopped.move_to_end(run_id)
        while len(self.stopped) > REMEMBERED_STOPS:
            self.stopped.popitem(last=False)
        if self.runs.pop(run_id, None) is None:
            return
        held = len(self.runs)
        self.emit(
            run_id,
            [(TrainerReleased(run_id=run_id, reason=reason, engines_held=held), utc_now())],
            causation_id=run_id,
        )
        self.workspaces.pop(run_id, None)
        log.info("run released", extra={"run_id": run_id, "reason": reason, "engines_held": held})

    def execute(self, envelope: CommandEnvelope, request: BaseModel) -> WorkDone:
        run = self._run(envelope.aggregate_id)
        request_id = envelope.command_id
        if isinstance(request, ForwardBackward):
            data = [
                EngineDatum(
                    model_input=d.model_input,
                    loss_fn_inputs={
                        k: v for k, v in d.loss_fn_inputs.model_dump().items() if v is not None
                    },
                )
                for d in request.data
            ]
            # Forward is a ForwardBackward that leaves the gradients alone.
            forward_only = isinstance(request, Forward)
            run_pass = run.engine.forward if forward_only else run.engine.forward_backward
            out = run_pass(data, request.loss_fn, request.loss_fn_config)
            event_type = ForwardCompleted if forward_only else ForwardBackwardCompleted
            return WorkDone(
                output={
                    "loss": out.loss,
                    "metrics": out.metrics,
                    "loss_fn_outputs": out.loss_fn_outputs,
                },
                events=[
                    event_type(
                        request_id=request_id,
                        loss_fn=request.loss_fn,
                        loss=out.loss,
                        num_sequences=len(data),
                        num_tokens=sum(len(d.model_input) for d in request.data),
                        metrics=out.metrics,
                    )
                ],
            )
        if isinstance(request, LoadState):
            return self._load_state(run, request_id, request)
        if isinstance(request, OptimStep):
            params = EngineAdamParams(**request.adam_params.model_dump())
            step = run.engine.optim_step(params)
            return WorkDone(
                output={"step": step.step, "metrics": step.metrics},
                events=[
                    OptimStepCompleted(
                        request_id=request_id,
                        step=step.step,
                        learning_rate=params.learning_rate,
                        grad_norm=step.metrics.get("grad_norm"),
                    )
                ],
            )
        if isinstance(request, ComputeLogprobs):
            logprobs = [run.engine.compute_logprobs(tokens) for tokens in request.sequences]
            return WorkDone(
                output={"logprobs": logprobs},
                events=[
                    LogprobsComputed(
                        request_id=request_id,
                        num_sequences=len(request.sequences),
                        num_tokens=sum(len(s) for s in request.sequences),
                    )
                ],
            )
        if isinstance(request, SaveWeights):
            return self._save(run, envelope, request)
        raise WorkRejected(f"unsupported request {type(request).__name__}", field="type")

    def _load_state(self, run: RunEngine, request_id: str, request: LoadState) -> WorkDone:
        if _kind(request.checkpoint_uri) != "weights":
            raise WorkRejected(
                "load_state needs a full-state (weights) checkpoint, not sampler weights",
                field="checkpoint_uri",
            )
        with tempfile.TemporaryDirectory(prefix="loopstream-load-") as tmp:
            folder = Path(tmp) / "checkpoint"
            self._download(request.checkpoint_uri, folder, field="checkpoint_uri")
            run.engine.load_state(folder, optimizer=request.optimizer)
        return WorkDone(
            output={
                "path": request.checkpoint_uri,
                "step": run.engine.step,
                # The caller's data position saved with the state (None if it gave none).
                "loader_state": run.engine.loader_state,
            },
            events=[
                StateLoaded(
                    request_id=request_id,
                    uri=request.checkpoint_uri,
                    with_optimizer=request.optimizer,
                    step=run.engine.step,
                )
            ],
        )

    # --- runs ----------------------------------------------------------------------------------

    def _download(self, uri: str, folder: Path, *, field: str) -> None:
        """Fetch a checkpoint, retrying infrastructure failures (InfrastructureError, "server",
        once they persist); a checkpoint that is missing or corrupt is the request's fault."""
        try:
            with_retries(
                f"downloading {uri}",
                lambda: self.checkpoints.download(CheckpointRef.from_uri(uri), folder),
            )
        except Exception as exc:
            if category_of(exc) == "user":
                raise WorkRejected(f"checkpoint {uri} cannot be read: {exc}", field=field) from exc
            raise

    def _run(self, run_id: str) -> RunEngine:
        known = self.runs.get(run_id)
        if known is not None:
            return known
        if run_id in self.stopped:  # stopped, though the read model may not say so yet
            raise WorkRejected(f"run {run_id} is stopped ({self.stopped[run_id]})", field="run_id")
        row = self.db.execute(
            f"select session_id, base_model, max_seq_len, lora_rank, from_checkpoint, status, "
            f"stop_reason from {self.settings.read_schema}.runs where run_id = %s",
            (run_id,),
        ).fetchone()
        if row is None:
            raise WorkRejected(f"run {run_id} does not exist", field="run_id")
        if row["status"] != "active":
            raise WorkRejected(
                f"run {run_id} is stopped ({row['stop_reason'] or row['status']})", field="run_id"
            )
        try:
            model_dir = resolve_base_model(self.settings, row["base_model"])
        except UnknownBaseModel as exc:
            raise WorkRejected(str(exc), field="base_model") from exc
        restore_uri = self._latest_state_uri(run_id) or row["from_checkpoint"]
        with tempfile.TemporaryDirectory(prefix="loopstream-restore-") as tmp:
            restore_dir: Path | None = None
            if restore_uri is not None:
                restore_dir = Path(tmp) / "checkpoint"
                self._download(restore_uri, restore_dir, field="from_checkpoint")
                if _kind(restore_uri) == "sampler_weights":  # a plain model folder: start there
                    if read_link(restore_dir).checkpoint_type != "base":
                        raise WorkRejected(
                            f"{restore_uri} is a delta sampler checkpoint, not a model folder: "
                            "start from a base one",
                            field="from_checkpoint",
                        )
                    model_dir, restore_dir = restore_dir, None
            engine = TrainerEngine(
                model_dir,
                max_seq_len=row["max_seq_len"],
                lora_rank=row["lora_rank"],
                device=self.settings.torch_device,
            )
            if restore_dir is not None:
                engine.load_state(restore_dir)
        run = RunEngine(run_id=run_id, session_id=row["session_id"], engine=engine)
        self.runs[run_id] = run
        log.info("run loaded", extra={"run_id": run_id, "restored_from": restore_uri,
                                      "engines_held": len(self.runs)})  # fmt: skip
        return run

    def _latest_state_uri(self, run_id: str) -> str | None:
        row = self.db.execute(
            f"select uri from {self.settings.read_schema}.checkpoints "
            "where run_id = %s and kind = 'weights' and status = 'active' "
            "order by created_at desc limit 1",
            (run_id,),
        ).fetchone()
        return row["uri"] if row else None

    # --- saving --------------------------------------------------------------------------------

    def _save(self, run: RunEngine, envelope: CommandEnvelope, request: SaveWeights) -> WorkDone:
        taken = self.db.execute(
            f"select 1 from {self.settings.read_schema}.checkpoints "
            "where run_id = %s and kind = %s and name = %s and status = 'active'",
            (run.run_id, request.kind, request.name),
        ).fetchone()
        if taken:
            raise WorkRejected(
                f"a {request.kind} checkpoint named {request.name!r} already exists for run "
                f"{run.run_id}",
                field="name",
            )
        uri = checkpoint_uri(run.run_id, request.kind, request.name)
        # Derived from the request id: a retried save records the same checkpoint id.
        checkpoint_id = "ck" + hashlib.sha256(envelope.command_id.encode()).hexdigest()[:14]
        with tempfile.TemporaryDirectory(prefix="loopstream-save-") as tmp:
            folder = Path(tmp) / request.name
            link: ChainLink | None = None
            if request.kind == "weights":
                manifest = run.engine.save_state(folder, loader_state=request.loader_state)
            else:
                try:
                    manifest = run.engine.save_weights_for_sampler(
                        folder,
                        checkpoint_type=request.checkpoint_type,
                        uri=uri,
                        codec=request.compression_format,
                    )
                except DeltaChainError as exc:
                    raise WorkRejected(str(exc), field="checkpoint_type") from exc
                link = read_link(folder)
            try:
                # Idempotent: a retry after a lost answer finds its own manifest and is done.
                stored = with_retries(
                    f"uploading {uri}",
                    lambda: self.checkpoints.upload(folder, CheckpointRef.from_uri(uri)),
                )
            except Exception:
                # The engine's chain head is a folder the store never got: no delta may name it.
                run.engine.reset_delta_chain()
                raise
        files = [
            {"relative_file_name": f.relative_file_name, "size_bytes": f.size_bytes,
             "sha256": f.sha256}
            for f in stored.files
        ]  # fmt: skip
        record = CommandEnvelope(
            command_id=f"{envelope.command_id}:record",
            type="RecordCheckpoint",
            aggregate_id=run.session_id,
            actor=envelope.actor,
            workspace_id=envelope.workspace_id,  # the session's: another would not find it
            correlation_id=envelope.correlation_id or envelope.command_id,
            causation_id=envelope.command_id,
            payload={
                "run_id": run.run_id,
                "checkpoint_id": checkpoint_id,
                "name": request.name,
                "kind": request.kind,
                "files": files,
                "step": run.engine.step,
                "ttl_seconds": request.ttl_seconds,
                "checkpoint_type": link.checkpoint_type if link else None,
                "chain_position": link.position if link else None,
                "hotload": (
                    request.hotload.model_dump()
                    if link is not None and request.hotload is not None
                    else None
                ),
                "user_metadata": request.user_metadata,
            },
        )
        total = sum(f["size_bytes"] for f in files)
        output: dict[str, Any] = {
            "path": uri,
            "checkpoint_id": checkpoint_id,
            "content_digest": manifest.digest,
            "step": run.engine.step,
            "size_bytes": total,
        }
        if request.export:
            output["export"] = True
        if link is not None:
            output["checkpoint_type"] = link.checkpoint_type
        return WorkDone(
            output=output,
            events=[
                WeightsSaved(
                    request_id=envelope.command_id,
                    checkpoint_id=checkpoint_id,
                    name=request.name,
                    kind=request.kind,
                    uri=uri,
                    content_digest=manifest.digest,
                    total_size_bytes=total,
                    step=run.engine.step,
                    checkpoint_type=link.checkpoint_type if link else None,
                    chain_position=link.position if link else None,
                    parent_digest=link.parent_digest if link else None,
                )
            ],
            follow_ups=[record],
        )


def _kind(uri: str) -> str:
    match = CHECKPOINT_URI.match(uri)
    return match["kind"] if match else ""


def main() -> None:
    from infra.logs import configure_logging
    from infra.settings import get_settings

    configure_logging()
    TrainerWorker(get_settings()).run()


if __name__ == "__main__":
    main()
