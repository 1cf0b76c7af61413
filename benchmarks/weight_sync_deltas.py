"""Weight sync with base/delta chains: bytes moved per sync, and sync latency vs a raw copy.

Part 1 (in process, no Kafka): a Llama-architecture model (random init, fp32), one realistic
RL step at a time (importance-sampling policy gradient on 8 rollouts x 16 tokens, AdamW at a
full-parameter RL learning rate), then a sampler save. Bytes of a delta per codec vs a base, and
the encode (trainer) and apply (sampler: decode + digest check + swap) times.

Part 2 (the real stack): `SaveWeights` request -> `HotloadSucceeded` on the sampler, for base
saves and for delta saves of the tiny model (one RL-sized step between saves, outside the
clock), vs a raw S3 put + get of the same files through the same store, in the same run.

Needs the stack and services for part 2: `loopstream stack up && loopstream services up`.

    .venv/bin/python benchmarks/weight_sync_deltas.py --rounds 8
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from confluent_kafka import Consumer
from rich.console import Console
from rich.table import Table

from api.kafka_driver import datum, new_loop, wait_for_result
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
        base = trainer.save_weights_for_sampler(tmp / f"{codec}-base", codec=codec)
        sampler.load_weights(tmp / f"{codec}-base", checkpoint_id="base")
        sizes, encode_ms, apply_ms = [], [], []
        for step in range(args.steps):
            rl_step(trainer, rng, args.learning_rate)
            folder = tmp / f"{codec}-{step}"
            t0 = time.perf_counter()
            trainer.save_weights_for_sampler(folder, codec=codec)
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


def events_feed(settings) -> Consumer:  # type: ignore[no-untyped-def]
    from confluent_kafka import OFFSET_END

    from events.kafka_log import assign_all, consumer_config

    topic = settings.topic("events")
    consumer = Consumer(consumer_config(settings, group_id=f"bench-delta-{uuid.uuid4().hex}"))
    assign_all(consumer, settings, topic, OFFSET_END)
    consumer.consume(1, timeout=1)  # settle the assignment before the clock starts
    return consumer


def wait_for_hotload(feed: Consumer, sampler_id: str, uri: str) -> tuple[float, dict]:
    while True:
        for message in feed.consume(100, timeout=0.05):
            kind = dict(message.headers() or []).get("event_type")
            if message.error() or kind not in (b"HotloadSucceeded", b"HotloadFailed"):
                continue
            envelope = EventEnvelope.from_bytes(message.value())
            if envelope.aggregate_id == sampler_id and envelope.payload["uri"] == uri:
                assert kind == b"HotloadSucceeded", envelope.payload
                return time.perf_counter(), envelope.payload


def sync_latency(rounds: int) -> dict[str, Any]:
    settings = get_settings()
    driver, _, run_id, sampler_id = new_loop(settings)
    store = CheckpointStore(ObjectStore.from_settings(settings))
    bus = CommandBus(settings)
    feed = events_feed(settings)
    out: dict[str, Any] = {}
    for checkpoint_type in ("base", "delta"):
        sync_ms, raw_ms, moved = [], [], []
        for i in range(rounds + 1):  # round 0 of each kind warms up (and hosts the sampler)
            driver.ok("trainer-requests", "ForwardBackward", run_id, {"data": [datum(RL_TEXT)]})
            driver.ok("trainer-requests", "OptimStep", run_id,
                      {"adam_params": {"learning_rate": 1e-5}})  # fmt: skip
            if i == 0:
                driver.ok(
                    "sampler-requests", "Sample", sampler_id, {"prompt": "a", "max_tokens": 1}
                )
            name = f"{checkpoint_type}-{i}"
            request = CommandEnvelope(
                command_id=str(uuid.uuid4()), type="SaveWeights", aggregate_id=run_id,
                payload={"name": name, "checkpoint_type": checkpoint_type},
            )  # fmt: skip
            uri = f"bt://loops:{run_id}/sampler_weights/{name}"
            started = time.perf_counter()
            bus.send(request, to="trainer-requests")
            done_at, hotload = wait_for_hotload(feed, sampler_id, uri)
            assert wait_for_result(settings, request.command_id)["status"] == "accepted"
            if i == 0:
                continue
            sync_ms.append((done_at - started) * 1000)
            moved.append(hotload["bytes_moved"])
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) / "ckpt"
                store.download(CheckpointRef.from_uri(uri), folder)
                files = [f for f in folder.iterdir() if f.is_file()]
                t0 = time.perf_counter()
                for f in files:  # raw: the same bytes up and down through the same store
                    key = f"bench/raw/{uuid.uuid4().hex}/{f.name}"
                    store.store.put_bytes(key, f.read_bytes())
                    store.store.get_bytes(key)
                raw_ms.append((time.perf_counter() - t0) * 1000)
        out[checkpoint_type] = {
            "bytes_moved_mean": round(statistics.mean(moved)),
            "sync_ms_p50": round(statistics.median(sync_ms), 1),
            "raw_s3_put_get_ms_p50": round(statistics.median(raw_ms), 1),
            "ratio_sync_to_raw": round(statistics.median(sync_ms) / statistics.median(raw_ms), 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8, help="end-to-end syncs per kind")
    parser.add_argument("--steps", type=int, default=5, help="RL steps per codec (part 1)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        codecs = bytes_per_codec(args, Path(tmp))
    figures = {"bytes_per_sync": codecs, "sync_latency_tiny_model": sync_latency(args.rounds)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")

    title = f"one RL step, {codecs['parameters']:,} params, lr {args.learning_rate}"
    table = Table("codec", "delta/base bytes", "save ms", "apply ms", title=title)
    for codec, row in codecs["codecs"].items():
        table.add_row(codec, str(row["delta_to_base"]), str(row["save_ms_p50"]),
                      str(row["apply_ms_p50"]))  # fmt: skip
    Console().print(table)
    table = Table("kind", "bytes moved", "sync ms p50", "raw S3 ms p50", "ratio",
                  title="SaveWeights -> HotloadSucceeded vs raw S3 put+get")  # fmt: skip
    for kind, row in figures["sync_latency_tiny_model"].items():
        table.add_row(kind, str(row["bytes_moved_mean"]), str(row["sync_ms_p50"]),
                      str(row["raw_s3_put_get_ms_p50"]), str(row["ratio_sync_to_raw"]))  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
