"""What `stable_reinforce` trains on: the sampler's own record of the sequences it generated.

A sample request made with `record_stability_info` keeps its result (the prompt, each sampled
token and its temperature-1 logprob under the sampler's weights) as the command result of that
request, on Kafka and in the futures table. Each sequence is named `<request id>:<index>`, its
`sequence_id`. A training datum names, with provenance spans over its target positions, which
sequence each position came from; before the request goes to Kafka, the API replaces the datum's
`logprobs` with the recorded ones and leaves positions that are no sampled token out of the loss
(weight 0). So the trainer computes the importance weight against what the sampler really
computed, never against logprobs that went through the client, and the request on Kafka holds
everything the loss needs (a replay or audit reads it alone).

Both doors (`/v1/loops` and the Tinker door) call `fill_recorded_logprobs`: one implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from api.queries import ReadModels
from commands.work import RECORDED_LOSSES, Datum, ForwardBackward

# request id -> that sample request's result output, or None when this workspace has none.
Lookup = Callable[[str], dict[str, Any] | None]


class RecordError(ValueError):
    """A datum that names a sequence the sampler did not record (or not these tokens)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def sequence_ref(sequence_id: str, field: str) -> tuple[str, int]:
    """`<request id>:<index>` -> (request id, index)."""
    request_id, _, index = sequence_id.rpartition(":")
    # ASCII digits only: str.isdigit() also passes "²", which int() refuses.
    if not request_id or not (index.isascii() and index.isdigit()):
        raise RecordError(field, f"{sequence_id!r} is not a sequence_id (<request id>:<index>)")
    return request_id, int(index)


def fill_recorded_logprobs(data: list[dict[str, Any]], lookup: Lookup) -> list[dict[str, Any]]:
    """`data` (commands.work.Datum payloads with loss_fn_input_spans) with `logprobs` from the
    sampler's record and `weights` zero wherever the target is not a sampled token."""
    outputs: dict[str, dict[str, Any] | None] = {}

    def recorded(request_id: str) -> dict[str, Any] | None:
        if request_id not in outputs:
            outputs[request_id] = lookup(request_id)
        return outputs[request_id]

    filled = []
    for i, datum in enumerate(data):
        inputs = dict(datum["loss_fn_inputs"])
        targets = [int(t) for t in inputs.get("target_tokens") or []]
        spans = datum.get("loss_fn_input_spans") or []
        n = len(targets)
        logprobs = [0.0] * n
        sampled = [0.0] * n
        position = 0
        for j, span in enumerate(spans):
            where = f"data.{i}.loss_fn_input_spans.{j}"
            length, offset = int(span["length"]), int(span.get("offset") or 0)
            request_id, index = sequence_ref(span["sequence_id"], f"{where}.sequence_id")
            output = recorded(request_id)
            if output is None:
                raise RecordError(
                    f"{where}.sequence_id",
                    f"no sample request {request_id!r} in this workspace (sequence ids come "
                    "from a sample made with record_stability_info)",
                )
            if not output.get("stability_recorded"):
                raise RecordError(
                    f"{where}.sequence_id",
                    f"sample request {request_id!r} was made without record_stability_info",
                )
            sequences = output.get("sequences") or []
            if index >= len(sequences):
                raise RecordError(
                    f"{where}.sequence_id",
                    f"sample request {request_id!r} has {len(sequences)} sequences, "
                    f"not {index + 1}",
                )
            if span["kind"] == "sampled":
                source = sequences[index]["tokens"]
            else:
                source = output.get("prompt_tokens") or []
            if offset + length > len(source):
                raise RecordError(
                    where,
                    f"offset {offset} + length {length} runs past the {len(source)} "
                    f"{span['kind']} tokens of {span['sequence_id']}",
                )
            if targets[position : position + length] != source[offset : offset + length]:
                raise RecordError(
                    where,
                    f"target_tokens[{position}:{position + length}] are not the {span['kind']} "
                    f"tokens [{offset}:{offset + length}] of {span['sequence_id']}",
                )
            if span["kind"] == "sampled":
                lps = sequences[index]["logprobs"][offset : offset + length]
                logprobs[position : position + length] = [float(v) for v in lps]
                sampled[position : position + length] = [1.0] * length
            position += length
        weights = inputs.get("weights") or [1.0] * n
        inputs["logprobs"] = logprobs
        inputs["weights"] = [float(w) * s for w, s in zip(weights, sampled, strict=True)]
        filled.append({**datum, "loss_fn_inputs": inputs})
    return filled


def with_recorded_logprobs(request: ForwardBackward, lookup: Lookup) -> ForwardBackward:
    """The request as the trainer gets it: for a loss that trains on the sampler's record, each
    datum's logprobs and weights filled in from it (`fill_recorded_logprobs`)."""
    if request.loss_fn not in RECORDED_LOSSES:
        return request
    data = fill_recorded_logprobs([d.model_dump() for d in request.data], lookup)
    return request.model_copy(update={"data": [Datum.model_validate(d) for d in data]})


def table_lookup(reads: ReadModels, workspace: str, command_id_of: Callable[[str], str]) -> Lookup:
    """Look recorded samples up in the futures table (`command_id_of` maps the id the client
    knows to the command id on Kafka); a miss is looked up again once the projection caught up
    with the log, since the client may train on a sample the moment its future answered."""

    def lookup(request_id: str) -> dict[str, Any] | None:
        def find() -> dict[str, Any] | None:
            result = reads.command_result(command_id_of(request_id), workspace=workspace)
            if result is None or result.command_type != "Sample" or result.status != "accepted":
                return None
            return result.output

        found = find()
        if found is None and reads.catch_up is not None and reads.catch_up():
            found = find()
        return found

    return lookup
