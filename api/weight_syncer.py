"""WeightSyncer: save sampler checkpoints and sync them to the sampler, tracking the base/delta
chain (seed 002; the names, defaults and returns are the seed's).

    syncer = WeightSyncer(trainer, deploy_mgr=service)
    syncer.wait_for_hotload_ready()
    for step in range(steps):
        ...train...
        syncer.save_and_hotload(f"step-{step}")   # base first, then deltas; raises on failure

Two kinds of target:
- the run's paired sampler (the default; `deployment_id` may name it): the deployment manager
  is the `ServiceClient`, and the sampler's progress is read from the numbered syncs
  (`GET /v1/loops/samplers/{id}/syncs`);
- a deployment of a model (`/v1/models`): `deployment_id="<model_id>/<deployment_id>"` (or
  `deployment_id=..., model_id=...`), with a `DeploymentsClient` or `ServiceClient` as
  deploy_mgr. Each sync is `POST .../deployments/{id}/weights`; every ready replica hot-loads
  it and the syncer waits until each serves it or refused it (`GET .../weights`).

Every call is a REST request.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal, get_args

from api.client import (
    Json,
    RequestFailedError,
    ServiceClient,
    TrainingClient,
)
from api.deploy_client import DeploymentsClient
from commands.loops import HotloadOptions
from commands.work import DEFAULT_COMPRESSION_FORMAT, CompressionFormat

log = logging.getLogger("loopstream.weight_syncer")

CheckpointType = Literal["base", "delta"]
# How often the sync state is read while waiting for a hotload.
SYNC_POLL_S = 0.05


class HotloadFailedError(Exception):
    """The sampler (or a deployment's replica) refused the new weights; it keeps serving the
    previous ones."""

    def __init__(self, snapshot_name: str, weights_version: int, reason: str) -> None:
        super().__init__(f"hotload of {snapshot_name!r} (sync {weights_version}) failed: {reason}")
        self.snapshot_name = snapshot_name
        self.weights_version = weights_version
        self.reason = reason


class WeightSyncer:
    def __init__(
        self,
        policy_client: TrainingClient,
        deploy_mgr: ServiceClient | DeploymentsClient | None = None,
        deployment_id: str | None = None,
        base_model: str = "",
        hotload_timeout: int = 600,
        first_checkpoint_type: str = "base",
        compression_format: str = DEFAULT_COMPRESSION_FORMAT,
        warmup_after_hotload: bool = True,
        warmup_max_retries: int = 10,
        reset_prompt_cache: bool = True,
        lora_rank: int = 0,
        *,
        model_id: str | None = None,
    ) -> None:
        if first_checkpoint_type not in ("base", "delta"):
            raise ValueError(
                f"first_checkpoint_type must be 'base' or 'delta', got {first_checkpoint_type!r}"
            )
        if compression_format not in get_args(CompressionFormat):
            raise ValueError(
                f"compression_format {compression_format!r} is not one of "
                f"{list(get_args(CompressionFormat))}"
            )
        if hotload_timeout <= 0:
            raise ValueError(f"hotload_timeout must be > 0 seconds, got {hotload_timeout}")
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        # A deployment of a model: "<model_id>/<deployment_id>", or model_id= beside it.
        if deployment_id is not None and "/" in deployment_id and model_id is None:
            model_id, _, deployment_id = deployment_id.partition("/")
        if model_id is not None:
            if not model_id or not deployment_id or "/" in deployment_id:
                raise ValueError(
                    f"deployment_id {deployment_id!r}: name a model's deployment as "
                    "'<model_id>/<deployment_id>', or give model_id= and deployment_id="
                )
            if deploy_mgr is None:
                raise ValueError("deploy_mgr: a DeploymentsClient or ServiceClient is needed to "
                                 "sync weights into a deployment")  # fmt: skip
        elif deployment_id is not None and deployment_id != policy_client.sampler_id:
            raise ValueError(
                f"deployment_id {deployment_id!r}: a run's weights sync to its paired sampler "
                f"{policy_client.sampler_id!r}, or to a deployment named "
                "'<model_id>/<deployment_id>'"
            )
        self.policy_client = policy_client
        self.deploy_mgr = deploy_mgr
        self.model_id = model_id  # None: the paired sampler
        self.deployment_id = deployment_id if model_id is not None else policy_client.sampler_id
        self._deployments: DeploymentsClient | None = None
        if model_id is not None:
            self._deployments = (
                deploy_mgr if isinstance(deploy_mgr, DeploymentsClient)
                else DeploymentsClient(deploy_mgr)  # type: ignore[arg-type]
            )  # fmt: skip
        self.base_model = base_model
        self.hotload_timeout = hotload_timeout
        self.first_checkpoint_type: CheckpointType = first_checkpoint_type  # type: ignore[assignment]
        self.compression_format: CompressionFormat = compression_format  # type: ignore[assignment]
        self.lora_rank = lora_rank
        self.options = HotloadOptions(
            warmup=warmup_after_hotload,
            warmup_max_retries=warmup_max_retries,
            reset_prompt_cache=reset_prompt_cache,
        )
        if base_model:
            run = policy_client.service.get_run(policy_client.run_id)
            if run["base_model"] != base_model:
                raise ValueError(
                    f"base_model {base_model!r}: run {policy_client.run_id} trains "
                    f"{run['base_model']!r}"
                )
        # Whether the next save continues a chain (delta) or starts one (base).
        self._chain_started = False
        self.last_weights_version: int | None = None  # of the last successful sync

    # --- the seed's methods ---------------------------------------------------------------------

    def save_and_hotload(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """Save sampler weights and sync them to the sampler: a base first, deltas after
        (LoRA: always base). Returns the snapshot name once the sampler serves it; raises
        RequestFailedError (save refused), HotloadFailedError or TimeoutError. Without a
        deploy_mgr it only saves."""
        kind = self._next_type(checkpoint_type)
        sync = self.deploy_mgr is not None
        to_sampler = sync and self._deployments is None
        future = self.policy_client.save_weights_for_sampler(
            name,
            checkpoint_type=kind,
            compression_format=self.compression_format,
            hotload=self.options if to_sampler else False,
        )
        future.result(timeout=self.hotload_timeout)
        self._chain_started = True
        if to_sampler:
            self._wait_for_sync(name, request_id=future.request_id)
        elif sync:
            self._sync_deployment(name)
        return name

    def save_only(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """Save sampler weights without syncing them (sync later with `hotload`). Returns the
        snapshot name, or None when the save was refused (the reason is logged)."""
        kind = self._next_type(checkpoint_type)
        future = self.policy_client.save_weights_for_sampler(
            name, checkpoint_type=kind, compression_format=self.compression_format, hotload=False
        )
        try:
            future.result(timeout=self.hotload_timeout)
        except (RequestFailedError, TimeoutError) as exc:
            # The reason in the message itself: the default log format drops `extra`.
            log.warning(
                "save_only of %s failed: %s",
                name,
                exc,
                extra={"snapshot": name, "reason": str(exc)},
            )
            return None
        self._chain_started = True
        return name

    def hotload(self, snapshot_name: str, checkpoint_type: str) -> bool:
        """Sync a saved snapshot to the sampler. True once the sampler serves it; False when
        the sync was refused, failed or timed out (the reason is logged)."""
        if self.deploy_mgr is None:
            raise RuntimeError("no deploy_mgr: this WeightSyncer does not sync weights")
        if self._deployments is not None:
            if checkpoint_type not in ("base", "delta"):
                raise ValueError(
                    f"checkpoint_type must be 'base' or 'delta', got {checkpoint_type!r}"
                )
            try:
                self._sync_deployment(snapshot_name)
            except (RequestFailedError, HotloadFailedError, TimeoutError) as exc:
                log.warning("hotload of %s into %s failed: %s", snapshot_name,
                            self.deployment_id, exc,
                            extra={"snapshot": snapshot_name, "reason": str(exc)})  # fmt: skip
                return False
            return True
        try:
            future = self.policy_client.hotload(
                snapshot_name, checkpoint_type=checkpoint_type, options=self.options
            )
            future.result(timeout=self.hotload_timeout)
            self._wait_for_sync(snapshot_name, request_id=future.request_id)
        except (RequestFailedError, HotloadFailedError, TimeoutError) as exc:
            log.warning(
                "hotload of %s failed: %s",
                snapshot_name,
                exc,
                extra={"snapshot": snapshot_name, "reason": str(exc)},
            )
            return False
        return True

    def check_deployment_state(self) -> Json:
        """The sampler's weight-sync state: ready, serving_version/checkpoint/digest,
        target_version, pending, and the last hotload's status and reason. For a deployment:
        the target weights and, per replica, the version and digest it serves and its last
        hotload (`ready`: some replica is READY; `synced`: every READY one serves the target)."""
        if self._deployments is not None:
            assert self.model_id is not None
            return self._deployments.get_weights(self.model_id, self.deployment_id)
        return self._deploy_mgr().get_sampler_weights(self.deployment_id)

    def wait_for_hotload_ready(self, timeout_s: float = 300, poll_interval_s: float = 5) -> Json:
        """Block until a worker hosts the sampler (syncs reach it from then on); returns the
        state. TimeoutError after `timeout_s`. Checks at once, then at growing intervals (from
        50 ms, doubling) up to `poll_interval_s`: a sampler a worker picks up within a second of
        its creation costs that second, not a whole interval. For a deployment: until some
        replica is READY and every READY replica serves the target weights."""
        deadline = time.monotonic() + timeout_s
        delay_s = min(0.05, poll_interval_s)
        while True:
            state = self.check_deployment_state()
            if state["ready"] and state.get("synced", True):
                return state
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"sampler {self.deployment_id} not ready after {timeout_s}s: {state}"
                )
            time.sleep(min(delay_s, max(0.0, deadline - time.monotonic())))
            delay_s = min(delay_s * 2, poll_interval_s)

    def reset_delta_chain(self) -> None:
        """The next save is a base. Call it when the sampler or the trainer session changes,
        or the next delta could name a base the sampler never loaded."""
        self._chain_started = False

    # --- internals ------------------------------------------------------------------------------

    def _next_type(self, requested: str | None) -> CheckpointType:
        if requested is not None and requested not in ("base", "delta"):
            raise ValueError(f"checkpoint_type must be 'base' or 'delta', got {requested!r}")
        if self.lora_rank > 0:
            return "base"  # a LoRA export is a standalone adapter: no chain
        if requested is not None:
            return requested  # type: ignore[return-value]
        return "delta" if self._chain_started else self.first_checkpoint_type

    def _deploy_mgr(self) -> ServiceClient:
        if self.deploy_mgr is None:
            raise RuntimeError("no deploy_mgr: this WeightSyncer does not sync weights")
        return self.deploy_mgr

    def _sync_deployment(self, name: str) -> Json:
        """Send the snapshot to the deployment and wait until every READY replica serves it
        (returns the state), or one refused it and none is still loading (HotloadFailedError
        with the reasons; a refused version is tried on no other replica)."""
        deployments, model_id = self._deployments, self.model_id
        assert deployments is not None and model_id is not None
        uri = f"bt://loops:{self.policy_client.run_id}/sampler_weights/{name}"
        future = deployments.update_weights(
            model_id, self.deployment_id, uri, warmup=self.options.warmup,
            warmup_max_retries=self.options.warmup_max_retries,
            reset_prompt_cache=self.options.reset_prompt_cache,
        )  # fmt: skip
        future.result(timeout=self.hotload_timeout)
        # The update's place in the model's log: the read model has it once its version is there.
        sequence = max((e["sequence"] for e in future.poll().get("events") or ()), default=0)
        deadline = time.monotonic() + self.hotload_timeout
        while True:
            state = deployments.get_weights(model_id, self.deployment_id)
            version = state["target"]["weights_version"]
            if state["version"] >= sequence and state["target"]["checkpoint_uri"] == uri:
                ready = [r for r in state["replicas"] if r["status"] == "READY"]
                refused = [
                    f"replica {r['replica_id']}: {r['hotload_reason']}" for r in ready
                    if r["hotload_status"] == "FAILED" and r["hotload_weights_version"] == version
                ]  # fmt: skip
                loading = any(r["hotload_status"] == "LOADING" for r in ready)
                if refused and not loading:  # the others' hotloads in flight are done too
                    raise HotloadFailedError(name, version, "; ".join(refused))
                if all(r["weights_version"] >= version for r in ready):
                    self.last_weights_version = version
                    return state
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"hotload of {name!r} into {model_id}/{self.deployment_id} not done after "
                    f"{self.hotload_timeout}s: {state}"
                )
            time.sleep(SYNC_POLL_S)

    def _wait_for_sync(self, name: str, *, request_id: str) -> dict[str, Any]:
        """Wait until the sync `request_id` caused is succeeded or failed on the sampler."""
        deploy_mgr = self._deploy_mgr()
        deadline = time.monotonic() + self.hotload_timeout
        while True:
            syncs = deploy_mgr.list_weight_syncs(self.deployment_id, request_id=request_id, limit=1)
            if syncs and syncs[0]["status"] == "succeeded":
                self.last_weights_version = syncs[0]["weights_version"]
                return syncs[0]
            if syncs and syncs[0]["status"] == "failed":
                raise HotloadFailedError(name, syncs[0]["weights_version"], syncs[0]["reason"])
            if time.monotonic() >= deadline:
                status = syncs[0]["status"] if syncs else "not recorded yet"
                raise TimeoutError(
                    f"hotload of {name!r} not done after {self.hotload_timeout}s ({status})"
                )
            time.sleep(SYNC_POLL_S)
