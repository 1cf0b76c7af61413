"""Weight sync with base/delta chains: bytes moved per sync, and sync latency vs a raw copy.

Part 1 (in process, no Kafka): a Llama-architecture model (random init, fp32), one realistic
RL step at a time (importance-sampling policy gradient on 8 rollouts x 16 tokens, AdamW at a
full-parameter RL learning rate), then a sampler save. Bytes of a delta per codec vs a base, and
the encode (trainer) and apply (sampler: decode + digest check + swap) times.

Part 2 (the real stack): `SaveWeights` request -> `HotloadSucceeded` on the sampler, for base
saves and for delta saves (one RL-sized step between saves, outside the clock), vs a raw S3
put + get of the same files through the same store, in the same run; on the tiny model and on
`bench/llama-13m` (the 13M-parameter model of part 1, built once under the workers' model root).
No warmup on the clock (`hotload.warmup: false`); one extra sync with warmup measures it apart.
Each sync is split into phases by the timestamps and fields of its events:

    trainer   request sent -> WeightsSaved.occurred_at (delivery, save, sha256, upload)
    record    -> WeightsReady.occurred_at (trainer transaction, RecordCheckpoint to the processor)
    notify    -> HotloadStarted.occurred_at (processor transaction, sampler's weights feed)
    fetch     HotloadSucceeded.fetch_ms (download + sha256 of every file)
    apply     HotloadSucceeded.apply_ms (read, decode, digest check, swap)
    emit      the rest: the sampler's transaction and delivery of HotloadSucceeded to us

Needs the stack and services for part 2: `loopstream stack up && loopstream services up`.

    .venv/bin/python benchmarks/weight_sync_deltas.py --rounds 8 [--sync-model tiny|13m|both]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from confluent_kafka import Consumer
from rich.console import Console
from rich.table import Table
from weight_sync import events_feed  # benchmarks/weight_sync.py: every partition, from now on

from api.kafka_driver import Driver, datum, query, wait_for_result
from commands.bus import CommandBus
from commands.envelope import CommandEnvelope
from events.envelope import EventEnvelope
from gpu_workers.checkpoint_store import CheckpointRef, CheckpointStore
from gpu_workers.deltas import CODECS, DELTA_WEIGHTS_NAME, ChainHead, write_delta
from gpu_workers.engine.model_io import WEIGHTS_NAME, full_state_dict, save_weights
from gpu_workers.engine.sampler import SamplerEngine
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import AdamParams, Datum
from gpu_workers.manifest import write_manifest
from gpu_workers.tiny_model import BOS_ID, TinyModelConfig, build_byte_tokenizer, build_tiny_model
from infra.s3 import ObjectStore
from infra.settings import get_settings

RESULTS = Path(__file__).parent / "results" / "weight_sync_deltas.json"
RL_TEXT = list(b"weights move in small steps")
BENCH_MODEL = "bench/llama-13m"  # part 2's 13M model, as the workers name it: <model_root>/<name>
PHASES = ("trainer", "record", "notify", "fetch", "apply", "emit")  # of one sync, in order


def build_model(folder: Path, *, hidden: int, layers: int) -> Path:
    config = TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=8,
                             intermediate_size=hidden * 11 // 4)  # fmt: skip
    build_tiny_model(config, seed=0).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    write_manifest(folder, kind="base_model")
    return folder


def rl_step(trainer: TrainerEngine, rng: random.Random, learning_rate: float) -> None:
    """Policy gradient on 8 random rollouts of 16 tokens, advantage = reward - batch mean."""
    rollouts_G_T = [[BOS_ID, *(rng.randrange(97, 123) for _ in range(16))] for _ in range(8)]
    rewards_G = [s.count(ord("a")) / 16 for s in rollouts_G_T]
    mean = sum(rewards_G) / len(rewards_G)
    data = [
        Datum.from_tokens(
            s,
            logprobs=[float(x) for x in trainer.compute_logprobs(s)[1:]],  # on-policy
            advantages=[r - mean] * (len(s) - 1),
        )
        for s, r in zip(rollouts_G_T, rewards_G, strict=True)
    ]
    trainer.forward_backward(data, "importance_sampling")
    trainer.optim_step(AdamParams(learning_rate=learning_rate))


def bytes_per_codec(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    model_dir = build_model(tmp / "model", hidden=args.hidden, layers=args.layers)
    rng = random.Random(0)
    out: dict[str, Any] = {}
    for codec in CODECS:
        trainer = TrainerEngine(model_dir, max_seq_len=64)
        sampler = SamplerEngine(model_dir)
        base = trainer.save_weights_for_sampler(tmp / f"{codec}-base", checkpoint_type="base")
        sampler.load_weights(tmp / f"{codec}-base", checkpoint_id="base")
        sizes, encode_ms, apply_ms = [], [], []
        for step in range(args.steps):
            rl_step(trainer, rng, args.learning_rate)
            folder = tmp / f"{codec}-{step}"
            t0 = time.perf_counter()
            trainer.save_weights_for_sampler(folder, checkpoint_type="delta", codec=codec)
            encode_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            sampler.load_weights(folder, checkpoint_id=str(step))
            apply_ms.append((time.perf_counter() - t0) * 1000)
            sizes.append((folder / DELTA_WEIGHTS_NAME).stat().st_size)
        base_bytes = next(f.size_bytes for f in base.files if f.path == WEIGHTS_NAME)
        out[codec] = {
            "base_weights_bytes": base_bytes,
            "delta_bytes_mean": round(statistics.mean(sizes)),
            "delta_to_base": round(statistics.mean(sizes) / base_bytes, 3),
            "save_ms_p50": round(statistics.median(encode_ms), 1),
            "apply_ms_p50": round(statistics.median(apply_ms), 1),
        }
    out["xor_zstd_bf16"] = bf16_delta(model_dir, args, tmp)
    params = sum(p.numel() for p in TrainerEngine(model_dir).model.parameters())
    return {"parameters": params, "learning_rate": args.learning_rate, "codecs": out}


def bf16_delta(model_dir: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The same steps with the sampler weights cast to bf16, as GPU samplers usually serve them:
    a step at a small learning rate is below bf16's resolution for most weights."""
    trainer = TrainerEngine(model_dir, max_seq_len=64)
    rng = random.Random(0)

    def bf16_state() -> dict[str, torch.Tensor]:
        return {k: v.to(torch.bfloat16) for k, v in full_state_dict(trainer.model).items()}

    state = bf16_state()
    save_weights(state, tmp / "bf16-base.safetensors")
    head = ChainHead(state=state, folder_digest="", uri="", position=0, base_digest="")
    sizes = []
    for step in range(args.steps):
        rl_step(trainer, rng, args.learning_rate)
        new = bf16_state()
        write_delta(tmp / f"bf16-{step}", parent=head, state=new)
        sizes.append((tmp / f"bf16-{step}" / DELTA_WEIGHTS_NAME).stat().st_size)
        head = ChainHead(state=new, folder_digest="", uri="", position=step + 1, base_digest="")
    base_bytes = (tmp / "bf16-base.safetensors").stat().st_size
    return {
        "base_weights_bytes": base_bytes,
        "delta_bytes_mean": round(statistics.mean(sizes)),
        "delta_to_base": round(statistics.mean(sizes) / base_bytes, 3),
        "save_ms_p50": None,
        "apply_ms_p50": None,
    }


