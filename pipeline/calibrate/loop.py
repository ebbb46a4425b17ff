"""One decoder layer through ModelOpt: quantizers inserted by the recipe, max calibration over the
captured inputs, NVIDIA's fallbacks, amax out under the names whole-model calibration gives them.

Why the layer is quantized inside a holder (``holder.model.layers[str(i)]``): ModelOpt matches the recipe's
patterns, and its shared-weight groups (the shared experts' gate/up), against module names. Under the
holder every name is the whole model's (``model.layers.3.mlp.experts.gate_up_proj_input_quantizer``), so
the same patterns match the same quantizers, the amax keys need no renaming, and the fallbacks' messages
name the quantizer as `dsv4 quantize` would.

Why one forward: max calibration runs the forward with quantization off while it collects amax, so the
outputs of that same forward are the next layer's inputs as whole-model calibration computes them.
ModelOpt's own layer-wise mode runs each layer twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.errors import DsV4Error


@dataclass
class LayerResult:
    amax: dict[str, torch.Tensor]  # full ModelOpt names -> 0-d float32 on the CPU
    outputs: list[torch.Tensor]  # the layer's output per batch: the next layer's hidden states
    fallbacks: list = field(default_factory=list)  # pipeline.quantize.Fallback, as dsv4 quantize reports
    quantizers: int = 0  # enabled weight and input quantizers


def force_eager_experts(config) -> None:
    """ModelOpt intercepts the fused experts' per-expert F.linear only in transformers' eager experts
    path. On a whole model mtq.quantize switches ``config._experts_implementation`` to eager itself; on a
    bare layer it does not, and the experts' input quantizers would get no amax (8 of 40 on the micro
    model). The layers share the model's config object, so setting it there reaches them all."""
    config._experts_implementation = "eager"


def _holder(index: int, layer: torch.nn.Module) -> torch.nn.Module:
    holder = torch.nn.Module()
    holder.model = torch.nn.Module()
    holder.model.layers = torch.nn.ModuleDict({str(index): layer})
    return holder


def calibrate_layer(
    index: int, layer: torch.nn.Module, recipe: str, hidden: list[torch.Tensor], kwargs: list[dict]
) -> LayerResult:
    import modelopt.torch.quantization as mtq

    from pipeline.quantize import amax_snapshot, apply_fallbacks, enabled_quantizers, quantizers
    from pipeline.recipes import recipe_config

    holder = _holder(index, layer)
    outputs: list[torch.Tensor] = []
    runs = 0

    def forward_loop(model) -> None:
        nonlocal runs
        runs += 1
        outputs.clear()
        block = model.model.layers[str(index)]
        with torch.no_grad():
            for h, kw in zip(hidden, kwargs, strict=True):
                out = block(h, **kw)
                outputs.append(out[0] if isinstance(out, tuple) else out)

    mtq.quantize(holder, recipe_config(recipe), forward_loop)
    if runs != 1:
        # a second pass may run with quantization on: its outputs are not the next layer's inputs
        raise DsV4Error(
            f"layer {index}: ModelOpt ran the calibration loop {runs} times; dsv4 calibrate takes the next "
            "layer's inputs from the one max-calibration pass (the installed ModelOpt changed)"
        )
    found = quantizers(holder)
    fallbacks = apply_fallbacks(holder, found)
    return LayerResult(amax_snapshot(found), outputs, fallbacks, len(enabled_quantizers(found)))
