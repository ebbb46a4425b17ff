"""The vLLM plugin of this package: load a ModelOpt NVFP4 export directly, converting it as it loads.

Installed with the package as an entry point of group ``vllm.general_plugins`` (pyproject.toml:
``dsv4_nvfp4 = "patches.vllm_plugin:register"``). vLLM calls every function of that group in every
process it starts — the API server, the engine core, each worker, and the subprocess that inspects a
model class — through ``vllm.plugins.load_general_plugins``. So the registration reaches the workers,
where the weights load: the seeds' S3 patched vLLM in the launcher, and the spawned workers never saw
it. Nothing is patched: :func:`register` only adds an architecture of our own name to
``vllm.ModelRegistry``, so no class attribute cached at import can go stale (the seeds' S2: a mapper
patched after vLLM had bound it as a class attribute did nothing).

Opt-in, never active by surprise: vLLM builds our class only for a checkpoint whose config.json
``architectures`` names :data:`ARCHITECTURE`, which ``dsv4 use-plugin CKPT`` writes (and ``--off``
takes back). Every other checkpoint, DeepSeek V4 included, loads exactly as without the plugin: the
registry's other entries are untouched (tests/plugin/test_vllm_plugin.py compares them).

The class (``patches/vllm_export_model.py``, registered by name so that importing it — and vLLM's
model code, which may initialise CUDA — waits until a process actually builds the model) subclasses
vLLM's ``DeepseekV4ForCausalLM`` and overrides only ``load_weights``: each (name, tensor) of the export
goes through :class:`pipeline.convert.stream.StreamConverter` — the mapping table and the actions of
``dsv4 convert`` — and comes out under the release's names, which the parent's own loader expects.

This module imports nothing from vLLM at import time (``dsv4 use-plugin`` reads :data:`ARCHITECTURE`
in an environment without vLLM).
"""

from __future__ import annotations

ARCHITECTURE = "DeepseekV4NVFP4ExportForCausalLM"
MODEL_CLASS = "patches.vllm_export_model:DeepseekV4NVFP4ExportForCausalLM"
ENTRY_POINT_GROUP = "vllm.general_plugins"
ENTRY_POINT_NAME = "dsv4_nvfp4"


def register() -> None:
    """Add :data:`ARCHITECTURE` to vLLM's model registry (lazily, by module path). Safe to call again:
    vLLM may load general plugins more than once per process."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


__all__ = ["ARCHITECTURE", "ENTRY_POINT_GROUP", "ENTRY_POINT_NAME", "MODEL_CLASS", "register"]
