"""A deployment replica: a Ray actor hosting one sampler engine (torch, or vLLM on a GPU node)
on the deployment's weights. The replica controller starts and stops it; the gateway calls
`predict` on it through its actor handle.

The actor is plain Python: Ray makes it remote at creation (`ray.remote(Replica).options(...)`
in the controller), so this file has no Ray in it and unit tests can drive it directly.

Secrets never cross Ray: the controller passes the non-secret settings a replica needs; the S3
credentials come from the node's own environment (the local head's is the stack's).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_workers.checkpoint_store import CheckpointStore
from gpu_workers.engine.sampler import SamplerEngineProtocol, build_sampler_engine
from gpu_workers.engine.types import InvalidInputError, SamplingParams
from gpu_workers.models import resolve_base_model
from gpu_workers.warmup import WarmupError, warm_up
from gpu_workers.weights_fetch import fetch_chain
from infra.s3 import ObjectStore
from infra.settings import Settings

log = logging.getLogger("loopstream.replica")

# Settings a replica takes from its controller (where the weights are, which engine); anything
# secret stays in the node's environment.
PASSED_SETTINGS = (
    "s3_endpoint",
    "s3_secure",
    "s3_region",
    "checkpoint_bucket",
    "model_root",
    "tiny_model_name",
    "torch_device",
    "sampler_engine",
    "vllm_dtype",
    "vllm_gpu_memory_utilization",
)


def replica_settings(settings: Settings) -> dict[str, str]:
    return {name: str(getattr(settings, name)) for name in PASSED_SETTINGS}


@dataclass(frozen=True)
class ReplicaSpec:
    replica_id: str
    deployment_id: str
    model_id: str
    base_model: str
    weights_uri: str | None  # None: the base model's own weights
    predict_concurrency: int
    settings: dict[str, str]
    # The share of the node's GPU this replica's engine may reserve (vLLM; from the instance type)
    gpu_memory_utilization: float | None = None


class ReplicaUnavailable(RuntimeError):
    """The replica takes no new requests; the gateway retries on another."""


def refused(reason: str, *, rolled_back: bool, serving_digest: str | None) -> dict[str, Any]:
    """`hotload`'s answer when the replica did not take the new weights and serves the ones it
    had. An answer, not an exception: a refusal is an outcome, and it crosses Ray as plain data."""
    return {"refused": True, "reason": reason, "rolled_back": rolled_back,
            "serving_digest": serving_digest}  # fmt: skip


class Replica:
    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.engine: SamplerEngineProtocol | None = None
        self.started = time.monotonic()
        self._in_flight = 0
        self._served = 0
        self._draining = False
        self._lock = threading.Lock()
        # One weight swap at a time (a restarted controller may ask again for one in flight).
        self._swap = threading.Lock()
        self.weights_uri = spec.weights_uri  # what it serves; None: the base model's own
        self._settings = Settings(**spec.settings)  # type: ignore[arg-type]

    # --- life -------------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        """Fetch and verify the deployment's weights and start the engine on them."""
        t0 = time.perf_counter()
        settings = self._settings
        base = resolve_base_model(settings, self.spec.base_model)
        engine = build_sampler_engine(
            settings,
            base,
            max_seq_len=None,
            gpu_memory_utilization=self.spec.gpu_memory_utilization,
        )
        if self.spec.weights_uri is not None:
            store = CheckpointStore(ObjectStore.from_settings(settings))
            with tempfile.TemporaryDirectory(prefix="loopstream-replica-") as tmp:
                chain = fetch_chain(store, self.spec.weights_uri, Path(tmp), serving_digest=None)
                engine.load_chain(chain.folders, checkpoint_id=self.spec.weights_uri,
                                  verified=True)  # fmt: skip
        self.engine = engine
        version = engine.weights_version
        return {
            "content_digest": version.digest,
            "checkpoint_id": version.checkpoint_id,
            "load_ms": (time.perf_counter() - t0) * 1000,
            "pid": os.getpid(),
            "node_ip": _node_ip(),
        }

    def hotload(self, uri: str, options: dict[str, Any]) -> dict[str, Any]:
        """Swap in the weights of sampler_weights checkpoint `uri` while serving (seed 002's
        hotload): fetch the chain from the digest served now (a delta needs only the links
        after it; a base is fetched whole), verify every file and link before a weight is
        touched, drop the prompt cache (`reset_prompt_cache`), and warm up (`warmup`, up to
        `warmup_max_retries` retries). Weights that fail warmup are swapped back out.

        Returns the timings, or `refused(...)` (the replica serves what it did before)."""
        with self._swap:
            engine = self.engine
            if engine is None or self._draining:
                return refused("the replica is not serving", rolled_back=False,
                               serving_digest=None)  # fmt: skip
            before = engine.weights_version
            if before.checkpoint_id == uri:  # asked again after a controller restart
                return {"content_digest": before.digest, "checkpoint_type": "unchanged",
                        "folders_applied": 0, "bytes_moved": 0, "fetch_ms": 0.0,
                        "apply_ms": 0.0, "warmup_ms": None, "warmup_attempts": 0,
                        "prompt_cache_entries_dropped": None}  # fmt: skip
            t0 = time.perf_counter()
            try:
                fetched, version = self._load_chain(engine, uri, serving_digest=before.digest)
            except Exception as exc:  # whatever loading raises is a refusal, never a dead replica
                return refused(f"{type(exc).__name__}: {exc}", rolled_back=False,
                               serving_digest=before.digest)  # fmt: skip
            apply_ms = (time.perf_counter() - t0) * 1000 - fetched.fetch_ms
            dropped = engine.reset_prompt_cache() if options.get("reset_prompt_cache") else None
            attempts, warmup_ms = 0, None
            if options.get("warmup"):
                try:
                    attempts, warmup_ms = warm_up(engine, int(options["warmup_max_retries"]))
                except WarmupError as exc:
                    self._roll_back(engine)
                    return refused(
                        f"WarmupError: {exc}",
                        rolled_back=True,
                        serving_digest=engine.weights_version.digest,
                    )
            self.weights_uri = uri
            log.info("weights hot-loaded", extra={"replica_id": self.spec.replica_id, "uri": uri})
            return {
                "content_digest": version.digest,
                "checkpoint_type": fetched.target_type,
                "folders_applied": len(fetched.folders),
                "bytes_moved": fetched.bytes_moved,
                "fetch_ms": fetched.fetch_ms,
                "apply_ms": max(apply_ms, 0.0),
                "warmup_ms": warmup_ms,
                "warmup_attempts": attempts,
                "prompt_cache_entries_dropped": dropped,
            }

    def _load_chain(
        self, engine: SamplerEngineProtocol, uri: str, *, serving_digest: str | None
    ) -> tuple[Any, Any]:
        store = CheckpointStore(ObjectStore.from_settings(self._settings))
        with tempfile.TemporaryDirectory(prefix="loopstream-replica-") as tmp:
            fetched = fetch_chain(store, uri, Path(tmp), serving_digest=serving_digest)
            # The caller drops the prompt cache (or keeps it, when the update says so).
            version = engine.load_chain(fetched.folders, checkpoint_id=uri,
                                        keep_prompt_cache=True, verified=True)  # fmt: skip
        return fetched, version

    def _roll_back(self, engine: SamplerEngineProtocol) -> None:
        """Swap back the weights served before a failed warmup: their whole chain from the store,
        or the base model's folder; drop whatever the failed weights cached."""
        if self.weights_uri is not None:
            self._load_chain(engine, self.weights_uri, serving_digest=None)
        else:
            base = resolve_base_model(self._settings, self.spec.base_model)
            engine.load_weights(base, checkpoint_id="base")
        engine.reset_prompt_cache()

    def ping(self) -> dict[str, Any]:
        version = self.engine.weights_version if self.engine else None
        return {
            "replica_id": self.spec.replica_id,
            "loaded": self.engine is not None,
            "in_flight": self._in_flight,
            "served": self._served,
            "draining": self._draining,
            "content_digest": version.digest if version else None,
        }

    def drain(self, timeout_s: float) -> int:
        """Take no new requests and wait up to `timeout_s` for the ones in flight; returns how
        many were still running when it gave up."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.engine is not None and self._in_flight == 0:
            self.engine.close()
        return self._in_flight

    # --- serving ----------------------------------------------------------------------------

    def predict(self, request: dict[str, Any]) -> dict[str, Any]:
        """One generation request (already validated by the gateway's schema): a `prompt` text
        or `prompt_tokens`, `n` samples, sampling parameters. Answers the tokens, the text and
        the weights that produced them; with `"pieces": true`, also each token's share of the
        text (`token_pieces`), for the gateway's OpenAI routes (streaming, logprobs' tokens)."""
        if self._draining:
            raise ReplicaUnavailable(f"replica {self.spec.replica_id} is draining")
        engine = self.engine
        if engine is None:
            raise ReplicaUnavailable(f"replica {self.spec.replica_id} has not loaded its weights")
        with self._lock:
            self._in_flight += 1
        try:
            return self._predict(engine, request)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._served += 1

    def _predict(self, engine: SamplerEngineProtocol, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("prompt_tokens") is not None:
            prompt = [int(t) for t in request["prompt_tokens"]]
        else:
            text = request.get("prompt") or ""
            prompt = engine.tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
            if not prompt:
                raise InvalidInputError("prompt", "must encode to at least one token")
        params = SamplingParams(
            max_tokens=request.get("max_tokens", 16),
            temperature=request.get("temperature", 1.0),
            top_p=request.get("top_p", 1.0),
            top_k=request.get("top_k", -1),
            seed=request.get("seed"),
            stop=request.get("stop") or None,
        )
        t0 = time.perf_counter()
        sequences = engine.sample(prompt, request.get("n", 1), params)
        version = sequences[0].weights_version or engine.weights_version
        decode = engine.tokenizer.decode  # type: ignore[attr-defined]
        pieces = request.get("pieces") is True
        return {
            "choices": [
                {
                    "index": i,
                    "text": seq.text,
                    "tokens": seq.tokens,
                    "logprobs": seq.logprobs if request.get("logprobs") else None,
                    "finish_reason": seq.stop_reason,
                    **({"pieces": token_pieces(decode, seq.tokens)} if pieces else {}),
                }
                for i, seq in enumerate(sequences)
            ],
            "prompt_tokens": len(prompt),
            "completion_tokens": sum(len(s.tokens) for s in sequences),
            "weights": {"checkpoint_id": version.checkpoint_id, "digest": version.digest},
            "replica_id": self.spec.replica_id,
            "compute_ms": (time.perf_counter() - t0) * 1000,
        }


def token_pieces(decode: Callable[..., str], tokens: list[int], *, context: int = 6) -> list[str]:
    """Each generated token's share of the decoded text, (N,) strings whose concatenation is
    `decode(tokens)` for the tokenizers loopstream serves (byte-level and SentencePiece), so a
    caller can stream or label text token by token without a tokenizer of its own.

    A token that ends inside a multi-byte character gets "" and the token that completes the
    character carries all of it. Each piece is decoded with up to `context` settled tokens before
    it (a SentencePiece token decoded alone loses its leading space), so this is O(N * context),
    not the O(N^2) of decoding every prefix.
    """
    pieces: list[str] = []
    settled = 0  # tokens[:settled] have their text in `pieces`
    for end in range(1, len(tokens) + 1):
        start = max(0, settled - context)
        before = decode(tokens[start:settled], skip_special_tokens=True)
        text = decode(tokens[start:end], skip_special_tokens=True)
        if (text.endswith("\ufffd") and end < len(tokens)) or not text.startswith(before):
            pieces.append("")  # an unfinished character (or a merge that rewrote the context)
            continue
        pieces.append(text[len(before) :])
        settled = end
    return pieces


def _node_ip() -> str | None:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
