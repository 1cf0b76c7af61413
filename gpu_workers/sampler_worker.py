"""The sampler worker: serves sampling calls and picks up new weights without restarting.

    python -m gpu_workers.sampler_worker

Per sampler it holds one engine (torch here; vLLM on a GPU host behind the same interface).
Between request batches it reads `WeightsReady` events and swaps the new weights in (verified
against their manifest), so a swap never lands inside a request. On its first request a sampler
comes up on the newest sampler weights of its run (a restarted worker resumes there). A request
pinned to a checkpoint gets exactly those weights. Every response and every `SamplesGenerated`
event names the weights version that produced the tokens, stamped when the request starts.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
from confluent_kafka import OFFSET_END, Consumer
from psycopg.rows import dict_row
from pydantic import BaseModel

from commands.envelope import CommandEnvelope
from commands.work import SAMPLER_REQUESTS, Sample
from events.catalog import decode_payload
from events.envelope import EventEnvelope, utc_now
from events.ids import new_event_id
from events.kafka_log import assign_all, consumer_config
from events.loops import WeightsReady
from events.work import (
    HotloadFailed,
    HotloadStarted,
    HotloadSucceeded,
    SamplerEvent,
    SamplesGenerated,
    WeightsLoaded,
)
from gpu_workers.checkpoint_store import CheckpointNotFoundError, CheckpointRef, CheckpointStore
from gpu_workers.deltas import DeltaChainError, read_link
from gpu_workers.engine.sampler import SamplerEngine
from gpu_workers.engine.types import SamplingParams
from gpu_workers.manifest import ChecksumMismatchError
from gpu_workers.models import UnknownBaseModel, resolve_base_model
from gpu_workers.service import WorkDone, WorkerService, WorkRejected
from infra.s3 import ObjectStore
from infra.settings import Settings

log = logging.getLogger("loopstream.sampler_worker")

# How long a pinned checkpoint may take to appear in the read model after its save.
RECORD_GRACE_S = 10.0
# A sampler more than this many deltas behind reloads from the chain's base instead of walking on.
MAX_CHAIN_FETCH = 1000


@dataclass
class HostedSampler:
    sampler_id: str
    run_id: str
    engine: SamplerEngine
    uri: str | None  # checkpoint the weights came from; None = base model / start checkpoint


class HotloadError(Exception):
    """New weights were refused; `events` (HotloadStarted, HotloadFailed) say why."""

    def __init__(self, reason: str, events: list[tuple[SamplerEvent, datetime]]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.events = events


@dataclass(frozen=True)
class Ready:
    checkpoint_id: str
    uri: str


class SamplerWorker(WorkerService):
    name = "sampler-worker"
    requests_topic = "sampler-requests"
    aggregate_type = "sampler"
    request_types = SAMPLER_REQUESTS
    # New weights are looked for between waits: keep the waits short.
    poll_timeout_s = 0.01

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.samplers: dict[str, HostedSampler] = {}
        # Newest WeightsReady seen per sampler, hosted here or not yet: a sampler created later
        # starts from it even when the read model has not caught up.
        self.latest_ready: dict[str, Ready] = {}
        self.checkpoints = CheckpointStore(ObjectStore.from_settings(settings))
        self.db = psycopg.connect(settings.pg_conninfo, autocommit=True, row_factory=dict_row)
        self.weights_feed = self._subscribe_to_weights()

    def forget(self, aggregate_ids: set[str]) -> None:
        for sampler_id in aggregate_ids:
            self.samplers.pop(sampler_id, None)

    # --- weight sync ---------------------------------------------------------------------------

    def _subscribe_to_weights(self) -> Consumer:
        # Every partition, from now on: weights published before start are found in the read
        # model when a sampler is first used.
        topic = self.settings.topic("events")
        consumer = Consumer(
            consumer_config(self.settings, group_id=f"{self.loop.group_id}-weights")
        )
        assign_all(consumer, self.settings, topic, OFFSET_END)
        return consumer

    def between_batches(self) -> None:
        for message in self.weights_feed.consume(num_messages=100, timeout=0):
            if message.error() is not None:
                continue
            if dict(message.headers() or []).get("event_type") != b"WeightsReady":
                continue
            event = decode_payload(EventEnvelope.from_bytes(message.value()))
            assert isinstance(event, WeightsReady)
            self.latest_ready[event.sampler_id] = Ready(event.checkpoint_id, event.uri)
            hosted = self.samplers.get(event.sampler_id)
            if hosted is not None and hosted.uri != event.uri:
                try:
                    events = self._load(hosted, event.checkpoint_id, event.uri)
                except HotloadError as exc:
                    # Refused weights: say why, keep serving the old ones.
                    extra = {"sampler_id": hosted.sampler_id, "uri": event.uri,
                             "reason": exc.reason}  # fmt: skip
                    log.warning("hotload failed", extra=extra)
                    events = exc.events
                self._emit(hosted.sampler_id, events, causation_id=event.checkpoint_id)

    def _load(
        self, hosted: HostedSampler, checkpoint_id: str | None, uri: str
    ) -> list[tuple[SamplerEvent, datetime]]:
        """Fetch `uri` and as much of its chain as needed, verify everything, swap it in.

        A delta's parents are fetched back to the weights served now (or to the chain's base),
        then applied in order in one swap. Returns the events with the time each happened
        (HotloadStarted, HotloadSucceeded, WeightsLoaded); raises HotloadError carrying
        HotloadStarted and HotloadFailed when anything does not check out.
        """
        from_version = hosted.engine.weights_version
        started = HotloadStarted(
            checkpoint_id=checkpoint_id, uri=uri, from_digest=from_version.digest
        )
        started_at, t0 = utc_now(), time.perf_counter()
        bytes_moved = 0
        try:
            with tempfile.TemporaryDirectory(prefix="loopstream-weights-") as tmp:
                chain: list[Path] = []  # target first, then its parents
                next_uri, expected_digest = uri, None
                while True:
                    folder = Path(tmp) / f"link-{len(chain)}"
                    manifest = self.checkpoints.download(CheckpointRef.from_uri(next_uri), folder)
                    bytes_moved += manifest.total_bytes
                    if expected_digest is not None and manifest.digest != expected_digest:
                        raise DeltaChainError(
                            f"{next_uri}: digest {manifest.digest} != the {expected_digest} its "
                            "child names as parent"
                        )
                    chain.append(folder)
                    link = read_link(folder)
                    if link.checkpoint_type == "base" or link.parent_digest == from_version.digest:
                        break
                    if link.parent_uri is None or len(chain) >= MAX_CHAIN_FETCH:
                        raise DeltaChainError(f"{next_uri}: no reachable base for this delta")
                    next_uri, expected_digest = link.parent_uri, link.parent_digest
                fetched = time.perf_counter()
                target_type = read_link(chain[0]).checkpoint_type
                version = hosted.engine.load_chain(chain[::-1], checkpoint_id=checkpoint_id or uri)
        except (CheckpointNotFoundError, ChecksumMismatchError, DeltaChainError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            failed = HotloadFailed(
                checkpoint_id=checkpoint_id,
                uri=uri,
                reason=reason,
                bytes_moved=bytes_moved,
                total_ms=(time.perf_counter() - t0) * 1000,
                serving_checkpoint_id=from_version.checkpoint_id,
                serving_digest=from_version.digest,
            )
            raise HotloadError(reason, [(started, started_at), (failed, utc_now())]) from exc
        done = time.perf_counter()
        hosted.uri = uri
        total_ms = (done - t0) * 1000
        extra = {"sampler_id": hosted.sampler_id, "uri": uri, "load_ms": round(total_ms, 1),
                 "bytes": bytes_moved}  # fmt: skip
        log.info("weights loaded", extra=extra)
        succeeded = HotloadSucceeded(
            checkpoint_id=checkpoint_id,
            uri=uri,
            checkpoint_type=target_type,
            content_digest=version.digest,
            folders_applied=len(chain),
            bytes_moved=bytes_moved,
            fetch_ms=(fetched - t0) * 1000,
            apply_ms=(done - fetched) * 1000,
            total_ms=total_ms,
        )
        loaded = WeightsLoaded(
            checkpoint_id=checkpoint_id, uri=uri, content_digest=version.digest, load_ms=total_ms
        )
        now = utc_now()
        return [(started, started_at), (succeeded, now), (loaded, now)]

    def _emit(
        self, sampler_id: str, events: list[tuple[SamplerEvent, datetime]], *, causation_id: str
    ) -> None:
        """Events outside any request: their own small transaction."""
        producer = self.loop.producer
        producer.begin_transaction()
        sequence = self.versions.get(sampler_id, 0)
        for event, occurred_at in events:
            sequence += 1
            envelope = EventEnvelope(
                event_id=new_event_id(),
                type=type(event).__name__,
                schema_version=event.schema_version,
                aggregate_type=self.aggregate_type,
                aggregate_id=sampler_id,
                sequence=sequence,
                occurred_at=occurred_at,
                causation_id=causation_id,
                correlation_id=causation_id,
                actor="sampler-worker",
                payload=event.model_dump(mode="json"),
            )
            producer.produce(
                self.settings.topic("events"),
                key=sampler_id.encode(),
                value=envelope.to_bytes(),
                headers=envelope.kafka_headers(),
            )
        producer.commit_transaction(30)
        self.versions[sampler_id] = sequence

    # --- sampling ------------------------------------------------------------------------------

    def execute(self, envelope: CommandEnvelope, request: BaseModel) -> WorkDone:
        if not isinstance(request, Sample):
            raise WorkRejected(f"unsupported request {type(request).__name__}", field="type")
        events: list = []
        hosted = self._sampler(envelope.aggregate_id, events)
        if request.checkpoint_uri is not None and hosted.uri != request.checkpoint_uri:
            checkpoint_id = self._checkpoint_id(request.checkpoint_uri)
            events.extend(self._load_for_request(hosted, checkpoint_id, request.checkpoint_uri))

        engine = hosted.engine
        if request.prompt_tokens is not None:
            prompt = request.prompt_tokens
        else:
            prompt = engine.tokenizer.encode(request.prompt, add_special_tokens=False)
        version = engine.weights_version  # stamped at dispatch, before any token exists
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stop=request.stop,
        )
        sequences = engine.sample(prompt, request.num_samples, params)
        # Scored by the same weights, before any new ones can be picked up between requests.
        prompt_logprobs = engine.compute_logprobs(prompt) if request.prompt_logprobs else None
        weights = {"checkpoint_id": version.checkpoint_id, "uri": hosted.uri,
                   "digest": version.digest}  # fmt: skip
        events.append(
            SamplesGenerated(
                request_id=envelope.command_id,
                num_samples=len(sequences),
                num_tokens=sum(len(s.tokens) for s in sequences),
                weights_checkpoint_id=version.checkpoint_id,
                weights_digest=version.digest,
            )
        )
        return WorkDone(
            output={
                "prompt_tokens": list(prompt),
                "sequences": [
                    {
                        "tokens": s.tokens,
                        "text": s.text,
                        "logprobs": s.logprobs,
                        "stop_reason": s.stop_reason,
                    }
                    for s in sequences
                ],
                "weights_version": weights,
                "prompt_logprobs": prompt_logprobs,
            },
            events=events,
        )

    def _sampler(self, sampler_id: str, events: list) -> HostedSampler:
        hosted = self.samplers.get(sampler_id)
        if hosted is not None:
            return hosted
        schema = self.settings.read_schema
        row = self.db.execute(
            f"select s.run_id, s.status, r.base_model, r.max_seq_len, r.from_checkpoint "
            f"from {schema}.samplers s join {schema}.runs r using (run_id) "
            "where s.sampler_id = %s",
            (sampler_id,),
        ).fetchone()
        if row is None:
            raise WorkRejected(f"sampler {sampler_id} does not exist", field="sampler_id")
        if row["status"] != "active":
            raise WorkRejected(
                f"sampler {sampler_id} is {row['status']}: its session ended", field="sampler_id"
            )
        try:
            base = resolve_base_model(self.settings, row["base_model"])
        except UnknownBaseModel as exc:
            raise WorkRejected(str(exc), field="base_model") from exc
        engine = SamplerEngine(base, device=self.settings.torch_device, checkpoint_id="base")
        hosted = HostedSampler(sampler_id=sampler_id, run_id=row["run_id"], engine=engine, uri=None)
        start = self._newest_weights(sampler_id, row["run_id"])
        if (
            start is None
            and row["from_checkpoint"]
            and "/sampler_weights/" in row["from_checkpoint"]
        ):
            uri = row["from_checkpoint"]
            start = Ready(self._checkpoint_id(uri), uri)
        if start is not None:
            events.extend(self._load_for_request(hosted, start.checkpoint_id, start.uri))
        self.samplers[sampler_id] = hosted
        return hosted

    def _load_for_request(
        self, hosted: HostedSampler, checkpoint_id: str, uri: str
    ) -> list[SamplerEvent]:
        # Inside a request the events go out with its result; a refusal fails the request.
        try:
            return [event for event, _ in self._load(hosted, checkpoint_id, uri)]
        except HotloadError as exc:
            reason = f"weights {uri} refused: {exc.reason}"
            raise WorkRejected(reason, field="checkpoint_uri") from exc

    def _newest_weights(self, sampler_id: str, run_id: str) -> Ready | None:
        # The feed carries everything published since this worker started, so what it saw is
        # newer than anything in the read model (which may not have caught up with it yet).
        seen = self.latest_ready.get(sampler_id)
        if seen is not None:
            return seen
        row = self.db.execute(
            f"select checkpoint_id, uri from {self.settings.read_schema}.checkpoints "
            "where run_id = %s and kind = 'sampler_weights' and status = 'active' "
            "order by created_at desc limit 1",
            (run_id,),
        ).fetchone()
        return Ready(row["checkpoint_id"], row["uri"]) if row else None

    def _checkpoint_id(self, uri: str) -> str:
        # A client may sample a checkpoint the moment its save is answered, before the
        # projection has recorded it (the save's result and the record travel separately):
        # give the read model a moment before calling the checkpoint missing.
        deadline = time.monotonic() + RECORD_GRACE_S
        while True:
            row = self.db.execute(
                f"select checkpoint_id, status from {self.settings.read_schema}.checkpoints "
                "where uri = %s order by created_at desc limit 1",
                (uri,),
            ).fetchone()
            if row is not None and row["status"] == "active":
                return row["checkpoint_id"]
            if row is not None or time.monotonic() > deadline:
                raise WorkRejected(f"checkpoint {uri} does not exist", field="checkpoint_uri")
            time.sleep(0.02)


def main() -> None:
    from infra.logs import configure_logging
    from infra.settings import get_settings

    configure_logging()
    SamplerWorker(get_settings()).run()


if __name__ == "__main__":
    main()