# ------------------------------------------------------------------ part 2: the real stack


@dataclass
class SyncEvents:
    """The events of one sync, as they arrive on the feed (wall-clock times in seconds)."""

    saved_at: float | None = None  # WeightsSaved: the trainer has saved and uploaded
    ready_at: float | None = None  # WeightsReady: the processor has recorded the checkpoint
    started_at: float | None = None  # HotloadStarted: the sampler begins
    done: dict[str, Any] | None = None  # HotloadSucceeded's payload
    done_at: float | None = None  # perf_counter when HotloadSucceeded reached us

    @property
    def complete(self) -> bool:
        times = (self.saved_at, self.ready_at, self.started_at, self.done_at)
        return all(t is not None for t in times)


def wait_for_hotload(feed: Consumer, sampler_id: str, uri: str) -> SyncEvents:
    """The sync's events, until HotloadSucceeded has come and every earlier one was seen.

    One `poll` per message: it returns as soon as one is there, where `consume(n, timeout)`
    waits out its timeout for n messages and would add that wait to the clock."""
    seen = SyncEvents()
    deadline = None
    while not seen.complete:
        if deadline is not None and time.perf_counter() > deadline:
            raise TimeoutError(f"{uri}: HotloadSucceeded came but not all earlier events")
        message = feed.poll(0.1)
        if message is None or message.error():
            continue
        received = time.perf_counter()
        kind = dict(message.headers() or []).get("event_type")
        if kind not in (b"WeightsSaved", b"WeightsReady", b"HotloadStarted",
                        b"HotloadSucceeded", b"HotloadFailed"):  # fmt: skip
            continue
        envelope = EventEnvelope.from_bytes(message.value())
        if envelope.payload.get("uri") != uri:
            continue
        at = envelope.occurred_at.timestamp()
        if kind == b"WeightsSaved":
            seen.saved_at = at
        elif kind == b"WeightsReady":
            seen.ready_at = at
        elif envelope.aggregate_id == sampler_id and kind == b"HotloadStarted":
            seen.started_at = at
        elif envelope.aggregate_id == sampler_id:
            assert kind == b"HotloadSucceeded", envelope.payload
            seen.done, seen.done_at = envelope.payload, received
            deadline = received + 5  # the others were committed before it
    return seen


