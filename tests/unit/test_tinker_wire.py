"""The Tinker wire encodings against the official SDK's own encoders and decoders."""

from __future__ import annotations

import math

import pytest
import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from api.tinker.wire import (
    WireError,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
    model_input_from_json,
    tensor_from_json,
)


def test_forward_backward_request_decodes_dense_and_sparse_tensors() -> None:
    sparse = types.TensorData(
        data=[2.0, 3.0], dtype="float32", shape=[4], sparse_crow_indices=[0, 2],
        sparse_col_indices=[1, 3],
    )  # fmt: skip
    datum = tinker.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[2, 3, 4, 5], dtype="int64", shape=[4]),
            "advantages": sparse,
            "logprobs": types.TensorData(data=[-1.0, -2.0, -3.0, -4.0], dtype="float32"),
        },
    )
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=[datum], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.9}
        ),
        model_id="abc:train:0",
        seq_id=7,
    )
    proto = forward_backward_request_to_proto(request)
    proto.forward_only = True

    call = decode_forward_backward(proto.SerializeToString())

    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == (
        "abc:train:0", 7, "ppo", True,
    )  # fmt: skip
    assert call.loss_fn_config == pytest.approx({"clip_low_threshold": 0.9})
    assert call.data[0]["model_input"] == [1, 2, 3, 4]
    inputs = call.data[0]["loss_fn_inputs"]
    assert inputs["target_tokens"] == [2, 3, 4, 5]
    assert inputs["advantages"] == [0.0, 2.0, 0.0, 3.0]
    assert inputs["logprobs"] == [-1.0, -2.0, -3.0, -4.0]


def test_forward_backward_output_is_read_by_the_sdk() -> None:
    output = {
        "loss": 1.5,
        "metrics": {"loss:sum": 1.5, "tokens:sum": 5.0},
        "loss_fn_outputs": [{"logprobs": [-0.5, -1.0]}, {"logprobs": [-0.25, -0.5, -2.0]}],
    }
    decoded = deserialize_forward_backward_output(encode_forward_backward_output(output))
    assert decoded.metrics == {"loss:sum": 1.5, "tokens:sum": 5.0}
    assert [o["logprobs"].tolist() for o in decoded.loss_fn_outputs] == [
        [-0.5, -1.0], [-0.25, -0.5, -2.0],
    ]  # fmt: skip


def test_sample_response_is_read_by_the_sdk_with_none_prompt_logprob() -> None:
    output = {
        "sequences": [{"tokens": [5, 6], "logprobs": [-1.0, -2.0], "stop_reason": "length"}],
        "prompt_logprobs": [None, -3.0, -4.0],
    }
    decoded = deserialize_sample_response(encode_sample_response(output))
    assert decoded.sequences[0].tokens == [5, 6]
    assert decoded.sequences[0].stop_reason == "length"
    assert decoded.sequences[0].logprobs == pytest.approx([-1.0, -2.0])
    assert decoded.prompt_logprobs == [None, -3.0, -4.0]


def test_json_tensor_data_and_model_input() -> None:
    # TensorData's JSON form (tinker.types._pydantic_types.tensor_data), dense and sparse CSR.
    sparse = {"data": [1.0, 2.0], "dtype": "float32", "shape": [3],
              "sparse_crow_indices": [0, 2], "sparse_col_indices": [0, 2]}  # fmt: skip
    assert tensor_from_json(sparse, "x") == pytest.approx([1.0, 0.0, 2.0])
    wide = {**sparse, "shape": [2, 2], "sparse_crow_indices": [0, 1, 2]}
    with pytest.raises(WireError):  # (2, 2) is not one value per position
        tensor_from_json(wide, "x")
    dense = {"data": [1.5, math.pi], "dtype": "float32", "shape": [2]}
    assert tensor_from_json(dense, "x") == pytest.approx([1.5, math.pi])
    model_input = types.ModelInput.from_ints([3, 4, 5]).model_dump(mode="json")
    assert model_input_from_json(model_input, "prompt") == [3, 4, 5]
