"""The Tinker SDK's wire encodings: protobuf for forward_backward in and out and for sample
results, JSON for everything else (ModelInput chunks, TensorData dense or sparse CSR).

Pure functions, no I/O: decoded requests become the same `commands.work` payloads the loops API
builds, and worker outputs (`CommandResult.output`) are encoded back into what the SDK parses.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from api.tinker._proto_descriptor import TINKER_PUBLIC_PROTO
from events.limits import text_problem

_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(TINKER_PUBLIC_PROTO)


def _message(name: str) -> type[Message]:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"tinker_public.{name}"))


ForwardBackwardRequestPb = _message("ForwardBackwardRequest")
ForwardBackwardOutputPb = _message("ForwardBackwardOutput")
SampleResponsePb = _message("SampleResponse")

# tinker_public.DType / StopReason enum values.
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32 = 1, 2, 3
_NUMPY_OF_DTYPE = {DTYPE_FLOAT32: np.float32, DTYPE_INT64: np.int64, DTYPE_INT32: np.int32}
_STOP_REASON = {"stop": 0, "length": 1}
_JSON_DTYPES = {"float32": np.float32, "int64": np.int64}


class WireError(ValueError):
    """A request body the Tinker front door cannot read; `field` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float] | None
    forward_only: bool
    data: list[dict[str, Any]]  # commands.work.Datum payloads: model_input, loss_fn_inputs


# ------------------------------------------------------------------ tensors


def _dense(values: np.ndarray, shape: list[int], where: str) -> list[float]:
    """A (T,) list from a tensor; a (T, 1) tensor is fine too, anything wider is not."""
    if shape and math.prod(shape) != values.size:
        raise WireError(where, f"shape {shape} does not hold {values.size} values")
    if len(shape) > 1 and math.prod(shape[1:]) != 1:
        raise WireError(where, f"shape {shape}: one value per position expected")
    return values.reshape(-1).tolist()


# Cells a decoded tensor may have (one 2-D id matrix of 524288 x 64): a sparse tensor's shape
# is the client's word, and np.full on it must not take the API's memory.
MAX_TENSOR_CELLS = 2**25


@contextmanager
def _readable(where: str) -> Iterator[None]:
    """Mistyped JSON (strings as numbers, a float shape, a number past int64) as a WireError."""
    try:
        yield
    except WireError:
        raise
    except (TypeError, ValueError, OverflowError, IndexError) as exc:
        raise WireError(where, f"malformed: {exc}") from exc


def _csr_to_dense(
    values: np.ndarray,
    crow: list[int],
    col: list[int],
    shape: list[int],
    where: str,
    fill: float = 0,
) -> np.ndarray:
    if len(shape) not in (1, 2):
        raise WireError(where, f"sparse tensors must be 1-D or 2-D, got shape {shape}")
    rows, cols = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
    if not (rows >= 0 and cols >= 0 and rows * cols <= MAX_TENSOR_CELLS):
        raise WireError(where, f"shape {shape}: at most {MAX_TENSOR_CELLS} cells")
    if len(crow) != rows + 1 or len(col) != values.size or crow[-1] != values.size:
        raise WireError(where, "sparse CSR indices do not match the values")
    dense = np.full((rows, cols), fill, dtype=values.dtype)
    for r in range(rows):
        for i in range(crow[r], crow[r + 1]):
            if not (0 <= i < len(col) and 0 <= col[i] < cols):
                raise WireError(where, f"sparse column index {col[i]} outside [0, {cols})")
            dense[r, col[i]] = values[i]
    return dense.reshape(shape)


def tensor_from_proto(msg: Any, where: str) -> list[float]:
    np_dtype = _NUMPY_OF_DTYPE.get(msg.dtype)
    if np_dtype is None:
        raise WireError(where, f"unsupported tensor dtype {msg.dtype}")
    shape = list(msg.shape)
    if msg.HasField("sparse_csr"):
        csr = msg.sparse_csr
        values = np.frombuffer(csr.values, dtype=np_dtype)
        dense = _csr_to_dense(
            values,
            np.frombuffer(csr.crow_indices, dtype=np.int64).tolist(),
            np.frombuffer(csr.col_indices, dtype=np.int64).tolist(),
            shape,
            where,
        )
        return _dense(dense, shape, where)
    return _dense(np.frombuffer(msg.dense, dtype=np_dtype), shape, where)


def tensor_from_json(value: Any, where: str) -> list[float]:
    """A JSON TensorData ({data, dtype, shape, sparse_crow_indices, sparse_col_indices}) or a
    plain list, as (T,) numbers."""
    with _readable(where):
        if isinstance(value, list):
            return [float(v) for v in value]
        if not isinstance(value, dict) or "data" not in value:
            raise WireError(where, "expected a TensorData object or a list of numbers")
        np_dtype = _JSON_DTYPES.get(value.get("dtype", "float32"))
        if np_dtype is None:
            raise WireError(where, f"unsupported dtype {value.get('dtype')!r}")
        values = np.asarray(value["data"], dtype=np_dtype).reshape(-1)
        shape = list(value.get("shape") or [values.size])
        if value.get("sparse_crow_indices") is not None:
            values = _csr_to_dense(
                values,
                list(value["sparse_crow_indices"]),
                list(value.get("sparse_col_indices") or []),
                shape,
                where,
            )
        return _dense(values, shape, where)


