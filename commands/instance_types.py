"""Instance types: the seed's table (003, "Instance type reference") and how a deployment's
resources map onto it. Pure: no I/O.

Two ways to ask, as in the seed's `config.yaml`:
- individual fields `accelerator`, `cpu`, `memory`: "Baseten provisions the smallest instance
  that meets the specified constraints" (cpu "3" or "4" -> a 4-core instance, "5" to "8" -> an
  8-core one). Smallest is the cheapest ($/min) of those that fit; without an accelerator only
  the CPU-only instances fit.
- `instance_type`, the full SKU name ("L4:4x16"): "When `instance_type` is specified, other
  resource fields (`cpu`, `memory`, `accelerator`, `use_gpu`) are ignored."

Names follow the seed's `instance_type` formats, not its table's first column (which spells the
same SKUs differently, e.g. `L4x4x16`): `CPU:<vCPU>x<RAM>`, `<GPU>:<vCPU>x<RAM>` for one GPU,
`<GPU>:<count>x<vCPU>x<RAM>` for several, `H100` / `H100:<count>`, and `H100_40GB` for the
fractional H100 (the table's `H100MIG`). The H100 rows give no vCPU or RAM ("-"): they are
None here, and a cpu or memory request does not rule them out (there is no figure to refuse by).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation


@dataclass(frozen=True)
class InstanceType:
    name: str  # the `instance_type` SKU, e.g. "L4:4x16"
    accelerator: str | None  # GPU model (None: CPU only)
    gpu_count: int
    vcpu: int | None  # None: not given by the seed (H100 rows)
    memory_gib: int | None
    vram_gib: int  # total over the instance's GPUs
    price_per_min: Decimal  # USD, from the seed; orders "smallest"


def _t(name: str, gpu: str | None, n: int, cpu: int | None, ram: int | None, vram: int,
       price: str) -> InstanceType:  # fmt: skip
    return InstanceType(name, gpu, n, cpu, ram, vram, Decimal(price))


# Transcribed from seed 003 ("CPU-only instances" and "GPU instances"), in the seed's order.
INSTANCE_TYPES: tuple[InstanceType, ...] = (
    _t("CPU:1x2", None, 0, 1, 2, 0, "0.00058"),
    _t("CPU:1x4", None, 0, 1, 4, 0, "0.00086"),
    _t("CPU:2x8", None, 0, 2, 8, 0, "0.00173"),
    _t("CPU:4x16", None, 0, 4, 16, 0, "0.00346"),
    _t("CPU:8x32", None, 0, 8, 32, 0, "0.00691"),
    _t("CPU:16x64", None, 0, 16, 64, 0, "0.01382"),
    _t("T4:4x16", "T4", 1, 4, 16, 16, "0.01052"),
    _t("T4:8x32", "T4", 1, 8, 32, 16, "0.01504"),
    _t("T4:16x64", "T4", 1, 16, 64, 16, "0.02408"),
    _t("L4:4x16", "L4", 1, 4, 16, 24, "0.01414"),
    _t("L4:2x24x96", "L4", 2, 24, 96, 48, "0.04002"),
    _t("L4:4x48x192", "L4", 4, 48, 192, 96, "0.08003"),
    _t("A10G:4x16", "A10G", 1, 4, 16, 24, "0.02012"),
    _t("A10G:8x32", "A10G", 1, 8, 32, 24, "0.02424"),
    _t("A10G:16x64", "A10G", 1, 16, 64, 24, "0.03248"),
    _t("A10G:2x24x96", "A10G", 2, 24, 96, 48, "0.05672"),
    _t("A10G:4x48x192", "A10G", 4, 48, 192, 96, "0.11344"),
    _t("A10G:8x192x768", "A10G", 8, 192, 768, 188, "0.32576"),
    _t("A100:12x144", "A100", 1, 12, 144, 80, "0.10240"),
    _t("A100:2x24x288", "A100", 2, 24, 288, 160, "0.20480"),
    _t("A100:3x36x432", "A100", 3, 36, 432, 240, "0.30720"),
    _t("A100:4x48x576", "A100", 4, 48, 576, 320, "0.40960"),
    _t("A100:5x60x720", "A100", 5, 60, 720, 400, "0.51200"),
    _t("A100:6x72x864", "A100", 6, 72, 864, 480, "0.61440"),
    _t("A100:7x84x1008", "A100", 7, 84, 1008, 560, "0.71680"),
    _t("A100:8x96x1152", "A100", 8, 96, 1152, 640, "0.81920"),
    _t("H100", "H100", 1, None, None, 80, "0.10833"),
    _t("H100:2", "H100", 2, None, None, 160, "0.21667"),
    _t("H100:4", "H100", 4, None, None, 320, "0.43333"),
    _t("H100:8", "H100", 8, None, None, 640, "0.86667"),
    _t("H100_40GB", "H100_40GB", 1, None, None, 40, "0.06250"),
)
BY_NAME: dict[str, InstanceType] = {t.name.upper(): t for t in INSTANCE_TYPES}
ACCELERATORS: tuple[str, ...] = tuple(dict.fromkeys(t.accelerator for t in INSTANCE_TYPES
                                                     if t.accelerator))  # fmt: skip

# truss's defaults when a field is left out: cpu "1", memory "2Gi", no accelerator.
DEFAULT_CPU = "1"
DEFAULT_MEMORY = "2Gi"

_ACCELERATOR = re.compile(r"^(?P<gpu>[A-Za-z0-9_]+)(?::(?P<count>[0-9]{1,3}))?$")
_CPU = re.compile(r"^(?P<n>[0-9]+(?:\.[0-9]+)?)(?P<milli>m)?$")
_MEMORY = re.compile(r"^(?P<n>[0-9]+(?:\.[0-9]+)?)(?P<unit>Ki|Mi|Gi|Ti|K|M|G|T)?$")
_UNIT_BYTES = {
    None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip


class ResourceError(ValueError):
    """A resource request no instance type meets, or one that cannot be read; names the field."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


