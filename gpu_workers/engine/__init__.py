"""Kafka-free torch engines that the trainer and sampler worker processes drive.

trainer = TrainerEngine(model_dir, max_seq_len=512, lora_rank=0, seed=0)
out = trainer.forward_backward(data, "importance_sampling")   # accumulates grads
trainer.optim_step(AdamParams(learning_rate=3e-3))             # AdamW, then zero grads
trainer.save_weights_for_sampler(folder)                       # -> Manifest (digest)
sampler = SamplerEngine(model_dir)
sampler.load_weights(folder, checkpoint_id=uri)                # verified, in place
seqs = sampler.sample(prompt_tokens, 32, SamplingParams(max_tokens=16, seed=1))
"""

from gpu_workers.engine.model_io import set_cpu_threads
from gpu_workers.engine.sampler import SamplerEngine, SamplerEngineProtocol
from gpu_workers.engine.trainer import TrainerEngine
from gpu_workers.engine.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    InvalidInputError,
    LossFn,
    OptimStepOutput,
    SampledSequence,
    SamplingParams,
    WeightsVersion,
)

__all__ = [
    "AdamParams",
    "Datum",
    "ForwardBackwardOutput",
    "InvalidInputError",
    "LossFn",
    "OptimStepOutput",
    "SampledSequence",
    "SamplerEngine",
    "SamplerEngineProtocol",
    "SamplingParams",
    "TrainerEngine",
    "WeightsVersion",
    "set_cpu_threads",
]