def id_matrix_from_json(value: Any, where: str) -> list[list[int]]:
    """A 2-D int64 TensorData of token ids (dense, or sparse CSR whose unlisted cells are -1:
    nothing asked there), as rows."""
    with _readable(where):
        if not isinstance(value, dict) or "data" not in value:
            raise WireError(where, "expected an int64 TensorData")
        if value.get("dtype", "int64") != "int64":
            raise WireError(where, f"must be int64 token ids, got {value.get('dtype')!r}")
        shape = list(value.get("shape") or [])
        if len(shape) != 2:
            raise WireError(where, f"must be 2-D [len(prompt) - 1, K], got shape {shape}")
        values = np.asarray(value["data"], dtype=np.int64).reshape(-1)
        if value.get("sparse_crow_indices") is not None:
            dense = _csr_to_dense(
                values,
                list(value["sparse_crow_indices"]),
                list(value.get("sparse_col_indices") or []),
                shape,
                where,
                fill=-1,
            )
        elif values.size != math.prod(shape):
            raise WireError(where, f"shape {shape} does not hold {values.size} values")
        else:
            dense = values.reshape(shape)
        return [[int(t) for t in row] for row in dense.tolist()]


def model_input_from_json(value: Any, where: str) -> list[int]:
    """A JSON ModelInput ({chunks: [{type: encoded_text, tokens}]}) as token ids."""
    with _readable(where):
        chunks = value.get("chunks") if isinstance(value, dict) else None
        if not isinstance(chunks, list):
            raise WireError(where, "expected a ModelInput with chunks")
        tokens: list[int] = []
        for i, chunk in enumerate(chunks):
            if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
                kind = chunk.get("type") if isinstance(chunk, dict) else type(chunk).__name__
                raise WireError(
                    f"{where}.chunks.{i}", f"only encoded_text chunks are served: {kind}"
                )
            tokens.extend(int(t) for t in chunk.get("tokens", []))
        return tokens


# ------------------------------------------------------------------ forward_backward


def decode_forward_backward(body: bytes) -> ForwardBackwardCall:
    msg: Any = ForwardBackwardRequestPb()
    try:
        msg.ParseFromString(body)
    except DecodeError as exc:
        raise WireError("body", f"not a tinker_public.ForwardBackwardRequest: {exc}") from exc
    # Protobuf strings may hold NUL; PostgreSQL text cannot (the JSON bodies are checked by the
    # API's input boundary, api/boundary.py; this body is not JSON).
    texts = {"model_id": msg.model_id, "loss_fn": msg.loss_fn}
    texts.update({f"loss_fn_config.{k}": k for k in [*msg.loss_fn_config_v2, *msg.loss_fn_config]})
    for where, text in texts.items():
        if (problem := text_problem(text)) is not None:
            raise WireError(where, problem)
    config: dict[str, float] = {}
    for key, value in msg.loss_fn_config_v2.items():  # v2 wins, as on Tinker's servers
        if value.WhichOneof("value") == "text":
            raise WireError(f"loss_fn_config.{key}", "only numeric parameters are served")
        config[key] = float(value.number)
    for key, number in msg.loss_fn_config.items():
        config.setdefault(key, float(number))
    data: list[dict[str, Any]] = []
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for j, chunk in enumerate(datum.model_input):
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise WireError(
                    f"data.{i}.model_input.chunks.{j}",
                    f"only encoded_text chunks are served, got {chunk.WhichOneof('chunk')}",
                )
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
        inputs = {
            name: tensor_from_proto(tensor, f"data.{i}.loss_fn_inputs.{name}")
            for name, tensor in datum.loss_fn_inputs.items()
        }
        if "target_tokens" in inputs:
            inputs["target_tokens"] = [int(t) for t in inputs["target_tokens"]]
        decoded: dict[str, Any] = {"model_input": tokens, "loss_fn_inputs": inputs}
        if len(datum.loss_fn_input_spans):
            decoded["loss_fn_input_spans"] = [
                _span(span, f"data.{i}.loss_fn_input_spans.{j}")
                for j, span in enumerate(datum.loss_fn_input_spans)
            ]
        data.append(decoded)
    return ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=int(msg.seq_id),
        loss_fn=msg.loss_fn,
        loss_fn_config=config or None,
        forward_only=bool(msg.forward_only),
        data=data,
    )


