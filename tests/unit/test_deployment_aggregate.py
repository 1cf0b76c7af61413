"""The model aggregate and its deployments, as given events / when command / then events."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from commands.deployments import (
    ActivateDeployment,
    ChangeDeploymentInstanceType,
    CreateDeployment,
    CreateModel,
    DeactivateDeployment,
    DeleteDeployment,
    DeploymentSpec,
    ModelState,
    Rejected,
    Resources,
    decide,
    initial_state,
)
from commands.loops import PROMOTABILITY_RULE
from commands.registry import MODEL
from events.deployments import (
    DeploymentActivated,
    DeploymentCreated,
    DeploymentDeactivated,
    DeploymentDeleted,
    DevelopmentDeploymentOverwritten,
    ModelCreated,
)
from events.loops import DomainEvent

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
URI = "bt://loops:r1/sampler_weights/step-1"


def given(*events: DomainEvent) -> ModelState:
    state = initial_state("m1")
    for sequence, event in enumerate(events, start=1):
        state = MODEL.advance(state, event, sequence)
    return state


def when(state: ModelState, command: object) -> list[DomainEvent]:
    return decide(state, command, now=NOW)  # type: ignore[arg-type]


def from_checkpoint(**kw: object) -> CreateModel:
    facts: dict[str, object] = {
        "source": "checkpoint", "checkpoint_uri": URI, "checkpoint_type": "base",
        "chain_position": 0, "lora_rank": 0, "base_model": "tiny",
    }  # fmt: skip
    return CreateModel(**{**facts, **kw})  # type: ignore[arg-type]


def model() -> ModelCreated:
    return ModelCreated(model_id="m1", name="r1-step-1", source="checkpoint", checkpoint_uri=URI,
                        run_id="r1", checkpoint_type="base", chain_position=0, lora_rank=0,
                        base_model="tiny")  # fmt: skip


def deployment(deployment_id: str = "d1", number: int = 1, **kw: object) -> DeploymentCreated:
    values: dict[str, object] = {
        "model_id": "m1", "deployment_id": deployment_id, "name": f"deployment-{number}",
        "number": number, "kind": "published", "instance_type": "CPU:1x2", "gpu_count": 0,
        "min_replica": 0, "max_replica": 1,
    }  # fmt: skip
    return DeploymentCreated(**{**values, **kw})  # type: ignore[arg-type]


def reason(state: ModelState, command: object) -> tuple[str, str | None]:
    with pytest.raises(Rejected) as exc:
        when(state, command)
    return exc.value.reason, exc.value.field


# --- CreateModel ---------------------------------------------------------------------------


def test_creates_a_model_from_a_base_checkpoint_named_after_run_and_checkpoint() -> None:
    assert when(given(), from_checkpoint()) == [model()]


def test_a_delta_checkpoint_is_refused_with_the_seeds_promotability_rule() -> None:
    text, field = reason(given(), from_checkpoint(checkpoint_type="delta", chain_position=3))
    assert PROMOTABILITY_RULE in text
    assert "cannot be deployed" in text
    assert field == "checkpoint_uri"


def test_a_lora_delta_is_deployable_the_rule_says_lora_is_always_promotable() -> None:
    events = when(given(), from_checkpoint(checkpoint_type="delta", chain_position=2, lora_rank=8))
    assert isinstance(events[0], ModelCreated)


def test_a_trainer_weights_checkpoint_is_refused() -> None:
    text, field = reason(given(), from_checkpoint(checkpoint_uri="bt://loops:r1/weights/step-1"))
    assert "sampler_weights" in text and field == "checkpoint_uri"


def test_checkpoint_facts_are_required_for_a_checkpoint_source() -> None:
    assert reason(given(), from_checkpoint(lora_rank=None))[1] == "lora_rank"
    assert reason(given(), from_checkpoint(checkpoint_uri="s3://x"))[1] == "checkpoint_uri"


def test_creates_a_model_from_a_base_model() -> None:
    events = when(given(), CreateModel(source="base_model", base_model="loopstream/tiny-llama"))
    name = "loopstream/tiny-llama"
    assert events == [ModelCreated(model_id="m1", name=name, source="base_model", base_model=name)]


def test_a_base_model_source_takes_no_checkpoint_fields() -> None:
    command = CreateModel(source="base_model", base_model="tiny", checkpoint_uri=URI)
    assert reason(given(), command)[1] == "checkpoint_uri"


def test_a_model_is_created_once() -> None:
    assert "already exists" in reason(given(model()), from_checkpoint())[0]


def test_create_model_with_a_first_deployment_emits_both() -> None:
    command = from_checkpoint(deployment=DeploymentSpec(deployment_id="d1"))
    assert when(given(), command) == [model(), deployment()]


def test_a_bad_first_deployment_names_the_nested_field() -> None:
    spec = DeploymentSpec(deployment_id="d1", resources=Resources(accelerator="V100"))
    assert (
        reason(given(), from_checkpoint(deployment=spec))[1] == "deployment.resources.accelerator"
    )


# --- CreateDeployment ----------------------------------------------------------------------


def test_deployments_are_named_deployment_1_2_counting_per_model() -> None:
    state = given(model(), deployment("d1", 1))
    assert when(state, CreateDeployment(deployment_id="d2")) == [deployment("d2", 2)]


def test_numbers_are_not_reused_after_a_delete() -> None:
    state = given(
        model(), deployment("d1", 1), DeploymentDeleted(model_id="m1", deployment_id="d1")
    )
    event = when(state, CreateDeployment(deployment_id="d2"))[0]
    assert isinstance(event, DeploymentCreated)
    assert (event.number, event.name) == (2, "deployment-2")


def test_a_custom_name_is_kept_and_must_be_unique() -> None:
    state = given(model(), deployment("d1", 1, name="blue"))
    event = when(state, CreateDeployment(deployment_id="d2", name="green"))[0]
    assert isinstance(event, DeploymentCreated) and event.name == "green"
    assert reason(state, CreateDeployment(deployment_id="d2", name="blue"))[1] == "name"


def test_a_default_name_skips_one_taken_by_hand() -> None:
    state = given(model(), deployment("d1", 1, name="deployment-2"))
    event = when(state, CreateDeployment(deployment_id="d2"))[0]
    assert isinstance(event, DeploymentCreated) and event.name == "deployment-3"


def test_a_deployment_id_is_used_once() -> None:
    state = given(model(), deployment("d1", 1))
    assert reason(state, CreateDeployment(deployment_id="d1"))[1] == "deployment_id"


def test_resources_pick_the_smallest_fitting_instance_type() -> None:
    command = CreateDeployment(
        deployment_id="d1", resources=Resources(accelerator="L4", cpu=4, memory="16Gi")
    )
    event = when(given(model()), command)[0]
    assert isinstance(event, DeploymentCreated)
    assert (event.instance_type, event.accelerator, event.gpu_count, event.cpu) == (
        "L4:4x16", "L4", 1, "4",
    )  # fmt: skip


def test_instance_type_overrides_the_resource_fields() -> None:
    command = CreateDeployment(
        deployment_id="d1", resources=Resources(instance_type="A10G:8x32", cpu="64")
    )
    event = when(given(model()), command)[0]
    assert isinstance(event, DeploymentCreated) and event.instance_type == "A10G:8x32"


def test_a_resource_no_instance_meets_is_refused_naming_the_field() -> None:
    command = CreateDeployment(deployment_id="d1", resources=Resources(cpu="99"))
    text, field = reason(given(model()), command)
    assert field == "resources.cpu" and "99 vCPUs" in text


def test_published_replica_bounds_default_to_the_seeds_and_are_checked() -> None:
    state = given(model())
    event = when(state, CreateDeployment(deployment_id="d1", min_replica=2, max_replica=5))[0]
    assert isinstance(event, DeploymentCreated)
    assert (event.min_replica, event.max_replica) == (2, 5)
    assert reason(state, CreateDeployment(deployment_id="d1", min_replica=3, max_replica=2))[1] == (
        "min_replica"
    )


def test_a_development_deployment_is_single_replica_scale_to_zero() -> None:
    event = when(given(model()), CreateDeployment(deployment_id="d1", development=True))[0]
    assert isinstance(event, DeploymentCreated)
    assert (event.kind, event.min_replica, event.max_replica) == ("development", 0, 1)


@pytest.mark.parametrize(("kw", "field"), [({"min_replica": 1}, "min_replica"),
                                           ({"max_replica": 3}, "max_replica")])  # fmt: skip
def test_a_development_deployments_replicas_are_fixed(kw: dict[str, int], field: str) -> None:
    command = CreateDeployment(deployment_id="d1", development=True, **kw)  # type: ignore[arg-type]
    text, named = reason(given(model()), command)
    assert named == field and "fixed" in text


def test_a_model_has_one_development_deployment_pushing_again_overwrites_it() -> None:
    state = given(model(), deployment("d1", 1, kind="development"))
    again = CreateDeployment(
        deployment_id="d1", development=True, resources=Resources(instance_type="T4:4x16")
    )
    assert when(state, again) == [
        DevelopmentDeploymentOverwritten(
            model_id="m1",
            deployment_id="d1",
            instance_type="T4:4x16",
            accelerator="T4",
            gpu_count=1,
            requested_instance_type="T4:4x16",
        )
    ]
    other = CreateDeployment(deployment_id="d2", development=True)
    text, field = reason(state, other)
    assert field == "development" and "d1" in text


def test_a_deployment_needs_a_model() -> None:
    assert reason(given(), CreateDeployment(deployment_id="d1"))[1] == "aggregate_id"


# --- activate, deactivate, delete ----------------------------------------------------------


def test_deactivate_then_activate() -> None:
    state = given(model(), deployment())
    assert when(state, DeactivateDeployment(deployment_id="d1")) == [
        DeploymentDeactivated(model_id="m1", deployment_id="d1")
    ]
    inactive = given(
        model(), deployment(), DeploymentDeactivated(model_id="m1", deployment_id="d1")
    )
    assert inactive.deployments["d1"].status == "INACTIVE"
    assert when(inactive, ActivateDeployment(deployment_id="d1")) == [
        DeploymentActivated(model_id="m1", deployment_id="d1")
    ]


def test_activating_an_active_and_deactivating_an_inactive_deployment_are_refused() -> None:
    state = given(model(), deployment())
    assert "already active" in reason(state, ActivateDeployment(deployment_id="d1"))[0]
    inactive = given(
        model(), deployment(), DeploymentDeactivated(model_id="m1", deployment_id="d1")
    )
    assert "already inactive" in reason(inactive, DeactivateDeployment(deployment_id="d1"))[0]


def test_delete_then_every_command_on_it_is_refused_as_missing() -> None:
    state = given(model(), deployment())
    assert when(state, DeleteDeployment(deployment_id="d1")) == [
        DeploymentDeleted(model_id="m1", deployment_id="d1")
    ]
    gone = given(model(), deployment(), DeploymentDeleted(model_id="m1", deployment_id="d1"))
    for command in (DeleteDeployment, ActivateDeployment, DeactivateDeployment):
        text, field = reason(gone, command(deployment_id="d1"))
        assert "does not exist" in text and field == "deployment_id"


def test_an_inactive_deployment_may_be_deleted() -> None:
    state = given(model(), deployment(), DeploymentDeactivated(model_id="m1", deployment_id="d1"))
    assert when(state, DeleteDeployment(deployment_id="d1"))[0] == DeploymentDeleted(
        model_id="m1", deployment_id="d1"
    )


def test_a_deleted_development_deployment_frees_the_slot() -> None:
    state = given(
        model(),
        deployment("d1", 1, kind="development"),
        DeploymentDeleted(model_id="m1", deployment_id="d1"),
    )
    event = when(state, CreateDeployment(deployment_id="d2", development=True))[0]
    assert isinstance(event, DeploymentCreated) and event.name == "deployment-2"


# --- changing the instance type deploys a copy ---------------------------------------------


def test_changing_the_instance_type_deploys_a_copy() -> None:
    state = given(model(), deployment("d1", 1, min_replica=1, max_replica=3))
    command = ChangeDeploymentInstanceType(
        deployment_id="d1", new_deployment_id="d2", resources=Resources(instance_type="L4:4x16")
    )
    assert when(state, command) == [
        deployment(
            "d2",
            2,
            instance_type="L4:4x16",
            accelerator="L4",
            gpu_count=1,
            requested_instance_type="L4:4x16",
            min_replica=1,
            max_replica=3,
            copied_from="d1",
        )
    ]


def test_the_same_instance_type_is_not_a_change() -> None:
    state = given(model(), deployment())
    command = ChangeDeploymentInstanceType(
        deployment_id="d1", new_deployment_id="d2", resources=Resources(cpu="1")
    )
    assert reason(state, command)[1] == "resources"


def test_a_development_deployment_is_overwritten_not_copied() -> None:
    state = given(model(), deployment(kind="development"))
    command = ChangeDeploymentInstanceType(
        deployment_id="d1", new_deployment_id="d2", resources=Resources(cpu="4")
    )
    assert reason(state, command)[1] == "deployment_id"


@pytest.mark.parametrize("base_model", ["../../etc", "/etc/passwd", "a/../../x", "a\\b", "a//b"])
def test_a_base_model_that_is_a_path_out_of_the_model_root_is_refused(base_model: str) -> None:
    # Hostile test: a raw CreateModel on Kafka skips the API's check; the aggregate must refuse
    # it too ("every producer of a CreateModel gets the same answer").
    command = CreateModel(source="base_model", base_model=base_model)
    text, field = reason(given(), command)
    assert field == "base_model" and repr(base_model) in text
    checkpoint = from_checkpoint(base_model=base_model)
    assert reason(given(), checkpoint)[1] == "base_model"
