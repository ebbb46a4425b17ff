"""A ModelOpt NVFP4 export (dialect H, X or N) -> the layout vLLM's DeepSeek V4 loads.

The output is :func:`pipeline.mapping.target_layout`: the release layout (native names, FP8 block
attention with UE8M0 ``.scale``, BF16/F32 plain tensors) with every routed expert as ModelOpt NVFP4
(``.weight``, ``.weight_scale``, ``.weight_scale_2``, ``.input_scale``), plus config.json and
hf_quant_config.json from ``pipeline.vllm_config.fix_config``. Names and actions come from the one table in
``pipeline.mapping``; this module only decides where each output tensor's bytes come from and runs the
action:

* from the export, by its mapping (copy, cast, keep NVFP4, NVFP4 -> FP8 block, NVFP4 -> BF16,
  BF16 -> FP8 block, drop);
* with ``graft_from`` (a release checkpoint): every tensor that is not a routed expert, byte for byte
  from the release (NVIDIA's experts-only recipe keeps attention exactly as released), and the routed
  experts the export lacks (the MTP block's: transformers has no MTP module) transcoded from the
  release's MXFP4, with an activation scale from the export's calibrated experts;
* without it, the MTP block is left out and config.json says ``num_nextn_predict_layers: 0`` (serve
  without MTP speculative decoding).

vLLM fuses each expert's w1 and w3 into one w13 and keeps w1's ``weight_scale_2`` for both; where an
export gives them different global scales (ModelOpt 0.45 did, per expert), both get the larger one and
the block scales of the other are re-expressed against it (``nvfp4_rescale``; codes unchanged). The
error that adds is measured exactly and reported.

The same machinery as ``dsv4 dequant``: inputs validated first (headers, layout, every key mapped,
shapes), the output planned from headers, written shard by shard through the crash-safe writer
(``--resume`` gives byte-identical output), conversions on the GPU when there is one.

The package, top down (each module imports only those below it):

step       convert_step / convert_checkpoint: the plan and the producer, handed to pipeline.streaming_step;
           the lines convert adds under the summary
tables     rule_table, dry_run_table
produce    make_producer: runs each output's job, ``workers`` ahead, for the writer
plan       ConvertPlan, plan_convert: validate, map, build the jobs, layout, config, dropped keys
jobs       Job, JobTable and the passes that build them (export, graft/transcode, fallback input scales)
runners    RUNNERS (one per mapping action), run_job, run_action, RunStats
stream     StreamConverter: the same mapping and runners on a stream of (name, tensor) (the vLLM plugin)
constants  STEP, EXPERT_SOURCES, REPORT_NAME: torch-free, for `dsv4 convert --help`

Names are loaded on first use (PEP 562), so that `from pipeline.convert.constants import ...` does not
import torch.
"""

from __future__ import annotations

import importlib

# name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "EXPERT_SOURCES": "constants",
    "REPORT_NAME": "constants",
    "STEP": "constants",
    "_EXPERT_SIBLING": "constants",
    "Job": "jobs",
    "JobTable": "jobs",
    "RUNNERS": "runners",
    "RunStats": "runners",
    "TranscodeStats": "runners",
    "UnifyStats": "runners",
    "run_action": "runners",
    "run_job": "runners",
    "ConvertPlan": "plan",
    "plan_convert": "plan",
    "make_producer": "produce",
    "dry_run_table": "tables",
    "rule_table": "tables",
    "convert_checkpoint": "step",
    "convert_step": "step",
    "summary_details": "step",
    "StreamConvertError": "stream",
    "StreamConverter": "stream",
    "StreamSummary": "stream",
}

__all__ = sorted(n for n in _EXPORTS if not n.startswith("_"))


def __getattr__(name: str):
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # next time without __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