def parse_accelerator(value: str) -> tuple[str, int]:
    """`"A100"` -> ("A100", 1); `"A100:2"` -> ("A100", 2). Unknown GPU models are refused."""
    match = _ACCELERATOR.match(value.strip())
    if match is None:
        raise ResourceError(
            f"accelerator {value!r} must look like <GPU> or <GPU>:<count>, e.g. L4 or A100:2",
            field="accelerator",
        )
    gpu = next((a for a in ACCELERATORS if a.upper() == match["gpu"].upper()), None)
    if gpu is None:
        raise ResourceError(
            f"unknown accelerator {match['gpu']!r}; known: {', '.join(ACCELERATORS)}",
            field="accelerator",
        )
    count = int(match["count"] or 1)
    if count < 1:
        raise ResourceError("accelerator count must be at least 1", field="accelerator")
    return gpu, count


def parse_cpu(value: str | int | float) -> Decimal:
    """vCPUs: `"4"`, `4`, `"0.5"` or `"500m"` (millicores)."""
    text = str(value).strip()
    match = _CPU.match(text)
    if match is None:
        raise ResourceError(f"cpu {text!r} must be a number of cores, e.g. \"4\" or \"500m\"",
                            field="cpu")  # fmt: skip
    cores = Decimal(match["n"]) / (1000 if match["milli"] else 1)
    if cores <= 0:
        raise ResourceError("cpu must be more than 0", field="cpu")
    return cores


def parse_memory_gib(value: str | int | float) -> Decimal:
    """GiB from `"16Gi"`, `"512Mi"`, `"2G"` or plain bytes (`Gi` is gibibytes, as the seed says)."""
    text = str(value).strip()
    match = _MEMORY.match(text)
    if match is None:
        raise ResourceError(f"memory {text!r} must look like \"16Gi\" or \"512Mi\"",
                            field="memory")  # fmt: skip
    try:
        gib = Decimal(match["n"]) * _UNIT_BYTES[match["unit"]] / 2**30
    except InvalidOperation:
        raise ResourceError(f"memory {text!r} is not a number", field="memory") from None
    if gib <= 0:
        raise ResourceError("memory must be more than 0", field="memory")
    return gib


def by_name(name: str) -> InstanceType:
    found = BY_NAME.get(name.strip().upper())
    if found is None:
        raise ResourceError(
            f"unknown instance_type {name!r}; known: {', '.join(t.name for t in INSTANCE_TYPES)}",
            field="instance_type",
        )
    return found


def _fits(t: InstanceType, *, gpu: str | None, count: int, cpu: Decimal, memory: Decimal) -> bool:
    if t.accelerator != gpu or t.gpu_count < count:
        return False
    if t.vcpu is not None and t.vcpu < cpu:
        return False
    return t.memory_gib is None or t.memory_gib >= memory


def select_instance_type(
    *,
    accelerator: str | None = None,
    cpu: str | int | float | None = None,
    memory: str | int | float | None = None,
    instance_type: str | None = None,
) -> InstanceType:
    """The instance a deployment gets: `instance_type` when given (the other fields ignored),
    else the cheapest one that has the accelerator (at least its count), the cores and the
    memory. Raises `ResourceError` naming the field that no instance can meet."""
    if instance_type is not None:
        return by_name(instance_type)
    gpu, count = parse_accelerator(accelerator) if accelerator else (None, 0)
    cores = parse_cpu(cpu if cpu is not None else DEFAULT_CPU)
    gib = parse_memory_gib(memory if memory is not None else DEFAULT_MEMORY)
    zero = Decimal(0)
    # Which constraint rules everything out: the accelerator alone, then with cpu, then memory.
    for field, limits in (
        ("accelerator", (zero, zero)),
        ("cpu", (cores, zero)),
        ("memory", (cores, gib)),
    ):
        fitting = [
            t for t in INSTANCE_TYPES
            if _fits(t, gpu=gpu, count=count, cpu=limits[0], memory=limits[1])
        ]  # fmt: skip
        if not fitting:
            raise ResourceError(_nothing_fits(field, gpu, count, cores, gib), field=field)
    return min(fitting, key=lambda t: (t.price_per_min, t.name))


def _nothing_fits(field: str, gpu: str | None, count: int, cores: Decimal, gib: Decimal) -> str:
    kind = [t for t in INSTANCE_TYPES if t.accelerator == gpu]
    if field == "accelerator":
        most = max(t.gpu_count for t in kind)
        return f"no instance type has {count} {gpu} GPUs (at most {most})"
    if field == "cpu":
        most = max((t.vcpu or 0) for t in kind if t.gpu_count >= count)
        return f"no {gpu or 'CPU-only'} instance type has {_num(cores)} vCPUs (at most {most})"
    most = max((t.memory_gib or 0) for t in kind if t.gpu_count >= count)
    return (
        f"no {gpu or 'CPU-only'} instance type with {_num(cores)} vCPUs has {_num(gib)} GiB of "
        f"memory (at most {most} GiB)"
    )


def _num(value: Decimal) -> str:
    return str(int(value)) if value == math.floor(value) else str(value.normalize())
