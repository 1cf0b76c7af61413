"""Bad inputs are refused with an error that names the field; defaults are Tinker's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gpu_workers.engine.types import (
    AdamParams,
    Datum,
    InvalidInputError,
    SamplingParams,
    check_batch,
)
from gpu_workers.manifest import ChecksumMismatchError, verify_folder, write_manifest


def test_adam_defaults_are_tinkers() -> None:
    params = AdamParams()

    assert params.learning_rate == 1e-4
    assert (params.beta1, params.beta2) == (0.9, 0.95)
    assert params.eps == 1e-12
    assert params.weight_decay == 0.0
    assert params.grad_clip_norm == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"learning_rate": math.nan}, "learning_rate"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": -0.1}, "beta2"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
    ],
)
def test_bad_adam_params_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidInputError, match=field) as err:
        AdamParams(**kwargs)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": "7"}, "seed"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_datum_from_tokens_shifts_inputs_and_targets() -> None:
    datum = Datum.from_tokens([1, 2, 3, 4], weights=[0, 1, 1])

    assert datum.model_input == [1, 2, 3]
    assert datum.loss_fn_inputs == {"target_tokens": [2, 3, 4], "weights": [0.0, 1.0, 1.0]}


def test_misaligned_loss_fn_input_names_the_array() -> None:
    with pytest.raises(InvalidInputError) as err:
        Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": [2, 3]})
    assert err.value.field == "loss_fn_inputs.target_tokens"


def test_negative_token_names_the_position() -> None:
    with pytest.raises(InvalidInputError) as err:
        Datum(model_input=[1, -5], loss_fn_inputs={"target_tokens": [2, 3]})
    assert err.value.field == "model_input[1]"


def test_batch_checks_name_datum_and_field() -> None:
    ok = Datum.from_tokens([1, 2, 3])
    long = Datum.from_tokens(list(range(12)))
    kw = {"max_seq_len": 8, "vocab_size": 260}

    cases = [
        (([ok], "ppo_magic"), "loss_fn"),
        (([], "cross_entropy"), "data"),
        (([ok, long], "cross_entropy"), "data[1].model_input"),
        (([ok], "importance_sampling"), "data[0].loss_fn_inputs.logprobs"),
        (
            ([Datum.from_tokens([1, 2, 999])], "cross_entropy"),
            "data[0].loss_fn_inputs.target_tokens[1]",
        ),
        (
            ([Datum.from_tokens([1, 2], advantages=[1.0])], "cross_entropy"),
            "data[0].loss_fn_inputs.advantages",
        ),
    ]
    for (data, loss_fn), field in cases:
        with pytest.raises(InvalidInputError) as err:
            check_batch(data, loss_fn, **kw)
        assert err.value.field == field, (loss_fn, field)


def test_manifest_catches_changed_missing_and_extra_files(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text("{}")
    manifest = write_manifest(tmp_path, kind="state")
    assert verify_folder(tmp_path).digest == manifest.digest

    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(ChecksumMismatchError) as err:
        verify_folder(tmp_path)
    assert err.value.relative_file_name == "a.bin"

    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "extra").write_text("x")
    with pytest.raises(ChecksumMismatchError, match="extra"):
        verify_folder(tmp_path)

    (tmp_path / "extra").unlink()
    (tmp_path / "sub" / "b.json").unlink()
    with pytest.raises(ChecksumMismatchError, match="missing"):
        verify_folder(tmp_path)


def test_invalid_input_error_survives_pickling_with_its_field() -> None:
    # Ray pickles an actor's exception for its caller; unpicklable, the gateway saw a 500.
    import pickle

    err = pickle.loads(pickle.dumps(InvalidInputError("prompt_tokens[0]", "out of vocabulary")))

    assert (err.field, err.reason) == ("prompt_tokens[0]", "out of vocabulary")
    assert str(err) == "prompt_tokens[0]: out of vocabulary"
