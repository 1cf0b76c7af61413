"""Hostile inputs at the Tinker door that once came back 500 (found by a hostile test pass):
each must be a 400 naming the field. Pure functions of the door (api/tinker/wire.py,
api/recorded.py, api/tinker/routes.py), so no stack is needed."""

from __future__ import annotations

import math
from typing import Any

import pytest

from api.errors import ApiError
from api.recorded import RecordError, sequence_ref
from api.tinker import routes
from api.tinker.wire import (
    ForwardBackwardOutputPb,
    WireError,
    encode_forward_backward_output,
    id_matrix_from_json,
    model_input_from_json,
    tensor_from_json,
)


@pytest.mark.parametrize("sequence_id", ["x:\u00b2", "x:\u0661", "x:\u2460"])
def test_a_non_ascii_digit_index_is_not_a_sequence_id(sequence_id: str) -> None:
    with pytest.raises(RecordError) as caught:
        sequence_ref(sequence_id, "data.0.loss_fn_input_spans.0.sequence_id")
    assert caught.value.field == "data.0.loss_fn_input_spans.0.sequence_id"


def test_a_non_finite_loss_is_answered_as_nan_not_a_500() -> None:
    # gspo with sequence_ratio_mask 1e38, or stable_reinforce with kl_coeff 1e308: the worker's
    # loss is inf/nan, stored as null in the result.
    body = encode_forward_backward_output(
        {"metrics": {"loss:sum": None, "tokens:sum": 8.0}, "loss_fn_outputs": [{"logprobs": [0]}]}
    )
    msg: Any = ForwardBackwardOutputPb()
    msg.ParseFromString(body)
    assert math.isnan(msg.metrics["loss:sum"]) and msg.metrics["tokens:sum"] == 8.0


def _ids(**value: Any) -> dict[str, Any]:
    return {"data": [1, 2, 3], "dtype": "int64", "shape": [3, 1], **value}


@pytest.mark.parametrize(
    "value",
    [
        _ids(data=[2**70, 2, 3]),
        _ids(data="abc"),
        _ids(data=["a", "b", "c"]),
        _ids(shape=[1.5, 2]),
        _ids(shape=[-3, -1]),
        _ids(data=[97], shape=[3, 2], sparse_crow_indices=[0, -5, 1, 1], sparse_col_indices=[0]),
        _ids(data=[97], shape=[3, 2], sparse_crow_indices=5, sparse_col_indices=[0]),
        _ids(data=[], shape=[3, 10**12], sparse_crow_indices=[0, 0, 0, 0], sparse_col_indices=[]),
    ],
)
def test_malformed_target_prompt_logprobs_are_a_wire_error(value: dict[str, Any]) -> None:
    with pytest.raises(WireError) as caught:
        id_matrix_from_json(value, "target_prompt_logprobs")
    assert caught.value.field == "target_prompt_logprobs"


@pytest.mark.parametrize("tokens", [["a"], [None], 5, [[1]]])
def test_malformed_prompt_tokens_are_a_wire_error(tokens: Any) -> None:
    with pytest.raises(WireError) as caught:
        model_input_from_json({"chunks": [{"type": "encoded_text", "tokens": tokens}]}, "prompt")
    assert caught.value.field.startswith("prompt")


def test_a_huge_sparse_loss_input_is_refused_before_it_is_allocated() -> None:
    value = {"data": [], "dtype": "float32", "shape": [10**12],
             "sparse_crow_indices": [0, 0], "sparse_col_indices": []}  # fmt: skip
    with pytest.raises(WireError, match="cells"):
        tensor_from_json(value, "data.0.loss_fn_inputs.weights")


@pytest.mark.parametrize("value", ["no", "false", 5, [], {}])
def test_a_non_boolean_flag_is_a_400_not_a_silent_true(value: Any) -> None:
    for name in ("record_stability_info", "prompt_logprobs"):
        with pytest.raises(ApiError) as caught:
            routes._flag({name: value}, name)
        assert caught.value.status_code == 400 and caught.value.field == name
    assert routes._flag({}, "prompt_logprobs") is False
    assert routes._flag({"prompt_logprobs": True}, "prompt_logprobs") is True
