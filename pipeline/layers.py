"""The package as layers: what each owns, and which way imports go.

One table, :data:`LAYERS`, lowest layer first. A module may import from its own layer and the layers
below it, never from a layer above, and no chain of imports returns to a module it left (no import
cycles, lazy imports included). So following any command from the command line to the disk goes down:
cli → step → plan → mapping/formats/checkpoint. tests/repo/test_layers.py checks the source against this
table; docs/layers.md is generated from it (:func:`layers_markdown`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]  # dotted prefixes: a package owns every module under it
    owns: str  # what a reader finds here, and why it sits at this height


LAYERS: tuple[Layer, ...] = (
    Layer(
        "plumbing",
        (
            "pipeline",
            "pipeline.errors",
            "pipeline.console",
            "pipeline.progress",
            "pipeline.device",
            "pipeline.children",
            "pipeline.provenance",
            "pipeline.step_options",
            "pipeline.layers",
        ),
        "the one error type (every problem with its file and key), what reaches the terminal and what"
        " goes to the log, progress lines, the device choice, child processes and their signals, code"
        " digests, the defaults every step shares, the package's version, this table",
    ),
    Layer(
        "formats",
        ("pipeline.formats",),
        "the exact number formats (E2M1, UE8M0, FP8 block, MXFP4, NVFP4, the MXFP4 → NVFP4 transcode):"
        " tensors in, tensors out, no files",
    ),
    Layer(
        "checkpoint",
        ("pipeline.checkpoint",),
        "safetensors checkpoints: headers read and validated without loading data, the crash-safe"
        " writer (temporary names, journal, lock, resume), inspect",
    ),
    Layer(
        "rules",
        (
            "pipeline.release_layout",
            "pipeline.mapping",
            "pipeline.amax",
            "pipeline.vllm_config",
            "pipeline.recipes",
            "pipeline.calibration",
            "pipeline.quantize_checks",
            "pipeline.hf_ptq",
            "patches",
            "patches.modelopt_patches",
            "patches.vllm_plugin",
        ),
        "the decision tables, each with its reasons: the release layout, the key mapping of every"
        " dialect, amax files and the rules that resolve them per release module, the vLLM config rewrite, the quantization recipes and calibration data, hf_ptq's"
        " flag contract, the ModelOpt patches and the vLLM plugin's names",
    ),
    Layer(
        "skeleton",
        ("pipeline.streaming_step",),
        "the one streaming step every file-to-file step runs on: the step supplies a plan (from the"
        " headers) and a producer (the output tensors); the skeleton times it, shows progress, writes"
        " through the crash-safe writer and returns the one result type with its one summary",
    ),
    Layer(
        "steps",
        (
            "pipeline.dequant",
            "pipeline.slice",
            "pipeline.convert",
            "pipeline.transcode_scan",
            "pipeline.quantize",
            "pipeline.calibrate",
            "pipeline.hf_ptq_driver",
            "pipeline.vllm_config.files",
            "pipeline.plugin_opt_in",
            "pipeline.serve",
            "pipeline.demo",
            "patches.vllm_export_model",
        ),
        "one job each, from inputs on disk to outputs on disk: a plan from the headers and the rules,"
        " then the work (dequant, slice, convert, quantize, calibrate, fix-config, use-plugin, serve)",
    ),
    Layer(
        "runs",
        ("pipeline.e2e",),
        "several steps in a row: the tiny model end to end",
    ),
    Layer(
        "cli",
        ("pipeline.cli", "pipeline.__main__"),
        "the `dsv4` command: one module per command, named after it; options and help only, the work"
        " imported lazily from the layer it belongs to",
    ),
)


# the top-level packages own only their own __init__: a new module must be placed in a layer by name
ROOTS = ("pipeline", "patches")


def layer_of(module: str) -> Layer | None:
    """The layer owning ``module`` (its longest matching prefix; a root package matches only itself),
    or None."""
    owners = [
        (len(prefix), LAYERS.index(layer))
        for layer in LAYERS
        for prefix in layer.modules
        if module == prefix or (prefix not in ROOTS and module.startswith(prefix + "."))
    ]
    return LAYERS[max(owners)[1]] if owners else None


def height(module: str) -> int:
    """The index in :data:`LAYERS` of the layer owning ``module``; KeyError when none does."""
    layer = layer_of(module)
    if layer is None:
        raise KeyError(f"{module} is in no layer of pipeline.layers.LAYERS")
    return LAYERS.index(layer)


def _wrapped(first: str, rest: str, modules: tuple[str, ...], limit: int = 100) -> list[str]:
    """The modules after ``first``, comma separated, continued after ``rest`` past ``limit``."""
    lines, line = [], first
    for i, module in enumerate(modules):
        word = module + ("," if i < len(modules) - 1 else "")
        if len(line) + len(word) > limit and line not in (first, rest):
            lines.append(line.rstrip())
            line = rest
        line += word + " "
    return [*lines, line.rstrip()]


def layers_markdown() -> str:
    """docs/layers.md (tests/repo/test_layers.py keeps the file equal to this)."""
    lines = [
        "# The package as layers",
        "",
        "Generated by `pipeline.layers.layers_markdown()` from `LAYERS`; do not edit by hand",
        "(tests/repo/test_layers.py fails when this file and the table differ). Regenerate:",
        "",
        "```",
        "python -c 'from pipeline.layers import layers_markdown as m; print(m(), end=\"\")' > docs/layers.md",
        "```",
        "",
        "A module imports from its own layer and the layers below it, never from a layer above, and no",
        "chain of imports comes back to a module it left (the test checks both on the source, lazy",
        "imports included). Following a command from the command line to the disk therefore only goes",
        "down. Highest layer first:",
        "",
        "```",
    ]
    width = max(len(layer.name) for layer in LAYERS)
    for layer in reversed(LAYERS):
        lines += _wrapped(f"{layer.name:>{width}} │ ", f"{'':>{width}} │ ", layer.modules)
        if layer is not LAYERS[0]:
            lines.append(f"{'':>{width}} ▼")
    lines += ["```", "", "| layer | modules | owns |", "|---|---|---|"]
    for layer in reversed(LAYERS):
        modules = ", ".join(f"`{m}`" for m in layer.modules)
        lines.append(f"| {layer.name} | {modules} | {layer.owns} |")
    return "\n".join(lines) + "\n"