def bench_model(settings) -> str:  # type: ignore[no-untyped-def]
    """`bench/llama-13m` under the workers' model root, built once (into a staging folder
    renamed into place, so a worker never sees half a model)."""
    folder = settings.model_root / BENCH_MODEL
    if not (folder / "manifest.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            build_model(Path(tmp) / "model", hidden=512, layers=4).rename(folder)
    return BENCH_MODEL


def new_loop_on(settings, base_model: str) -> tuple[Driver, str, str, str]:  # type: ignore[no-untyped-def]
    """`api.kafka_driver.new_loop` on any base model: (driver, session, run, sampler) ids."""
    driver = Driver(settings)
    session_id, run_id, sampler_id = (f"{p}{uuid.uuid4().hex[:8]}" for p in ("s", "r", "p"))
    driver.ok("commands", "CreateSession", session_id, {"base_model": base_model})
    driver.ok("commands", "CreateRun", session_id,
              {"run_id": run_id, "sampler_id": sampler_id, "max_seq_len": 64})  # fmt: skip
    for _ in range(100):  # the workers find runs in the read model
        if query(settings, "select 1 from {schema}.samplers where sampler_id = %s", sampler_id):
            break
        time.sleep(0.05)
    return driver, session_id, run_id, sampler_id


def raw_put_get_ms(store: CheckpointStore, uri: str) -> float:
    """The same files up and down through the same store, one after the other, no checks."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        store.download(CheckpointRef.from_uri(uri), folder)
        files = [f for f in folder.iterdir() if f.is_file()]
        t0 = time.perf_counter()
        for f in files:
            key = f"bench/raw/{uuid.uuid4().hex}/{f.name}"
            store.store.put_bytes(key, f.read_bytes())
            store.store.get_bytes(key)
        elapsed = (time.perf_counter() - t0) * 1000
        store.store.delete_prefix("bench/raw/")
    return elapsed


def breakdown(seen: SyncEvents, sent_at: float, sync_ms: float) -> dict[str, float]:
    """Where one sync's time went, in ms; `emit` is what the other phases leave."""
    assert seen.done is not None
    phases = {
        "trainer": (seen.saved_at - sent_at) * 1000,  # type: ignore[operator]
        "record": (seen.ready_at - seen.saved_at) * 1000,  # type: ignore[operator]
        "notify": (seen.started_at - seen.ready_at) * 1000,  # type: ignore[operator]
        "fetch": seen.done["fetch_ms"],
        "apply": seen.done["apply_ms"],
    }
    return {**phases, "emit": sync_ms - sum(phases.values())}


def sync_latency(rounds: int, base_model: str) -> dict[str, Any]:
    settings = get_settings()
    driver, session_id, run_id, sampler_id = new_loop_on(settings, base_model)
    store = CheckpointStore(ObjectStore.from_settings(settings))
    bus = CommandBus(settings)
    feed = events_feed(settings)

    def sync(name: str, checkpoint_type: str, *, warmup: bool = False) -> dict[str, Any]:
        """One RL step (off the clock), then SaveWeights -> HotloadSucceeded, timed."""
        driver.ok("trainer-requests", "ForwardBackward", run_id, {"data": [datum(RL_TEXT)]})
        driver.ok("trainer-requests", "OptimStep", run_id,
                  {"adam_params": {"learning_rate": 1e-5}})  # fmt: skip
        request = CommandEnvelope(
            command_id=str(uuid.uuid4()), type="SaveWeights", aggregate_id=run_id,
            payload={"name": name, "checkpoint_type": checkpoint_type,
                     "hotload": {"warmup": warmup}},
        )  # fmt: skip
        uri = f"bt://loops:{run_id}/sampler_weights/{name}"
        sent_at, started = time.time(), time.perf_counter()
        bus.send(request, to="trainer-requests")
        seen = wait_for_hotload(feed, sampler_id, uri)
        sync_ms = (seen.done_at - started) * 1000  # type: ignore[operator]
        assert wait_for_result(settings, request.command_id)["status"] == "accepted"
        assert seen.done is not None
        return {"sync_ms": sync_ms, "uri": uri, "bytes_moved": seen.done["bytes_moved"],
                "phases": breakdown(seen, sent_at, sync_ms), "hotload": seen.done}  # fmt: skip

    # Host the sampler (it loads the base model) before any clock runs.
    driver.ok("sampler-requests", "Sample", sampler_id, {"prompt": "a", "max_tokens": 1})
    out: dict[str, Any] = {"base_model": base_model}
    p50 = statistics.median
    for checkpoint_type in ("base", "delta"):
        sync(f"{checkpoint_type}-0", checkpoint_type)  # the first of each kind warms up
        syncs, raw_ms = [], []
        for i in range(1, rounds + 1):  # each sync, then its raw copy: the same conditions
            syncs.append(sync(f"{checkpoint_type}-{i}", checkpoint_type))
            raw_ms.append(raw_put_get_ms(store, syncs[-1]["uri"]))
        sync_ms = [s["sync_ms"] for s in syncs]
        out[checkpoint_type] = {
            "bytes_moved_mean": round(statistics.mean(s["bytes_moved"] for s in syncs)),
            "sync_ms_p50": round(p50(sync_ms), 1),
            "raw_s3_put_get_ms_p50": round(p50(raw_ms), 1),
            "ratio_sync_to_raw": round(p50(sync_ms) / p50(raw_ms), 2),
            "phases_ms_p50": {
                phase: round(p50(s["phases"][phase] for s in syncs), 1) for phase in PHASES
            },
        }
    warm = sync("warmup-0", "delta", warmup=True)["hotload"]
    out["warmup"] = {"warmup_ms": round(warm["warmup_ms"], 1), "attempts": warm["warmup_attempts"]}
    feed.close()
    driver.ok("commands", "EndSession", session_id, {})  # frees the workers' engines
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8, help="end-to-end syncs per kind")
    parser.add_argument("--sync-model", choices=("tiny", "13m", "both"), default="both",
                        help="the base model(s) of part 2")  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="RL steps per codec (part 1)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        codecs = bytes_per_codec(args, Path(tmp))
    settings = get_settings()
    models = {"tiny": settings.tiny_model_name, "13m": BENCH_MODEL}
    sizes = list(models) if args.sync_model == "both" else [args.sync_model]
    if "13m" in sizes:
        bench_model(settings)
    latency = {size: sync_latency(args.rounds, models[size]) for size in sizes}
    figures = {"bytes_per_sync": codecs, "sync_latency": latency}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")

    title = f"one RL step, {codecs['parameters']:,} params, lr {args.learning_rate}"
    table = Table("codec", "delta/base bytes", "save ms", "apply ms", title=title)
    for codec, row in codecs["codecs"].items():
        table.add_row(codec, str(row["delta_to_base"]), str(row["save_ms_p50"]),
                      str(row["apply_ms_p50"]))  # fmt: skip
    Console().print(table)
    table = Table("model", "kind", "bytes moved", "sync ms p50", "raw S3 ms p50", "ratio",
                  title="SaveWeights -> HotloadSucceeded vs raw S3 put+get")  # fmt: skip
    phases = Table("model", "kind", *PHASES, title="where a sync's time goes (ms, p50 each)")
    for size, result in latency.items():
        for kind in ("base", "delta"):
            row = result[kind]
            columns = ("bytes_moved_mean", "sync_ms_p50", "raw_s3_put_get_ms_p50",
                       "ratio_sync_to_raw")  # fmt: skip
            table.add_row(size, kind, *(str(row[c]) for c in columns))
            phases.add_row(size, kind, *(str(row["phases_ms_p50"][p]) for p in PHASES))
    Console().print(table)
    Console().print(phases)
    for size, result in latency.items():
        Console().print(f"{size}: one delta sync with warmup: {result['warmup']}")


if __name__ == "__main__":
    main()
