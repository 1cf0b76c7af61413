"""The sampler worker: serves sampling calls and picks up new weights without restarting.

    python -m gpu_workers.sampler_worker

Per sampler it holds one engine (torch here; vLLM on a GPU host behind the same interface).
A worker hosts the samplers whose sampler-requests partition it owns, as soon as they are
created (`SamplerReady`). Weight syncs (`WeightsReady`, numbered 1, 2, 3... per sampler) are
applied between requests: fetch, verify against the manifest and chain digests, swap, drop the
prompt cache, and warm up with retries when asked; new weights that fail warmup are swapped out
again. A request pinned to a checkpoint gets exactly those weights; a request with
`min_weights_version` N waits for sync N. Every response and every `SamplesGenerated` event names
the weights version that produced the tokens, stamped when the request starts.

A sampler hosted again (the worker restarted, or its partition moved) serves the newest sync a
previous host loaded, read from its own events in the log, never a sync that was refused; a
sync that no host handled yet is then applied as usual. Loading never stops the worker: any
exception becomes a refusal (HotloadFailed, or a rejected request) with a category, "user" for
weights that do not check out and "server" for the store or the worker failing; store and
network errors are first retried with back-off (gpu_workers/failures.py). A stopped sampler
(its session ended) is released: its engine dropped with a `SamplerReleased` event, and its
requests refused.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_END, Consumer
from pydantic import BaseModel

from commands.envelope import CommandEnvelope
from commands.work import SAMPLER_REQUESTS, Sample
from events.audit import history
from events.catalog import decode_payload
from events.envelope import DEFAULT_WORKSPACE, EventEnvelope, utc_now
from events.kafka_log import assign_all, consumer_config
from events.loops import SamplerCreated, SamplerStopped, WeightsReady
from events.work import (
    HotloadFailed,
    HotloadStarted,
    HotloadSucceeded,
    SamplerEvent,
    SamplerReady,
    SamplerReleased,
    SamplesGenerated,
    WeightsLoaded,
)
from gpu_workers.checkpoint_store import CheckpointNotFoundError, CheckpointStore
from gpu_workers.deltas import DeltaChainError
from gpu_workers.engine.sampler import SamplerEngineProtocol, build_sampler_engine
from gpu_workers.engine.types import PromptScores, PromptScoring, SamplingParams
from gpu_workers.failures import Category, InfrastructureError, category_of
from gpu_workers.manifest import ChecksumMismatchError
from gpu_workers.models import UnknownBaseModel, resolve_base_model
from gpu_workers.read_models import ReadModelConnection
from gpu_workers.service import WorkDone, WorkerService, WorkRejected
from gpu_workers.warmup import WarmupError, warm_up
from gpu_workers.weights_fetch import FetchedChain, fetch_chain
from infra.s3 import ObjectStore
from infra.settings import Settings

log = logging.getLogger("loopstream.sampler_worker")

# How long a pinned checkpoint may take to appear in the read model after its save.
RECORD_GRACE_S = 10.0
# How long a just-created sampler may take to appear in the read model before hosting gives up,
# and how often it is looked for meanwhile (the loop itself runs every few ms).
HOSTING_GRACE_S = 60.0
# A sampler created this recently that no worker hosted yet is hosted by the worker taking its
# partition over; older ones wait for their first request.
UNHOSTED_RECENT_S = 600
HOSTING_RETRY_S = 0.05
# Stopped samplers remembered so a request racing the read model is refused, not served by a
# fresh engine; bounded, so memory does not grow with every sampler that ever ended.
REMEMBERED_STOPS = 4096

Timed = tuple[SamplerEvent, datetime]


@dataclass(frozen=True)
class SyncedWeights:
    """Weights that came from a weight sync and loaded: what a sampler goes back to."""

    checkpoint_id: str | None
    uri: str | None  # None: the base model
    weights_version: int


@dataclass(frozen=True)
class PreviousHost:
    """What earlier hosts of a sampler did with its syncs, from its events in the log."""

    loaded: SyncedWeights | None  # the newest sync that loaded; None: none did
    refused: dict[int, str]  # sync -> why it was refused


def previous_host(events: Iterable[SamplerEvent]) -> PreviousHost:
    """Fold a sampler's own events: the newest sync that loaded (WeightsLoaded) and the syncs
    that were refused (HotloadFailed). A refused sync never loads again on a new host; a sync
    with neither (the host died in the middle) is not decided and may be tried again."""
    loaded: SyncedWeights | None = None
    refused: dict[int, str] = {}
    for event in events:
        if isinstance(event, WeightsLoaded) and event.weights_version is not None:
            if loaded is None or event.weights_version >= loaded.weights_version:
                loaded = SyncedWeights(event.checkpoint_id, event.uri, event.weights_version)
        elif isinstance(event, HotloadFailed) and event.weights_version is not None:
            refused[event.weights_version] = event.reason
    if loaded is not None:
        refused.pop(loaded.weights_version, None)
    return PreviousHost(loaded=loaded, refused=refused)


def load_failure_category(exc: BaseException) -> Category:
    """ "user": the weights themselves do not check out (missing, corrupted, not a chain, wrong
    shapes); "server": the store, the network or the worker failed."""
    if isinstance(exc, CheckpointNotFoundError | ChecksumMismatchError | DeltaChainError):
        return "user"
    if isinstance(exc, InfrastructureError):
        return "server"
    if isinstance(exc, ValueError):  # the engine's checks of what it is asked to load
        return "user"
    return category_of(exc)


@dataclass
class HostedSampler:
    sampler_id: str
    run_id: str
    base_model: str
    base_dir: Path
    engine: SamplerEngineProtocol
    uri: str | None  # checkpoint the weights came from; None = base model
    checkpoint_id: str | None = None
    # The sync the served weights came from (0: the base model or the run's start checkpoint);
    # None while a pinned request's checkpoint is loaded, which belongs to no sync.
    weights_version: int | None = 0
    synced_version: int = 0  # newest sync handled, applied or refused: never retried
    failures: dict[int, str] = field(default_factory=dict)  # sync -> why it was refused
    # The newest sync that loaded: served again after a pinned request when newer syncs were
    # refused. None: no sync loaded yet (the base model or the run's start checkpoint).
    good: SyncedWeights | None = None


class HotloadError(Exception):
    """New weights were refused; `events` (HotloadStarted, HotloadFailed) say why."""

    def __init__(self, reason: str, events: list[Timed], category: Category = "user") -> None:
        super().__init__(reason)
        self.reason = reason
        self.events = events
        self.category = category


class SamplerWorker(WorkerService):
    name = "sampler-worker"
    requests_topic = "sampler-requests"
    aggregate_type = "sampler"
    request_types = SAMPLER_REQUESTS
    # New weights are looked for between waits: keep the waits short.
    poll_timeout_s = 0.002

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.samplers: dict[str, HostedSampler] = {}
        # Newest sync seen per sampler, hosted here or not yet: a sampler hosted later starts
        # from it even when the read model has not caught up.
        self.latest_ready: dict[str, WeightsReady] = {}
        # Samplers created but not hosted yet -> give up hosting at this monotonic time.
        self.to_host: dict[str, float] = {}
        # The same, seen before this worker had any partition (so whether they are its own is
        # not known yet), oldest first.
        self.unclaimed: OrderedDict[str, float] = OrderedDict()
        self.stopped: OrderedDict[str, str] = OrderedDict()  # sampler_id -> why, newest last
        self.next_hosting_try = 0.0
        self.checkpoints = CheckpointStore(ObjectStore.from_settings(settings))
        self.db = ReadModelConnection(settings.pg_conninfo)  # reconnects after a restart
        self.weights_feed = self._subscribe_to_weights()

    def forget(self, aggregate_ids: set[str]) -> None:
        for sampler_id in aggregate_ids:
            self._drop_engine(sampler_id)

    def _drop_engine(self, sampler_id: str) -> HostedSampler | None:
        """Stop hosting it and close its engine now (a vLLM engine gives its GPU memory back;
        left to the garbage collector, the next engine could not start)."""
        hosted = self.samplers.pop(sampler_id, None)
        if hosted is not None:
            try:
                hosted.engine.close()
            except Exception:  # a broken engine must not take the worker down with it
                extra = {"sampler_id": sampler_id, "trace": traceback.format_exc()}
                log.error("closing an engine failed", extra=extra)
        return hosted

    def took_over(self, partitions: list[int]) -> None:
        """Host now, not at their first request, the active samplers of these partitions that
        were created or sent a sync while no worker hosted them (this one starting or
        restarting, or the partition moving): a new sampler comes up, a pending sync is applied,
        and `WeightSyncer` waits move on. Samplers idle since long before are hosted when first
        asked for (an idle sampler costs no engine)."""
        if not partitions:
            return
        schema = self.settings.read_schema
        rows = self.db.execute(
            f"select s.sampler_id from {schema}.samplers s "
            f"left join {schema}.sampler_weights w using (sampler_id) "
            "where s.status = 'active' and ("
            f"(w.ready_at is null and s.created_at > now() - interval '{UNHOSTED_RECENT_S} "
            "seconds') "
            f"or exists (select 1 from {schema}.weight_syncs ws where ws.sampler_id = "
            "s.sampler_id and ws.weights_version > greatest(coalesce(w.serving_version, 0), "
            "coalesce(w.last_hotload_version, 0))))"
        ).fetchall()
        candidates = {row["sampler_id"]: time.monotonic() + HOSTING_GRACE_S for row in rows}
        candidates.update(self.unclaimed)
        self.unclaimed.clear()
        for sampler_id, give_up_at in candidates.items():
            if (
                sampler_id not in self.samplers
                and sampler_id not in self.stopped
                and self._partition_of(sampler_id) in partitions
            ):
                self.to_host.setdefault(sampler_id, give_up_at)

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

    def _read_weights_feed(self, timeout: float = 0) -> None:
        """Note what the event log says about samplers: syncs, creations, stops. Loading is
        left to the callers, inside or outside a request, so its events go out in the right
        transaction."""
        for message in self.weights_feed.consume(num_messages=200, timeout=timeout):
            if message.error() is not None:
                continue
            event_type = dict(message.headers() or []).get("event_type")
            if event_type not in (b"WeightsReady", b"SamplerCreated", b"SamplerStopped"):
                continue
            envelope = EventEnvelope.from_bytes(message.value())
            event = decode_payload(envelope)
            sampler_id = getattr(event, "sampler_id", None)
            if sampler_id is not None:
                self.workspaces.setdefault(sampler_id, envelope.workspace)
            if isinstance(event, WeightsReady):
                seen = self.latest_ready.get(event.sampler_id)
                if seen is None or event.weights_version > seen.weights_version:
                    self.latest_ready[event.sampler_id] = event
                if event.sampler_id not in self.samplers:
                    self._maybe_host(event.sampler_id)
            elif isinstance(event, SamplerCreated):
                self._maybe_host(event.sampler_id)
            elif isinstance(event, SamplerStopped):
                self._release(event.sampler_id, event.reason)

    def _release(self, sampler_id: str, reason: str) -> None:
        """Its session ended: drop the engine (evented when this worker held one); requests for
        it are refused from now on."""
        self.stopped[sampler_id] = reason
        self.stopped.move_to_end(sampler_id)
        while len(self.stopped) > REMEMBERED_STOPS:
            self.stopped.popitem(last=False)
        self.to_host.pop(sampler_id, None)
        self.latest_ready.pop(sampler_id, None)
        if self._drop_engine(sampler_id) is None:
            return
        held = len(self.samplers)
        self.emit(sampler_id, [(SamplerReleased(reason=reason, engines_held=held), utc_now())],
                   causation_id=sampler_id)  # fmt: skip
        self.workspaces.pop(sampler_id, None)
        extra = {"sampler_id": sampler_id, "reason": reason, "engines_held": held}
        log.info("sampler released", extra=extra)

    def _maybe_host(self, sampler_id: str) -> None:
        """Host it if it is this worker's; before the first assignment nobody can tell yet, so
        it waits in `unclaimed` for `took_over` (it would be missed otherwise: the read model
        may not show it by then)."""
        if not self.loop.consumer.assignment():
            self.unclaimed[sampler_id] = time.monotonic() + HOSTING_GRACE_S
            while len(self.unclaimed) > REMEMBERED_STOPS:
                self.unclaimed.popitem(last=False)
        elif self._owns(sampler_id):
            self.to_host.setdefault(sampler_id, time.monotonic() + HOSTING_GRACE_S)

    def _owns(self, sampler_id: str) -> bool:
        """Whether this worker serves the sampler's partition of the requests topic."""
        assignment = self.loop.consumer.assignment()
        if not assignment:
            return False
        partition = self._partition_of(sampler_id)
        return any(tp.partition == partition for tp in assignment)

    def between_batches(self) -> None:
        self._read_weights_feed()
        now_s = time.monotonic()
        if self.to_host and now_s >= self.next_hosting_try:
            self.next_hosting_try = now_s + HOSTING_RETRY_S
            self._host_new_samplers()
        for hosted in list(self.samplers.values()):
            ready = self.latest_ready.get(hosted.sampler_id)
            if ready is not None and ready.weights_version > hosted.synced_version:
                self.emit(hosted.sampler_id, self._sync(hosted, ready),
                           causation_id=ready.checkpoint_id)  # fmt: skip

    def _host_new_samplers(self) -> None:
        """Host the samplers created on this worker's partitions, once the read model has them."""
        for sampler_id, give_up_at in list(self.to_host.items()):
            if sampler_id in self.samplers:
                del self.to_host[sampler_id]
                continue
            events: list[SamplerEvent] = []
            try:
                self._sampler(sampler_id, events)
            except WorkRejected as exc:
                if time.monotonic() > give_up_at or "does not exist" not in exc.reason:
                    log.warning("cannot host sampler", extra={"sampler_id": sampler_id,
                                                              "reason": exc.reason})  # fmt: skip
                    del self.to_host[sampler_id]
                continue  # not in the read model yet: next time round
            del self.to_host[sampler_id]
            now = utc_now()
            self.emit(sampler_id, [(e, now) for e in events], causation_id=sampler_id)

    def _sync(self, hosted: HostedSampler, ready: WeightsReady) -> list[Timed]:
        """Apply one weight sync: load, drop the prompt cache, warm up. Never raises: a refusal
        is a HotloadFailed event and the sampler keeps the weights it had."""
        hosted.synced_version = max(hosted.synced_version, ready.weights_version)
        before = (hosted.checkpoint_id, hosted.uri, hosted.weights_version)
        before_digest = hosted.engine.weights_version.digest
        try:
            events = self._load(
                hosted, ready.checkpoint_id, ready.uri, weights_version=ready.weights_version
            )
        except HotloadError as exc:
            self._refused(hosted, ready, exc.reason)
            return exc.events
        started, started_at = events[0]
        succeeded = events[1][0]
        assert isinstance(succeeded, HotloadSucceeded)
        dropped = hosted.engine.reset_prompt_cache() if ready.reset_prompt_cache else None
        attempts, warmup_ms = 0, None
        if ready.warmup:
            try:
                attempts, warmup_ms = warm_up(hosted.engine, ready.warmup_max_retries)
            except WarmupError as exc:
                reason = f"WarmupError: {exc}"
                self._roll_back(hosted, before)
                self._refused(hosted, ready, reason)
                failed = HotloadFailed(
                    checkpoint_id=ready.checkpoint_id,
                    uri=ready.uri,
                    reason=reason,
                    bytes_moved=succeeded.bytes_moved,
                    total_ms=succeeded.total_ms,
                    serving_checkpoint_id=hosted.engine.weights_version.checkpoint_id,
                    serving_digest=hosted.engine.weights_version.digest,
                    weights_version=ready.weights_version,
                    serving_weights_version=hosted.weights_version,
                    rolled_back=True,
                    category="user",
                )
                assert hosted.engine.weights_version.digest == before_digest
                return [(started, started_at), (failed, utc_now())]
        succeeded = succeeded.model_copy(
            update={
                "prompt_cache_entries_dropped": dropped,
                "warmup_attempts": attempts,
                "warmup_ms": warmup_ms,
            }
        )
        hosted.good = SyncedWeights(ready.checkpoint_id, ready.uri, ready.weights_version)
        return [events[0], (succeeded, events[1][1]), *events[2:]]

    def _refused(self, hosted: HostedSampler, ready: WeightsReady, reason: str) -> None:
        hosted.failures[ready.weights_version] = reason
        extra = {"sampler_id": hosted.sampler_id, "uri": ready.uri, "reason": reason}
        log.warning("hotload failed", extra=extra)

    def _roll_back(
        self, hosted: HostedSampler, before: tuple[str | None, str | None, int | None]
    ) -> None:
        """Swap the weights served before a failed warmup back in (from the store, or the base
        model's folder), and drop whatever the failed weights cached."""
        checkpoint_id, uri, weights_version = before
        if uri is not None:
            try:
                self._load(hosted, checkpoint_id, uri, weights_version=weights_version)
            except HotloadError as exc:
                # The refused weights must not stay: the base model is always at hand.
                extra = {"sampler_id": hosted.sampler_id, "reason": exc.reason}
                log.error("roll back failed, serving the base model", extra=extra)
                uri, checkpoint_id, weights_version = None, None, 0
        if uri is None:
            hosted.engine.load_weights(hosted.base_dir, checkpoint_id=checkpoint_id or "base")
            hosted.uri, hosted.checkpoint_id = None, checkpoint_id
        hosted.weights_version = weights_version
        hosted.engine.reset_prompt_cache()

    def _load(
        self,
        hosted: HostedSampler,
        checkpoint_id: str | None,
        uri: str,
        *,
        weights_version: int | None,
    ) -> list[Timed]:
        """Fetch `uri` and as much of its chain as needed, verify everything, swap it in.

        A delta's parents are fetched back to the weights served now (or to the chain's base),
        then applied in order in one swap. Returns the events with the time each happened
        (HotloadStarted, HotloadSucceeded, WeightsLoaded); raises HotloadError carrying
        HotloadStarted and HotloadFailed when anything does not check out.
        """
        from_version = hosted.engine.weights_version
        started = HotloadStarted(
            checkpoint_id=checkpoint_id,
            uri=uri,
            from_digest=from_version.digest,
            weights_version=weights_version,
        )
        started_at, t0 = utc_now(), time.perf_counter()
        fetched: FetchedChain | None = None
        try:
            with tempfile.TemporaryDirectory(prefix="loopstream-weights-") as tmp:
                fetched = fetch_chain(
                    self.checkpoints, uri, Path(tmp), serving_digest=from_version.digest
                )
                # The caller drops the prompt cache (or keeps it, when the sync says so).
                version = hosted.engine.load_chain(
                    fetched.folders,
                    checkpoint_id=checkpoint_id or uri,
                    keep_prompt_cache=True,
                    verified=True,  # by the download, file by file
                )
        except Exception as exc:  # whatever loading raises is a refusal, never a dead worker
            category = load_failure_category(exc)
            reason = f"{type(exc).__name__}: {exc}"
            if category == "server":
                log.error("weights load failed", extra={"sampler_id": hosted.sampler_id,
                          "uri": uri, "trace": traceback.format_exc()})  # fmt: skip
            failed = HotloadFailed(
                checkpoint_id=checkpoint_id,
                uri=uri,
                reason=reason,
                bytes_moved=fetched.bytes_moved if fetched else 0,
                total_ms=(time.perf_counter() - t0) * 1000,
                serving_checkpoint_id=from_version.checkpoint_id,
                serving_digest=from_version.digest,
                weights_version=weights_version,
                serving_weights_version=hosted.weights_version,
                category=category,
            )
            raise HotloadError(reason, [(started, started_at), (failed, utc_now())],
                               category) from exc  # fmt: skip
        assert fetched is not None
        done = time.perf_counter()
        hosted.uri, hosted.checkpoint_id, hosted.weights_version = (
            uri,
            checkpoint_id,
            weights_version,
        )
        total_ms = (done - t0) * 1000
        extra = {"sampler_id": hosted.sampler_id, "uri": uri, "load_ms": round(total_ms, 1),
                 "bytes": fetched.bytes_moved}  # fmt: skip
        log.info("weights loaded", extra=extra)
        succeeded = HotloadSucceeded(
            checkpoint_id=checkpoint_id,
            uri=uri,
            checkpoint_type=fetched.target_type,
            content_digest=version.digest,
            folders_applied=len(fetched.folders),
            bytes_moved=fetched.bytes_moved,
            fetch_ms=fetched.fetch_ms,
            apply_ms=(done - t0) * 1000 - fetched.fetch_ms,
            total_ms=total_ms,
            weights_version=weights_version,
        )
        loaded = WeightsLoaded(
            checkpoint_id=checkpoint_id,
            uri=uri,
            content_digest=version.digest,
            load_ms=total_ms,
            weights_version=weights_version,
        )
        now = utc_now()
        return [(started, started_at), (succeeded, now), (loaded, now)]

    # --- sampling ------------------------------------------------------------------------------

    def execute(self, envelope: CommandEnvelope, request: BaseModel) -> WorkDone:
        if not isinstance(request, Sample):
            raise WorkRejected(f"unsupported request {type(request).__name__}", field="type")
        events: list[SamplerEvent] = []
        hosted = self._sampler(envelope.aggregate_id, events)
        if request.checkpoint_uri is not None:
            if hosted.uri != request.checkpoint_uri:
                # Checked at load time, not only at the door: the caller's own, or published.
                checkpoint_id = self._checkpoint_id(
                    request.checkpoint_uri, workspace=envelope.workspace_id
                )
                events.extend(self._load_for_request(hosted, checkpoint_id, request.checkpoint_uri))
        else:
            self._catch_up(hosted, events)
            if request.min_weights_version is not None:
                self._wait_for_version(
                    hosted, request.min_weights_version, request.min_weights_wait_s, events
                )

        engine = hosted.engine
        if request.prompt_tokens is not None:
            prompt = request.prompt_tokens
        else:
            prompt = engine.tokenizer.encode(request.prompt, add_special_tokens=False)
        # The first prompt position scored (prompt_logprobs_last_n leaves earlier ones None).
        last_n = request.prompt_logprobs_last_n
        first = 0 if last_n is None else len(prompt) - last_n
        if last_n is not None and first < 1:  # a text prompt's length is known only here
            raise WorkRejected(
                f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 ({len(prompt) - 1})",
                field="prompt_logprobs_last_n",
            )
        version = engine.weights_version  # stamped at dispatch, before any token exists
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stop=request.stop,
            topk_logprobs=request.topk_sample_logprobs,
        )
        sequences = engine.sample(prompt, request.num_samples, params)
        # Scored by the same weights, before any new ones can be picked up between requests.
        scoring = PromptScoring(
            top_k=request.topk_prompt_logprobs,
            target_ids=request.target_prompt_logprobs,
            alt_k=request.prompt_alt_tokens_k,
            temperature=request.temperature,
            seed=request.seed,
        )
        scores = (
            engine.score_prompt(prompt, scoring)
            if request.prompt_logprobs or scoring.asks_more
            else None
        )
        weights = {"checkpoint_id": version.checkpoint_id, "uri": hosted.uri,
                   "digest": version.digest, "version": hosted.weights_version}  # fmt: skip
        events.append(
            SamplesGenerated(
                request_id=envelope.command_id,
                num_samples=len(sequences),
                num_tokens=sum(len(s.tokens) for s in sequences),
                weights_checkpoint_id=version.checkpoint_id,
                weights_digest=version.digest,
                weights_version=hosted.weights_version,
            )
        )
        output: dict[str, Any] = {
            "prompt_tokens": list(prompt),
            "sequences": [
                {
                    "tokens": s.tokens,
                    "text": s.text,
                    "logprobs": s.logprobs,
                    "stop_reason": s.stop_reason,
                    **({"topk_logprobs": s.topk_logprobs} if s.topk_logprobs else {}),
                }
                for s in sequences
            ],
            "weights_version": weights,
            "prompt_logprobs": None,
            "prompt_cache_hit_tokens": sequences[0].prompt_cache_hit_tokens,
        }
        if scores is not None:
            output.update(_prompt_outputs(request, scores, first))
        if request.record_stability_info:
            # What stable_reinforce trains on (api/recorded.py): the tokens and logprobs above.
            output["stability_recorded"] = True
        return WorkDone(output=output, events=list(events))

    def _catch_up(self, hosted: HostedSampler, events: list[SamplerEvent]) -> None:
        """Before serving an unpinned request: apply a sync that arrived since the last batch,
        and leave a pinned request's checkpoint for the newest synced weights."""
        ready = self.latest_ready.get(hosted.sampler_id)
        if ready is not None and ready.weights_version > hosted.synced_version:
            events.extend(event for event, _ in self._sync(hosted, ready))
        elif hosted.weights_version is None and hosted.good is not None:
            # Back from a pinned checkpoint to the newest sync that loaded (a refused one never).
            good = hosted.good
            if good.uri is None:
                return
            try:
                loaded = self._load(
                    hosted, good.checkpoint_id, good.uri, weights_version=good.weights_version
                )
            except HotloadError as exc:
                # It loaded once, but not now (e.g. a link of its chain was corrupted since):
                # keep serving what is loaded rather than failing the request, and stop trying.
                # Recorded as a load outside any sync, so sync N keeps its "succeeded".
                hosted.good = None
                events.extend(e.model_copy(update={"weights_version": None}) for e, _ in exc.events)
                return
            hosted.engine.reset_prompt_cache()  # computed with the weights just swapped out
            events.extend(event for event, _ in loaded)

    def _wait_for_version(
        self, hosted: HostedSampler, wanted: int, wait_s: float, events: list[SamplerEvent]
    ) -> None:
        deadline = time.monotonic() + wait_s
        while hosted.weights_version is None or hosted.weights_version < wanted:
            failed = [f"sync {v} was refused: {why}" for v, why in hosted.failures.items()
                      if v >= wanted]  # fmt: skip
            if failed or time.monotonic() > deadline:
                serving = hosted.weights_version
                raise WorkRejected(
                    f"min_weights_version {wanted}: the sampler serves weights version "
                    f"{serving if serving is not None else 'pinned'}"
                    + (f"; {failed[0]}" if failed else f"; no newer sync within {wait_s:g} s"),
                    field="min_weights_version",
                )
            self._read_weights_feed(timeout=0.05)
            self._catch_up(hosted, events)

    def _sampler(self, sampler_id: str, events: list[SamplerEvent]) -> HostedSampler:
        hosted = self.samplers.get(sampler_id)
        if hosted is not None:
            return hosted
        if sampler_id in self.stopped:
            raise WorkRejected(
                f"sampler {sampler_id} is stopped ({self.stopped[sampler_id]}): its engine was "
                "released; create a new run to sample",
                field="sampler_id",
            )
        t0 = time.perf_counter()
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
        engine = self._engine(base, max_seq_len=row["max_seq_len"])
        hosted = HostedSampler(
            sampler_id=sampler_id,
            run_id=row["run_id"],
            base_model=row["base_model"],
            base_dir=base,
            engine=engine,
            uri=None,
        )
        # Ready first, on the base model; the weights it then loads are a hotload like any other,
        # so every host of a sampler writes the same events in the same order.
        events.append(
            SamplerReady(
                base_model=row["base_model"],
                content_digest=engine.weights_version.digest,
                load_ms=(time.perf_counter() - t0) * 1000,
            )
        )
        events.extend(self._resume_syncs(hosted))
        start = self._newest_sync(sampler_id)
        if start is not None and start.weights_version > hosted.synced_version:
            # Applied like any sync: a refusal is reported and the sampler stays up on the
            # weights it has rather than failing every request.
            events.extend(event for event, _ in self._sync(hosted, start))
        elif hosted.good is None and "/sampler_weights/" in (row["from_checkpoint"] or ""):
            uri = row["from_checkpoint"]
            events.extend(
                self._load_for_request(hosted, self._checkpoint_id(uri), uri, weights_version=0)
            )
        self.samplers[sampler_id] = hosted
        return hosted

    def _resume_syncs(self, hosted: HostedSampler) -> list[SamplerEvent]:
        """A sampler hosted before (by this worker before a restart, or by another): serve the
        newest sync that loaded there, and keep the refused ones refused."""
        if hosted.sampler_id not in self.versions:
            return []  # no event of it in the log: never hosted
        envelopes = history(self.settings, hosted.sampler_id)
        before = previous_host(
            event
            for event in (decode_payload(e) for e in envelopes if e.type in _HOST_EVENTS)
            if isinstance(event, SamplerEvent)
        )
        hosted.failures.update(before.refused)
        hosted.synced_version = max(before.refused, default=0)
        loaded = before.loaded
        if loaded is None:
            return []
        hosted.synced_version = max(hosted.synced_version, loaded.weights_version)
        if loaded.uri is None or loaded.weights_version == 0:
            return []  # the base model or the start checkpoint: loaded already
        try:
            events = self._load(hosted, loaded.checkpoint_id, loaded.uri,
                                weights_version=loaded.weights_version)  # fmt: skip
        except HotloadError as exc:
            # Gone from the store, or the store is down: say so, and serve the base model.
            hosted.failures[loaded.weights_version] = exc.reason
            return [event for event, _ in exc.events]
        hosted.good = loaded
        return [event for event, _ in events]

    def _engine(self, base: Path, *, max_seq_len: int) -> SamplerEngineProtocol:
        return build_sampler_engine(self.settings, base, max_seq_len=max_seq_len)

    def _load_for_request(
        self,
        hosted: HostedSampler,
        checkpoint_id: str | None,
        uri: str,
        *,
        weights_version: int | None = None,
    ) -> list[SamplerEvent]:
        # Inside a request the events go out with its result; a refusal fails the request.
        try:
            events = self._load(hosted, checkpoint_id, uri, weights_version=weights_version)
        except HotloadError as exc:
            reason = f"weights {uri} refused: {exc.reason}"
            if exc.category == "server":
                # Not the request's fault: answered "failed" (retryable), as the trainer does.
                cause = exc.__cause__
                if isinstance(cause, InfrastructureError):
                    raise cause from exc
                raise RuntimeError(reason) from exc
            raise WorkRejected(reason, field="checkpoint_uri") from exc
        hosted.engine.reset_prompt_cache()  # computed with the weights just swapped out
        return [event for event, _ in events]

    def _newest_sync(self, sampler_id: str) -> WeightsReady | None:
        """The newest weight sync sent to this sampler: from the feed, which carries everything
        since this worker started, else from the read model."""
        seen = self.latest_ready.get(sampler_id)
        if seen is not None:
            return seen
        row = self.db.execute(
            f"select sampler_id, run_id, session_id, checkpoint_id, uri, content_digest, "
            f"weights_version, checkpoint_type, warmup, warmup_max_retries, reset_prompt_cache "
            f"from {self.settings.read_schema}.weight_syncs where sampler_id = %s "
            "order by weights_version desc limit 1",
            (sampler_id,),
        ).fetchone()
        return WeightsReady.model_validate(row) if row else None

    def _checkpoint_id(self, uri: str, *, workspace: str | None = None) -> str:
        """The live checkpoint `uri`. With `workspace` (a request's), only one that workspace
        may load: its own, or one published now (another's unpublished is as missing)."""
        # A client may sample a checkpoint the moment its save is answered, before the
        # projection has recorded it (the save's result and the record travel separately):
        # give the read model a moment before calling the checkpoint missing.
        deadline = time.monotonic() + RECORD_GRACE_S
        while True:
            row = self.db.execute(
                "select checkpoint_id, status, workspace_id, public "
                f"from {self.settings.read_schema}.checkpoints "
                "where uri = %s order by created_at desc limit 1",
                (uri,),
            ).fetchone()
            allowed = row is not None and (
                workspace is None
                or row["public"]
                or (row["workspace_id"] or DEFAULT_WORKSPACE) == workspace
            )
            if row is not None and row["status"] == "active" and allowed:
                return row["checkpoint_id"]
            if row is not None or time.monotonic() > deadline:
                raise WorkRejected(f"checkpoint {uri} does not exist", field="checkpoint_uri")
            time.sleep(0.02)


# The sampler events that tell what earlier hosts did with its syncs.
_HOST_EVENTS = frozenset({"WeightsLoaded", "HotloadFailed"})


def _prompt_outputs(request: Sample, scores: PromptScores, first: int) -> dict[str, Any]:
    """The prompt scores a sample request asked for, in its result; with
    prompt_logprobs_last_n, positions before `first` are None."""

    def from_first(values: list[Any]) -> list[Any]:
        return [None] * first + values[first:]

    out: dict[str, Any] = {}
    if request.prompt_logprobs:
        out["prompt_logprobs"] = from_first(scores.logprobs)
    if scores.topk is not None:
        out["topk_prompt_logprobs"] = from_first(scores.topk)
    if scores.target_logprobs is not None:
        out["target_prompt_logprobs"] = scores.target_logprobs
    if scores.alt_tokens is not None:
        out["prompt_alt_tokens"] = {"tokens": scores.alt_tokens, "logprobs": scores.alt_logprobs}
    return out


def main() -> None:
    from infra.logs import configure_logging
    from infra.settings import get_settings

    configure_logging()
    SamplerWorker(get_settings()).run()


if __name__ == "__main__":
    main()
