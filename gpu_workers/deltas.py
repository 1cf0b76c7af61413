"""Sampler-weight chains: a full `base` checkpoint, then `delta`s holding only what changed.

An RL step at a small learning rate moves every weight a little but leaves the sign, the exponent
and the top mantissa bits of most floats as they were. A delta stores, for each tensor whose bits
changed, `new_bits XOR parent_bits` with the bytes of each element regrouped by significance
(all first bytes, then all second bytes, ...) and zstd-compressed: the unchanged high bytes
become long runs of zeros. Lossless by construction (XOR twice is the identity), and checked: each
link names the digest of the full state it must produce, computed by `state_digest` on the
trainer before writing and on the sampler after applying.

Chain layout, written into every folder as `chain.json` (listed in the manifest, so it is covered
by the folder's digest, unlike the manifest's informative metadata):

    base (position 0) <- delta (1, parent = base's folder digest) <- delta (2) <- ...

Rules (the WeightSyncer seed): the first save is a base; later saves are deltas against the chain
head; `reset_delta_chain` makes the next save a base; `lora_rank > 0` forces base.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, get_args

import numpy as np
import torch
import zstandard
from safetensors.torch import load_file, save_file

from commands.work import DEFAULT_COMPRESSION_FORMAT, CompressionFormat
from events.loops import CheckpointType
from gpu_workers.manifest import (
    ChecksumMismatchError,
    Manifest,
    read_manifest,
    verify_folder,
    write_manifest,
)

# The wire name is `compression_format` (SaveWeights); here it is the codec of a delta.
Codec = CompressionFormat
CODECS: tuple[Codec, ...] = get_args(CompressionFormat)
DEFAULT_CODEC: Codec = DEFAULT_COMPRESSION_FORMAT
CHAIN_NAME = "chain.json"
DELTA_WEIGHTS_NAME = "delta.safetensors"
DELTA_INDEX_NAME = "delta_index.json"
CHAIN_FORMAT = "loopstream.weights_chain/v1"
ZSTD_LEVEL = 3  # level 3 is zstd's default: ~300 MB/s per core, most of the gain of higher levels
# Same-width integer views of float tensors, so XOR works on their bits.
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Tensors encoded or decoded at once: zstd, XOR and the byte shuffles release the GIL, and the
# full-state digest is computed beside them on the calling thread. Below PARALLEL_MIN_BYTES of
# weights the hand-offs between threads cost more than they save: one thread does it all.
CODEC_THREADS = min(4, os.cpu_count() or 1)
PARALLEL_MIN_BYTES = 4 << 20
_T = TypeVar("_T")
_R = TypeVar("_R")


class DeltaChainError(ValueError):
    """A save or a load does not fit the chain (no head to delta against, a broken link)."""


@dataclass(frozen=True)
class ChainLink:
    """What `chain.json` says about one checkpoint folder."""

    checkpoint_type: CheckpointType
    position: int  # 0 for a base, parent's + 1 for a delta
    state_digest: str  # `state_digest` of the full weights this folder leads to
    base_digest: str  # folder digest of the chain's base ("" in the base itself)
    parent_digest: str | None = None  # folder digest of the parent (deltas only)
    parent_uri: str | None = None  # where the parent is stored (deltas only)
    codec: Codec | None = None  # deltas only

    def to_json(self) -> str:
        doc = {"format": CHAIN_FORMAT, **self.__dict__}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ChainLink:
        doc = json.loads(text)
        if doc.pop("format", None) != CHAIN_FORMAT:
            raise ChecksumMismatchError(CHAIN_NAME, "unknown chain format")
        return cls(**doc)


@dataclass(frozen=True)
class ChainHead:
    """The trainer's memory of its last sampler save: a delta is computed against these bits."""

    state: dict[str, torch.Tensor]  # CPU copies of the saved weights (one model's worth)
    folder_digest: str  # manifest digest of the saved folder: the next delta's parent_digest
    uri: str  # where it was stored
    position: int
    base_digest: str  # folder digest of the chain's base


# ---------------------------------------------------------------------------------- rules


def choose_checkpoint_type(
    requested: CheckpointType | None, *, has_chain_head: bool, lora_rank: int
) -> CheckpointType:
    """base or delta for the next sampler save. None means base: a plain save stays a complete,
    downloadable folder that retention or expiry can delete on its own; delta chains are asked
    for explicitly (the weight syncer's save-and-hotload does), since deleting a chain's base
    or a middle link breaks every later delta."""
    if lora_rank > 0:
        # A LoRA export is a standalone artifact: no chain, every save is a base.
        return "base"
    if requested == "delta" and not has_chain_head:
        raise DeltaChainError(
            "checkpoint_type: a delta needs a chain head (a base saved by this trainer since it "
            "started or since reset_delta_chain); save a base first"
        )
    return requested or "base"


# ---------------------------------------------------------------------------------- digests


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        _digest_tensor(h, name, state[name])
    return h.hexdigest()