def _span(msg: Any, where: str) -> dict[str, Any]:
    """A ProvenanceSpan as a commands.work.ProvenanceSpan payload."""
    which = msg.WhichOneof("span")
    if which is None:
        raise WireError(where, "a provenance span needs prompt_tokens or sampled_tokens")
    span = getattr(msg, which)
    if (problem := text_problem(span.sequence_id)) is not None:
        raise WireError(f"{where}.sequence_id", problem)
    kind = "prompt" if which == "prompt_tokens" else "sampled"
    return {"kind": kind, "sequence_id": span.sequence_id, "offset": span.offset,
            "length": span.length}  # fmt: skip


def encode_forward_backward_output(output: dict[str, Any]) -> bytes:
    """The worker's {loss, metrics, loss_fn_outputs: [{logprobs: (T,)}]} as one ArrayRecord."""
    msg: Any = ForwardBackwardOutputPb()
    msg.loss_fn_output_type = "ArrayRecord"
    for key, value in (output.get("metrics") or {}).items():
        # A non-finite loss (huge inputs or config) is stored as null: the SDK gets NaN.
        msg.metrics[key] = math.nan if value is None else float(value)
    outputs: list[dict[str, list[float]]] = output.get("loss_fn_outputs") or []
    record = msg.loss_fn_outputs.add()
    record.type_tag = "ArrayRecord"
    record.num_datums = len(outputs)
    names = sorted({name for datum in outputs for name in datum})
    for name in names:
        arrays = [np.asarray(datum.get(name, []), dtype=np.float32) for datum in outputs]
        # Byte offsets of each datum's slice in `data`, n + 1 of them.
        offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype=np.int64)
        field = record.fields[name]
        field.data = b"".join(a.tobytes() for a in arrays)
        field.offsets = offsets.tobytes()
        field.dtype = DTYPE_FLOAT32
    return msg.SerializeToString(deterministic=True)  # map entries sorted, whatever the hash seed


# ------------------------------------------------------------------ sample


# TopkLogprobs pads a position with fewer than k entries (or none: None) with this sentinel.
_TOPK_PAD = (0, -99999.0)


def _fill_topk(msg: Any, positions: list[list[list[float]] | None]) -> None:
    """(length, k) matrices of [token id, logprob] pairs, most likely first."""
    k = max((len(p) for p in positions if p), default=0)
    rows = [[tuple(e) for e in (p or [])] + [_TOPK_PAD] * (k - len(p or [])) for p in positions]
    msg.k = k
    msg.length = len(positions)
    msg.token_ids = np.asarray([[int(t) for t, _ in r] for r in rows], dtype=np.int32).tobytes()
    msg.logprobs = np.asarray([[lp for _, lp in r] for r in rows], dtype=np.float32).tobytes()


def _fill_tensor(msg: Any, rows: list[list[float]], dtype: type[np.generic]) -> None:
    """A dense (rows, K) tinker_public.Tensor."""
    array = np.asarray(rows, dtype=dtype)
    if array.ndim != 2:  # no rows at all: a one-token prompt
        array = array.reshape(len(rows), 0)
    msg.dense = array.tobytes()
    msg.dtype = DTYPE_INT64 if dtype is np.int64 else DTYPE_FLOAT32
    msg.shape.extend(array.shape)


def encode_sample_response(output: dict[str, Any]) -> bytes:
    msg: Any = SampleResponsePb()
    for sequence in output.get("sequences") or []:
        seq = msg.sequences.add()
        seq.stop_reason = _STOP_REASON[sequence["stop_reason"]]
        seq.tokens = np.asarray(sequence["tokens"], dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(sequence["logprobs"], dtype=np.float32).tobytes()
        if sequence.get("topk_logprobs") is not None:
            _fill_topk(seq.topk_sampled_logprobs, sequence["topk_logprobs"])
    prompt_logprobs = output.get("prompt_logprobs")
    if prompt_logprobs is not None:
        # The SDK reads NaN as None (the first prompt token has no context).
        msg.prompt_logprobs = np.asarray(
            [math.nan if v is None else v for v in prompt_logprobs], dtype=np.float32
        ).tobytes()
    if output.get("topk_prompt_logprobs") is not None:
        _fill_topk(msg.topk_prompt_logprobs, output["topk_prompt_logprobs"])
    if output.get("target_prompt_logprobs") is not None:
        _fill_tensor(msg.target_prompt_logprobs, output["target_prompt_logprobs"], np.float32)
    alternatives = output.get("prompt_alt_tokens")
    if alternatives is not None:
        _fill_tensor(msg.prompt_alt_tokens.tokens, alternatives["tokens"], np.int64)
        _fill_tensor(msg.prompt_alt_tokens.logprobs, alternatives["logprobs"], np.float32)
    msg.prompt_cache_hit_tokens = int(output.get("prompt_cache_hit_tokens") or 0)
    return msg.SerializeToString(deterministic=True)  # map entries sorted, whatever the hash seed
