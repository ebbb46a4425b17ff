"""Runtime patches for ModelOpt 0.47's export path: each names its target and the failure it prevents.

A patch is data: the module whose attribute is looked up *at call time* on the export path, the
attribute's qualified name, the signature it must have, the seed failure it prevents, and a wrapper.
Before anything is patched, every target is resolved and its signature compared with the declared
one; a mismatch stops the run with a message naming the target, because a patch that silently no
longer applies is how the seeds lost a run (ModelOpt 0.46 moved `_export_fused_experts` into
hf_export_handlers, which binds it at import: patching its old home did nothing).

Each wrapper counts its calls, so a run (and the tests) can check that every patch was actually
*reached* on the export path, not just installed.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from pipeline.errors import DsV4Error


class PatchTargetError(DsV4Error):
    """A declared patch target is missing or has another signature in the installed ModelOpt: a refusal
    like any other (the CLI prints it as one line and exits 2), raised before anything long starts."""


@dataclass(frozen=True)
class Target:
    module: str  # the module whose attribute the export path looks up when it calls
    qualname: str  # attribute path inside it, e.g. "NVFP4QTensor.get_activation_scaling_factor"
    signature: str  # str(inspect.signature(original)) as of the version the patch was written for


@dataclass
class Patch:
    name: str
    target: Target
    prevents: str
    wrap: Callable[[Callable], Callable]  # original -> replacement (same signature)
    calls: int = field(default=0, init=False)

    def resolve(self) -> tuple[object, str, Callable]:
        """(owner object, attribute name, current callable), or PatchTargetError saying what is wrong."""
        try:
            owner: object = importlib.import_module(self.target.module)
        except ImportError as err:
            raise PatchTargetError(f"patch {self.name}: cannot import {self.target.module} ({err})") from None
        *path, attr = self.target.qualname.split(".")
        for part in path:
            if not hasattr(owner, part):
                raise PatchTargetError(f"patch {self.name}: {self.target.module} has no {part}")
            owner = getattr(owner, part)
        if not hasattr(owner, attr):
            raise PatchTargetError(
                f"patch {self.name}: {self.target.module}.{self.target.qualname} does not exist in the installed "
                f"ModelOpt; it prevents: {self.prevents}. Find where the export path now calls it and update the target."
            )
        return owner, attr, getattr(owner, attr)

    def check(self) -> None:
        _, _, current = self.resolve()
        found = str(inspect.signature(inspect.unwrap(current)))
        if found != self.target.signature:
            raise PatchTargetError(
                f"patch {self.name}: {self.target.module}.{self.target.qualname} has signature {found}, "
                f"the patch was written for {self.target.signature}; review it before use"
            )


# ---- the patches ----------------------------------------------------------------------------------

_TENSOR_ATTRS_OF_QUANTIZERS = ("_amax", "_global_amax", "_pre_quant_scale", "_bias_value")


MOVED_TO_CPU: list[str] = []  # what export-on-cpu moved off an accelerator, for the report and the GPU tier


def _to_cpu_in_place(module: torch.nn.Module, weight_name: str) -> None:
    """Move the weight being exported and every tensor of its quantizers to the CPU."""
    weight = getattr(module, weight_name, None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "cpu":
        MOVED_TO_CPU.append(f"{type(module).__name__}.{weight_name}")
        moved = weight.detach().to("cpu")
        if isinstance(weight, torch.nn.Parameter):
            setattr(module, weight_name, torch.nn.Parameter(moved, requires_grad=False))
        else:
            setattr(module, weight_name, moved)
    for child in module.modules():
        if "Quantizer" not in type(child).__name__:
            continue
        for attr in _TENSOR_ATTRS_OF_QUANTIZERS:
            value = getattr(child, attr, None)
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                MOVED_TO_CPU.append(f"{getattr(child, '_dsv4_name', type(child).__name__)}.{attr}")
                if attr in child._buffers:
                    child._buffers[attr] = value.detach().to("cpu")
                else:
                    setattr(child, attr, value.detach().to("cpu"))


def _wrap_export_on_cpu(original: Callable) -> Callable:
    def export_quantized_weight_on_cpu(sub_module, dtype, weight_name="weight"):
        _to_cpu_in_place(sub_module, weight_name)
        return original(sub_module, dtype, weight_name)

    return export_quantized_weight_on_cpu


CLAMPED_ACTIVATION_SCALES: list[str] = []  # what the clamp patch changed, for the run's report


def _wrap_activation_scale_clamp(original: Callable) -> Callable:
    tiny = torch.finfo(torch.float32).tiny

    def get_activation_scaling_factor(quantizer):
        amax = quantizer.export_amax() if quantizer.is_enabled else None
        if amax is None or bool((torch.isfinite(amax) & (amax > 0)).all()):
            return original(quantizer)  # ModelOpt's own computation whenever it would not assert
        # ModelOpt asserts here and the export dies hours into a run; a zero or NaN input amax means
        # the quantizer saw no (finite) data: clamp it, warn, and list it in the run's report.
        where = getattr(quantizer, "_dsv4_name", type(quantizer).__name__)
        CLAMPED_ACTIVATION_SCALES.append(where)
        warnings.warn(
            f"input amax {amax.tolist()} of {where}: activation scale clamped to {tiny}", stacklevel=2
        )
        fixed = torch.where(
            torch.isfinite(amax) & (amax > 0), amax.float(), torch.zeros_like(amax, dtype=torch.float32)
        )
        scale = fixed / (quantizer.maxbound * 448.0)
        return torch.where(scale > 0, scale, torch.full_like(scale, tiny))

    return get_activation_scaling_factor


PATCHES: tuple[Patch, ...] = (
    Patch(
        "export-on-cpu",
        Target(
            "modelopt.torch.export.unified_export_hf",
            "_export_quantized_weight",
            "(sub_module: torch.nn.modules.module.Module, dtype: torch.dtype, weight_name: str = 'weight')",
        ),
        prevents=(
            "Runs 2 and 10: after hours of calibration the quantizer amax and the weights sit in recycled GPU "
            "memory and the export reads them with cudaErrorIllegalAddress; every weight export (linear layers "
            "and each split fused expert) passes through this entry point, so both are moved to the CPU first"
        ),
        wrap=_wrap_export_on_cpu,
    ),
    Patch(
        "activation-scale-clamp",
        Target(
            "modelopt.torch.quantization.qtensor.nvfp4_tensor",
            "NVFP4QTensor.get_activation_scaling_factor",
            "(quantizer)",
        ),
        prevents=(
            "an input quantizer with amax 0 or NaN (it saw no tokens) trips an assert in the export and loses "
            "the run; the scale is clamped to the smallest positive float32 and listed in the report instead"
        ),
        wrap=_wrap_activation_scale_clamp,
    ),
)


def installed_modelopt_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nvidia-modelopt")
    except PackageNotFoundError:
        return "not installed"


def check_targets(patches: tuple[Patch, ...] | None = None) -> None:
    """Resolve every target and compare signatures; raise PatchTargetError, one line naming every
    mismatch and the installed ModelOpt version. ``None``: PATCHES as it is at call time."""
    problems = []
    for patch in PATCHES if patches is None else patches:
        try:
            patch.check()
        except PatchTargetError as err:
            problems.append(str(err))
    if problems:
        raise PatchTargetError(
            f"installed nvidia-modelopt {installed_modelopt_version()} does not match "
            f"patches/modelopt_patches.py: {'; '.join(problems)}"
        )


@contextlib.contextmanager
def applied(patches: tuple[Patch, ...] | None = None) -> Iterator[tuple[Patch, ...]]:
    """Check every target, install the wrappers (each counting its calls), restore on exit.
    ``None``: PATCHES as it is at call time."""
    patches = PATCHES if patches is None else patches
    check_targets(patches)
    installed = []
    try:
        for patch in patches:
            owner, attr, current = patch.resolve()
            raw = inspect.getattr_static(owner, attr)  # keeps a classmethod a classmethod
            patch.calls = 0
            counted = _counting(patch, patch.wrap(current))
            setattr(
                owner,
                attr,
                classmethod(lambda cls, *a, _f=counted, **k: _f(*a, **k))
                if isinstance(raw, classmethod)
                else counted,
            )
            installed.append((owner, attr, raw))
        yield patches
    finally:
        for owner, attr, raw in reversed(installed):
            setattr(owner, attr, raw)


def _counting(patch: Patch, replacement: Callable) -> Callable:
    def counted(*args, **kwargs):
        patch.calls += 1
        return replacement(*args, **kwargs)

    counted.__wrapped__ = replacement
    return counted


def unreached(patches: tuple[Patch, ...] | None = None) -> list[str]:
    """Names of the patches whose wrapper was never called (after a run inside ``applied``)."""
    return [p.name for p in (PATCHES if patches is None else patches) if p.calls == 0]
