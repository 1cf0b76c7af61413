"""Resume checkpoints: the pieces of a trainer state folder beyond the engine's own tensors.

A trainer state folder (`TrainerEngine.save_state`) holds everything needed to continue a run as
if it had never stopped. Format v2:

    manifest.json          sha256 + size of every file below (kind "state")
    trainer_state.json     format, step, LoRA settings, AdamW param groups, RNG states, the
                           caller's loader_state, torch version
    dcp/.metadata          torch.distributed.checkpoint: the index of the tensors below
    dcp/__0_0.distcp       trainable parameters ("model.<fqn>") and AdamW moments
                           ("optim.<fqn>.{step,exp_avg,exp_avg_sq}"), keyed by parameter FQN
    adapter_config.json    LoRA runs only: the peft adapter config
    config.json, tokenizer files   the base model's, so the folder describes itself

Only tensors go into the DCP files; everything else is JSON. DCP reads its `.metadata` with
pickle and non-tensor entries with `torch.load(weights_only=False)`, so this module reads the
index with an unpickler that builds nothing but DCP's own metadata classes and refuses non-tensor
entries: loading a state folder runs no code from the folder, as with the v1 safetensors files.

v1 folders (`model.safetensors` or `adapter_model.safetensors`, `optimizer.safetensors`) still
load; they carry no RNG states and no loader_state.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from gpu_workers.engine.types import InvalidInputError

TRAINER_STATE_NAME = "trainer_state.json"
STATE_FORMAT_V1 = "loopstream.trainer_state/v1"
STATE_FORMAT = "loopstream.trainer_state/v2"
DCP_FOLDER = "dcp"  # the torch distributed checkpoint, inside the state folder
MAX_LOADER_STATE_BYTES = 64 * 1024  # a data position, not a data set: it travels in JSON


def check_loader_state(loader_state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The caller's data position as it will come back from `load_state`, or InvalidInputError."""
    if loader_state is None:
        return None
    if not isinstance(loader_state, Mapping):
        raise InvalidInputError(
            "loader_state", f"must be a dict, got {type(loader_state).__name__}"
        )
    try:
        text = json.dumps(loader_state, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError("loader_state", f"must be JSON-serialisable: {exc}") from exc
    size = len(text.encode())
    if size > MAX_LOADER_STATE_BYTES:
        raise InvalidInputError(
            "loader_state",
            f"is {size} bytes as JSON, more than the {MAX_LOADER_STATE_BYTES} allowed",
        )
    decoded = json.loads(text)
    if decoded != loader_state:
        raise InvalidInputError(
            "loader_state",
            "would not come back equal from JSON: use str keys and lists, not tuples",
        )
    return decoded


# ---------------------------------------------------------------------- RNG states


@dataclass(frozen=True)
class RngState:
    """torch's CPU generator state, and each CUDA device's where CUDA is in use."""

    torch_cpu: torch.Tensor  # uint8, as torch.get_rng_state() returns it
    torch_cuda: tuple[torch.Tensor, ...] = ()  # one per device; empty without CUDA

    @classmethod
    def capture(cls) -> RngState:
        cuda: tuple[torch.Tensor, ...] = ()
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # never start CUDA here
            cuda = tuple(torch.cuda.get_rng_state_all())
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        """Put the generators back as they were; CUDA devices this host lacks are skipped."""
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda and torch.cuda.is_available():
            for device, state in enumerate(self.torch_cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, device)

    def to_json(self) -> dict[str, Any]:
        return {
            "torch_cpu": _b64(self.torch_cpu),
            "torch_cuda": [_b64(s) for s in self.torch_cuda],
        }

    @classmethod
    def from_json(cls, doc: Any) -> RngState:
        try:
            cpu = _from_b64(doc["torch_cpu"])
            cuda = tuple(_from_b64(s) for s in doc.get("torch_cuda", []))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise InvalidInputError("checkpoint", f"unreadable RNG state: {exc!r}") from exc
        if cpu.numel() != torch.get_rng_state().numel():
            raise InvalidInputError(
                "checkpoint", f"a CPU RNG state of {cpu.numel()} bytes; this torch's differs"
            )
        return cls(cpu, cuda)


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _from_b64(text: str) -> torch.Tensor:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


# ---------------------------------------------------------------------- AdamW param groups


def param_groups_to_json(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FQN-keyed param groups (hyper-parameters + parameter names) as plain JSON values."""
    return json.loads(json.dumps(groups, allow_nan=False))


def param_groups_from_json(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # JSON has no tuples; torch's optimizers keep betas as one.
    return [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in groups
    ]


# ---------------------------------------------------------------------- trainer_state.json


def write_trainer_state(folder: Path, state: Mapping[str, Any]) -> None:
    doc = {"format": STATE_FORMAT, **state}
    (folder / TRAINER_STATE_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """trainer_state.json of a v1 or v2 folder (its `format` says which)."""
    try:
        state = json.loads((folder / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError("checkpoint", f"unreadable {TRAINER_STATE_NAME}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") not in (STATE_FORMAT_V1, STATE_FORMAT):
        found = state.get("format") if isinstance(state, dict) else None
        raise InvalidInputError("checkpoint", f"unknown trainer state format {found!r}")
    required = ["step", "lora_rank"] + (["rng"] if state["format"] == STATE_FORMAT else [])
    if missing := [k for k in required if k not in state]:
        raise InvalidInputError("checkpoint", f"{TRAINER_STATE_NAME} lacks {missing}")
    if not isinstance(state.get("loader_state"), dict | None):
        raise InvalidInputError("checkpoint", "loader_state is not a JSON object")
    return state


# ---------------------------------------------------------------------- DCP files


def save_dcp(tensors: dict[str, Any], folder: Path) -> None:
    """Write a (nested) dict of tensors as a single-process torch distributed checkpoint."""
    with _single_process():
        dcp.save(tensors, storage_writer=_Writer(folder), no_dist=True)


def load_dcp(tensors: dict[str, Any], folder: Path) -> None:
    """Fill the tensors of `tensors` in place from `folder`. Every name and shape is checked
    (DCP's load plan) before the first tensor is copied."""
    try:
        with _single_process():
            dcp.load(tensors, storage_reader=_Reader(folder), planner=_TensorsOnly(), no_dist=True)
    except CheckpointException as exc:  # a BaseException: one failure per rank, here rank 0
        cause = next((failure for failure, _ in exc.failures.values()), exc)
        if isinstance(cause, InvalidInputError):
            raise cause from exc
        raise InvalidInputError(
            "checkpoint", f"the state does not fit this engine: {cause}"
        ) from exc


@contextmanager
def _single_process() -> Iterator[None]:
    # No process group is the normal case here (one trainer process): no_dist=True says so, and
    # DCP still warns "torch.distributed is disabled ... assuming single process" on every call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class _Writer(dcp.FileSystemWriter):
    """FileSystemWriter without storage metadata: that would put the staging path and a random
    save id into `.metadata`, and the same state must give the same bytes (and folder digest)."""

    def storage_meta(self) -> StorageMeta | None:
        return None


class _Reader(dcp.FileSystemReader):
    """FileSystemReader whose `.metadata` unpickler builds only DCP's own metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
            raise InvalidInputError("checkpoint", f"unreadable DCP index: {exc}") from exc
        if not isinstance(metadata, Metadata):
            raise InvalidInputError("checkpoint", "the DCP index is not a DCP Metadata")
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata


class _MetadataUnpickler(pickle.Unpickler):
    _MODULES = ("torch.distributed.checkpoint.metadata",)
    _NAMES = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._NAMES or module in self._MODULES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a DCP index")


class _TensorsOnly(DefaultLoadPlanner):
    """Loads tensors only: DCP unpickles non-tensor entries with torch.load(weights_only=False)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise InvalidInputError(
            "checkpoint", f"{read_item.dest_index.fqn} is not a tensor; state folders hold tensors"
        )
