"""One quantization run in our words, and the ONE table from our option names to hf_ptq's argparse
destinations."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import DsV4Error


@dataclass(frozen=True)
class HfPtqConfig:
    """One quantization run in our words. ``None`` means "leave hf_ptq's own default"."""

    model_path: str
    export_path: str
    qformat: str = "nvfp4"
    calib_size: tuple[int, ...] = (128,)  # one entry per dataset (hf_ptq pads/truncates to match)
    calib_seq: int | None = 512
    batch_size: int | None = None  # hf_ptq's 0 = probe the largest batch; the node may want 1
    datasets: tuple[str, ...] | None = None  # None: hf_ptq's fallback (cnn_dailymail + Nemotron v2 mix)
    kv_cache_qformat: str | None = "fp8_cast"
    inference_tensor_parallel: int | None = 8
    inference_pipeline_parallel: int | None = None
    gpu_max_mem_percentage: float | None = 0.7
    use_seq_device_map: bool = True
    trust_remote_code: bool = False
    skip_generate: bool | None = None
    verbose: bool | None = None
    device: str | None = None
    attn_implementation: str | None = None


# our recipe -> hf_ptq's --qformat (a key of modelopt.recipe.presets.QUANT_CFG_CHOICES in 0.47):
# nvfp4_experts_only quantizes the routed experts only, NVIDIA's V4 recipe; nvfp4 every linear.
RECIPE_QFORMAT: Mapping[str, str] = {"experts": "nvfp4_experts_only", "full": "nvfp4"}


# The seeds' notes: "Don't use calib_size=256 — OOMs with 3TB BF16 on CPU offload"; Run 11 used 128.
NODE_CALIB_SIZE_LIMIT = 128


def config_for_recipe(
    recipe: str,
    model_path: str,
    export_path: str,
    *,
    calib_size: int,
    calib_seq: int,
    batch_size: int | None = None,
    calib_file: str | None = None,
    tensor_parallel: int | None = 8,
) -> HfPtqConfig:
    """`dsv4 quantize --driver hf_ptq`'s options as an HfPtqConfig (the seeds' Run 11 settings otherwise)."""
    if recipe not in RECIPE_QFORMAT:
        raise DsV4Error(f"recipe {recipe!r} has no hf_ptq qformat; known: {', '.join(RECIPE_QFORMAT)}")
    if calib_size > NODE_CALIB_SIZE_LIMIT:
        raise DsV4Error(
            f"--calib-size {calib_size}: the seeds' 256-sample calibration ran out of memory on the node (3 TB "
            f"of BF16 offloaded to CPU); Run 11 used {NODE_CALIB_SIZE_LIMIT}, the most this driver passes"
        )
    return HfPtqConfig(
        model_path=model_path,
        export_path=export_path,
        qformat=RECIPE_QFORMAT[recipe],
        calib_size=(calib_size,),
        calib_seq=calib_seq,
        batch_size=batch_size,
        datasets=(calib_file,) if calib_file else None,
        inference_tensor_parallel=tensor_parallel,
    )


# our field -> hf_ptq argparse dest. The flag string itself is read from the contract for that dest.
OPTION_TABLE: Mapping[str, str] = {
    "model_path": "pyt_ckpt_path",
    "export_path": "export_path",
    "qformat": "qformat",
    "calib_size": "calib_size",
    "calib_seq": "calib_seq",
    "batch_size": "batch_size",
    "datasets": "dataset",
    "kv_cache_qformat": "kv_cache_qformat",
    "inference_tensor_parallel": "inference_tensor_parallel",
    "inference_pipeline_parallel": "inference_pipeline_parallel",
    "gpu_max_mem_percentage": "gpu_max_mem_percentage",
    "use_seq_device_map": "use_seq_device_map",
    "trust_remote_code": "trust_remote_code",
    "skip_generate": "skip_generate",
    "verbose": "verbose",
    "device": "device",
    "attn_implementation": "attn_implementation",
}


def seeds_config(model_path: str, export_path: str) -> HfPtqConfig:
    """Run 11's settings: nvfp4, 128 calibration samples of 512 tokens, fp8_cast KV cache, 70% of each
    GPU, sequential device map, tensor parallel 8, hf_ptq's default dataset mix."""
    return HfPtqConfig(model_path=model_path, export_path=export_path)
