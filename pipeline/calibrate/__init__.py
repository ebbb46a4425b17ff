"""`dsv4 calibrate`: ModelOpt calibration of DeepSeek V4 one decoder layer at a time, from the release.

run        calibrate_release, CalibrateOptions, CalibrateReport: the step
skeleton   transformers' model on the meta device, as from_pretrained(dtype=bfloat16) builds it; where and
           in which dtype each release tensor goes
capture    layer 0's inputs for every calibration batch
weights    one layer's release tensors read, dequantized (pipeline.dequant.convert) and placed
loop       one layer through mtq.quantize: amax under whole-model names, NVIDIA's fallbacks
workdir    the resumable work folder beside AMAX
amax_file  the AMAX file: the keys of dsv4 quantize's calibration snapshot, metadata in its header
"""

from .run import CalibrateOptions, CalibrateReport, LayerReport, calibrate_release

__all__ = ["CalibrateOptions", "CalibrateReport", "LayerReport", "calibrate_release"]
