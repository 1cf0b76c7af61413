"""Instance types: the seed's table and the smallest instance that meets a resource request."""

from __future__ import annotations

import pytest

from commands.instance_types import (
    INSTANCE_TYPES,
    ResourceError,
    parse_memory_gib,
    select_instance_type,
)


def pick(**kw: object) -> str:
    return select_instance_type(**kw).name  # type: ignore[arg-type]


def test_the_table_has_every_sku_of_the_seed_once() -> None:
    names = [t.name for t in INSTANCE_TYPES]
    assert len(names) == len(set(names)) == 31
    assert {"CPU:1x2", "L4:4x16", "A100:8x96x1152", "H100:8", "H100_40GB"} <= set(names)


def test_defaults_are_the_smallest_cpu_instance() -> None:
    assert pick() == "CPU:1x2"  # truss's cpu "1", memory "2Gi"


@pytest.mark.parametrize(("cpu", "expected"), [("3", "CPU:4x16"), ("4", "CPU:4x16"),
                                               ("5", "CPU:8x32"), ("8", "CPU:8x32")])  # fmt: skip
def test_cpu_maps_to_the_next_core_count_as_the_seed_says(cpu: str, expected: str) -> None:
    assert pick(cpu=cpu) == expected


def test_memory_picks_the_smallest_instance_with_enough_ram() -> None:
    assert pick(memory="3Gi") == "CPU:1x4"
    assert pick(memory="5Gi") == "CPU:2x8"
    assert pick(memory="16Gi", cpu=2) == "CPU:4x16"


def test_gi_is_gibibytes() -> None:
    assert parse_memory_gib("16Gi") == 16
    assert parse_memory_gib("1024Mi") == 1
    assert parse_memory_gib("2G") < 2  # gigabytes are slightly smaller


def test_the_seeds_config_example_maps_to_l4_4x16() -> None:
    assert pick(accelerator="L4", cpu="4", memory="16Gi") == "L4:4x16"


def test_a_gpu_count_picks_a_multi_gpu_instance() -> None:
    assert pick(accelerator="A100:2") == "A100:2x24x288"
    assert pick(accelerator="L4:3") == "L4:4x48x192"  # no 3-GPU L4: the next one up
    assert pick(accelerator="H100") == "H100"


def test_more_cores_than_one_gpu_instance_has_moves_to_a_bigger_one() -> None:
    assert pick(accelerator="T4", cpu="12") == "T4:16x64"
    assert pick(accelerator="L4", cpu="8") == "L4:2x24x96"


def test_instance_type_overrides_the_other_fields() -> None:
    assert pick(instance_type="L4:4x16", accelerator="H100", cpu="64") == "L4:4x16"
    assert pick(instance_type="cpu:4x16") == "CPU:4x16"  # case-insensitive


@pytest.mark.parametrize(
    ("kw", "field", "message"),
    [
        ({"instance_type": "L4:9x9"}, "instance_type", "unknown instance_type"),
        ({"accelerator": "V100"}, "accelerator", "unknown accelerator"),
        ({"accelerator": "L4:8"}, "accelerator", "no instance type has 8 L4 GPUs"),
        ({"cpu": "32"}, "cpu", r"has 32 vCPUs \(at most 16\)"),
        ({"cpu": "many"}, "cpu", "must be a number"),
        ({"memory": "100Gi"}, "memory", "100 GiB"),
        ({"memory": "16 bananas"}, "memory", "must look like"),
        ({"cpu": "0"}, "cpu", "more than 0"),
    ],
)
def test_a_request_no_instance_meets_is_refused_naming_the_field(
    kw: dict[str, str], field: str, message: str
) -> None:
    with pytest.raises(ResourceError, match=message) as exc:
        select_instance_type(**kw)  # type: ignore[arg-type]
    assert exc.value.field == field


def test_millicores_are_accepted() -> None:
    assert pick(cpu="500m") == "CPU:1x2"