def _digest_tensor(h: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    h.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
    h.update(_bytes_of(tensor).data)


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:  # uint8, no copy of a contiguous CPU tensor
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(_BITS_DTYPE[tensor.element_size()])


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch.equal on floats says -0.0 == 0.0 and NaN != NaN: compare the bits instead.
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


# ---------------------------------------------------------------------------------- codecs


def encode(new: torch.Tensor, parent: torch.Tensor, codec: Codec) -> torch.Tensor:
    """One tensor's delta payload as stored in delta.safetensors."""
    new = new.detach().to("cpu").contiguous()
    if codec == "raw":
        return new.clone()
    if codec == "zstd":
        payload = _bytes_of(new)
    else:  # xor_zstd
        xor_N = _bits(new).reshape(-1) ^ _bits(parent.to("cpu")).reshape(-1)  # (N,)
        payload = _shuffle(_bytes_of(xor_N), new.element_size())
    compressed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(payload.data)
    return torch.frombuffer(bytearray(compressed), dtype=torch.uint8)


def decode(
    stored: torch.Tensor,
    parent: torch.Tensor,
    codec: Codec,
    *,
    dtype: torch.dtype,
    shape: list[int],
) -> torch.Tensor:
    if codec == "raw":
        return stored
    raw = zstandard.ZstdDecompressor().decompress(stored.numpy().data)
    item = torch.empty((), dtype=dtype).element_size()
    if codec == "zstd":
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    bytes_NI = _unshuffle(np.frombuffer(raw, dtype=np.uint8), item)  # (N * item,), writable
    xor_N = torch.from_numpy(bytes_NI).view(_BITS_DTYPE[item])  # (N,)
    bits_N = xor_N.bitwise_xor_(_bits(parent.to("cpu")).reshape(-1))
    return bits_N.view(dtype).reshape(shape)


# The shuffles copy one byte lane at a time (a strided numpy copy): the same bytes as a 2-D
# transpose, which torch does about 8x slower on uint8.


def _shuffle(bytes_NI: np.ndarray, item: int) -> np.ndarray:
    # (N * item,) -> (item, N): byte k of every element together, so zero high bytes form runs.
    shuffled_IN = np.empty((item, bytes_NI.size // item), dtype=np.uint8)
    for k in range(item):
        shuffled_IN[k] = bytes_NI[k::item]
    return shuffled_IN


def _unshuffle(bytes_IN: np.ndarray, item: int) -> np.ndarray:
    lanes_IN = bytes_IN.reshape(item, -1)
    bytes_NI = np.empty(bytes_IN.size, dtype=np.uint8)  # (N * item,)
    for k in range(item):
        bytes_NI[k::item] = lanes_IN[k]
    return bytes_NI


def _worth_threads(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether these tensors are worth spreading over CODEC_THREADS threads."""
    return sum(t.numel() * t.element_size() for t in tensors) >= PARALLEL_MIN_BYTES


def _map_in_order(fn: Callable[[_T], _R], items: list[_T], *, parallel: bool) -> Iterator[_R]:
    """`fn` over `items`, results in order. `parallel`: every item is handed to a pool now, so
    the caller can work beside it; else lazily, on the caller's thread, as it iterates."""
    if not parallel or CODEC_THREADS <= 1:
        return map(fn, items)
    pool = ThreadPoolExecutor(max_workers=CODEC_THREADS)
    try:
        return pool.map(fn, items)
    finally:
        pool.shutdown(wait=False)  # its threads finish what was handed to them, then exit


# ---------------------------------------------------------------------------------- writing


def write_base_link(
    folder: Path, state: Mapping[str, torch.Tensor], *, digest: str | None = None
) -> ChainLink:
    """Mark a full sampler-weights folder (before its manifest is written) as a chain's base.
    `digest`: `state_digest(state)`, when the caller has computed it already."""
    link = ChainLink(checkpoint_type="base", position=0,
                     state_digest=digest or state_digest(state), base_digest="")  # fmt: skip
    (folder / CHAIN_NAME).write_text(link.to_json())
    return link


def write_delta(
    folder: str | os.PathLike[str],
    *,
    parent: ChainHead,
    state: Mapping[str, torch.Tensor],
    codec: Codec = DEFAULT_CODEC,
    metadata: Mapping[str, object] | None = None,
) -> Manifest:
    """Write a delta folder (delta.safetensors, delta_index.json, chain.json, manifest.json)."""
    if codec not in CODECS:
        raise DeltaChainError(f"codec: {codec!r} is not one of {list(CODECS)}")
    if set(state) != set(parent.state):
        raise DeltaChainError("the weights' tensor names differ from the chain head's: save a base")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    for name in names:
        new, old = state[name], parent.state[name]
        if new.shape != old.shape or new.dtype != old.dtype:
            raise DeltaChainError(f"{name}: shape or dtype changed since the base: save a base")

    def encode_changed(name: str) -> torch.Tensor | None:
        new, old = state[name], parent.state[name]
        if bitwise_equal(new.to("cpu"), old):
            return None  # unchanged bits: nothing to move
        return encode(new, old, codec)

    encoded = _map_in_order(encode_changed, names, parallel=_worth_threads(state.values()))
    digest = state_digest(state)  # on this thread, while the pool encodes
    payload = {n: e for n, e in zip(names, encoded, strict=True) if e is not None}
    index = {
        name: {"dtype": str(state[name].dtype).removeprefix("torch."),
               "shape": list(state[name].shape)}
        for name in payload
    }  # fmt: skip
    # safetensors refuses an empty file's worth of nothing only in old versions; keep it uniform.
    save_file(payload, str(folder / DELTA_WEIGHTS_NAME), metadata={"format": "pt"})
    doc = {"codec": codec, "num_tensors": len(state), "tensors": index}
    (folder / DELTA_INDEX_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    link = ChainLink(
        checkpoint_type="delta",
        position=parent.position + 1,
        state_digest=digest,
        base_digest=parent.base_digest,
        parent_digest=parent.folder_digest,
        parent_uri=parent.uri,
        codec=codec,
    )
    (folder / CHAIN_NAME).write_text(link.to_json())
    meta = {**(metadata or {}), **chain_metadata(link), "changed_tensors": len(index)}
    return write_manifest(folder, kind="sampler_weights", metadata=meta)


def chain_metadata(link: ChainLink) -> dict[str, object]:
    """The chain fields copied into the manifest's (informative) metadata, for humans and UIs."""
    return {
        "checkpoint_type": link.checkpoint_type,
        "chain_position": link.position,
        "parent_digest": link.parent_digest,
        "codec": link.codec,
    }


# ---------------------------------------------------------------------------------- reading


def read_link(folder: str | os.PathLike[str]) -> ChainLink:
    """The folder's chain.json; a folder without one (written before chains) is a base."""
    path = Path(folder) / CHAIN_NAME
    if not path.is_file():
        return ChainLink(checkpoint_type="base", position=0, state_digest="", base_digest="")
    return ChainLink.from_json(path.read_text())


def apply_delta(
    state: Mapping[str, torch.Tensor],
    folder: str | os.PathLike[str],
    *,
    parent_digest: str | None = None,
    verified: bool = False,
) -> dict[str, torch.Tensor]:
    """The full weights after applying one delta folder onto `state` (which is left untouched).

    Verifies every file against the manifest (a corrupted file raises ChecksumMismatchError
    naming it), the link to the parent when `parent_digest` is given, and the digest of the
    result against the one the trainer computed.
    """
    folder = Path(folder)
    if not verified:  # the caller checked the folder against its manifest already
        verify_folder(folder)
    link = read_link(folder)
    if link.checkpoint_type != "delta" or link.codec is None:
        raise DeltaChainError(f"{folder.name} is a {link.checkpoint_type}, not a delta")
    if parent_digest is not None and link.parent_digest != parent_digest:
        raise DeltaChainError(
            f"{folder.name}: parent digest {link.parent_digest} != applied-onto {parent_digest}"
        )
    index = json.loads((folder / DELTA_INDEX_NAME).read_text())
    stored = load_file(str(folder / DELTA_WEIGHTS_NAME))
    if index["num_tensors"] != len(state) or set(index["tensors"]) - set(state):
        raise DeltaChainError(f"{folder.name}: tensor names do not fit the weights it applies to")
    codec = link.codec

    def decode_one(name: str) -> torch.Tensor:
        spec = index["tensors"][name]
        parent = state[name].detach()
        dtype = getattr(torch, spec["dtype"])
        new = decode(stored[name], parent.to("cpu"), codec, dtype=dtype, shape=spec["shape"])
        return new.to(parent.device)

    new_state = dict(state)
    changed = sorted(index["tensors"])
    parallel = _worth_threads(state[name] for name in changed)
    # The digest goes in name order on this thread, each changed tensor as soon as it is decoded
    # (both lists are sorted by name, so they come in step).
    decoded = zip(changed, _map_in_order(decode_one, changed, parallel=parallel), strict=True)
    next_changed = next(decoded, None)
    h = hashlib.sha256()
    for name in sorted(new_state):
        if next_changed is not None and next_changed[0] == name:
            new_state[name] = next_changed[1]
            next_changed = next(decoded, None)
        _digest_tensor(h, name, new_state[name])
    digest = h.hexdigest()
    if digest != link.state_digest:
        raise ChecksumMismatchError(
            DELTA_WEIGHTS_NAME,
            f"{folder.name}: weights digest after apply {digest} != trainer's {link.state_digest}",
        )
    return new_state


def apply_chain(
    state: Mapping[str, torch.Tensor],
    folders: Sequence[str | os.PathLike[str]],
    *,
    parent_digest: str,
    verified: bool = False,
) -> dict[str, torch.Tensor]:
    """Apply delta folders in chain order onto `state` (the weights of `parent_digest`); each
    must name the previous as its parent. `state` is left untouched, and the tensors no delta
    changed are returned as the same objects."""
    for folder in folders:
        state = apply_delta(state, folder, parent_digest=parent_digest, verified=verified)
        parent_digest = read_manifest(Path(folder)).digest  # verified by apply_delta or the caller
    return dict(state)
