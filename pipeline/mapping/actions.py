"""What happens to the bytes: the action vocabulary (:data:`ACTION_NAMES`), the table :data:`ACTIONS`
from a source tensor's form (suffix + stored dtype) and the target format to an action, and
:func:`decide_action`, which applies it to one renamed tensor."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from pipeline.release_layout import FP8, PLAIN, scale_key

from .errors import MappingError
from .target import NVFP4, TargetTensor, _base, _role, _role_layout

COPY = "copy"
KEEP_NVFP4 = "keep-nvfp4"
NVFP4_TO_FP8 = "nvfp4->fp8-block"
NVFP4_TO_BF16 = "nvfp4->bf16"
BF16_TO_FP8 = "bf16->fp8-block"
CAST = "cast"
UNIFY_W13 = "unify-w13-global-scale"
DROP = "drop"
# Source choices of `dsv4 convert` beyond the export's own tensors (not decided by a source form, so not
# rows of ACTIONS): the release checkpoint given by --graft-from supplies them.
GRAFT = "graft"
TRANSCODE = "mxfp4->nvfp4-transcode"
FALLBACK_INPUT_SCALE = "fallback-input-scale"
BF16_TO_NVFP4 = "bf16->nvfp4"
# Actions of `dsv4 convert RELEASE --amax AMAX` (no export: the release and an amax file supply everything).
# Each reproduces what ModelOpt's export and today's convert do to the same tensor, from the release.
REQUANTIZE_EXPERT = "mxfp4->bf16->nvfp4"
INPUT_SCALE = "amax->input-scale"
FP8_VIA_NVFP4 = "fp8-block->bf16->nvfp4->fp8-block"
BF16_VIA_NVFP4 = "bf16->nvfp4->bf16"
FP8_REQUANT = "fp8-block->bf16->fp8-block"
ACTION_NAMES: dict[str, str] = {
    COPY: "bytes as they are",
    KEEP_NVFP4: "routed-expert NVFP4 tensor kept as exported",
    NVFP4_TO_FP8: "dequantize NVFP4, requantize to FP8 128x128 tiles with UE8M0 scales",
    NVFP4_TO_BF16: "dequantize NVFP4 to BF16",
    BF16_TO_FP8: "quantize a float weight to FP8 128x128 tiles with UE8M0 scales",
    CAST: "cast to the dtype the release stores (e.g. F32 norm -> BF16)",
    UNIFY_W13: "give expert w1 and w3 one weight_scale_2 (vLLM keeps w1's for the fused w13)",
    DROP: "not written; the reason says why",
    BF16_TO_NVFP4: "quantize a float routed expert to NVFP4 by ModelOpt's rule (w1 and w3 sharing one global "
    "scale), for the MTP experts an hf_ptq export carries unquantized",
    GRAFT: "byte for byte from the release checkpoint (--graft-from): every tensor that is not a routed expert",
    TRANSCODE: "a routed expert the export lacks (the MTP block's) from the release's MXFP4: same E2M1 codes, "
    "power-of-two NVFP4 scales (pipeline.formats.mxfp4_to_nvfp4; exact where the exponents fit e4m3)",
    FALLBACK_INPUT_SCALE: "input_scale of an expert no calibration saw (transformers has no MTP module): the "
    "largest calibrated input_scale of the same projection in the export (NVIDIA's fallback)",
    REQUANTIZE_EXPERT: "a routed expert from the release's MXFP4, dequantized to BF16 (exactly, as dsv4 dequant "
    "does) and quantized to NVFP4 with weight_scale_2 = weight amax / (6*448) from the amax file (w1 and w3 "
    "sharing the larger): what ModelOpt's export writes for the BF16 copy (--amax, --experts requantize)",
    INPUT_SCALE: "an expert's input_scale = input amax / (6*448) in float32, as ModelOpt's export computes it, "
    "from the amax file (or, for an expert no calibration saw, NVIDIA's fallback: the largest calibrated "
    "input amax of its projection)",
    FP8_VIA_NVFP4: "--amax --recipe full: a release FP8 weight dequantized to BF16, quantized to NVFP4 with its "
    "weight amax (what ModelOpt's full-recipe export holds), then to FP8 128x128 tiles with UE8M0 scales "
    "(what convert does to that export: vLLM reads these layers as FP8 block)",
    BF16_VIA_NVFP4: "--amax --recipe full: a release BF16 weight (compressor, indexer weights_proj) quantized "
    "to NVFP4 with its weight amax, then dequantized to BF16 (vLLM builds these layers unquantized)",
    FP8_REQUANT: "--amax --recipe full: a release FP8 weight no quantizer covers (wo_a, a grouped linear "
    "ModelOpt leaves BF16) dequantized to BF16 and quantized to FP8 tiles again, as convert does to the "
    "full recipe's BF16 wo_a (on UE8M0-tiled values this gives back the release's bytes)",
}

# Source forms, from (suffix, stored dtype).
_FLOATS = ("BF16", "F16", "F32")


def source_form(key: str, dtype: str) -> str:
    """What a stored tensor is: nvfp4.{weight,block_scale,global_scale,input_scale}, fp8.weight,
    mxfp4.weight, block_scale (a release .scale), float or int."""
    if key.endswith(".weight_scale_2"):
        return "nvfp4.global_scale" if dtype == "F32" else f"unknown(.weight_scale_2 {dtype})"
    if key.endswith(".weight_scale"):
        return "nvfp4.block_scale" if dtype == "F8_E4M3" else f"unknown(.weight_scale {dtype})"
    if key.endswith(".input_scale"):
        return "nvfp4.input_scale" if dtype == "F32" else f"unknown(.input_scale {dtype})"
    if key.endswith(".scale"):
        return "block_scale" if dtype in ("F8_E8M0", "F32") else f"unknown(.scale {dtype})"
    if dtype == "U8":
        return "nvfp4.weight"
    if dtype == "F8_E4M3":
        return "fp8.weight"
    if dtype == "I8":
        return "mxfp4.weight"
    if dtype in _FLOATS:
        return "float"
    if dtype.startswith(("I", "U")):
        return "int"
    return f"unknown({dtype})"


# What the action writes: the target key itself, the target weight and its .scale sibling, an NVFP4
# weight with its two scales (its .input_scale comes from elsewhere), or nothing.
SELF, WEIGHT_AND_SCALE, NVFP4_WEIGHT, NOTHING = "self", "weight+scale", "nvfp4-weight", "nothing"


@dataclass(frozen=True)
class ActionRule:
    form: str  # source_form(...)
    target_fmt: str  # FP8, NVFP4 or PLAIN
    action: str
    writes: str  # SELF, WEIGHT_AND_SCALE, NVFP4_WEIGHT or NOTHING
    reason: str
    where: str | None = None  # only for targets this regex searches (None: any); the first match wins


_OPERAND = "operand of the weight's conversion (read with X.weight; no key of its own in the target)"
_NO_STATIC_ACT = (
    "NVFP4 activation scale of a layer vLLM builds as FP8 block or BF16 (dynamic activations): "
    "no parameter takes it (seeds S5: KeyError 'fused_wkv_wgate.input_scale')"
)

ACTIONS: tuple[ActionRule, ...] = (
    # FP8 block targets: attention wq_a/wq_b/wkv/wo_a/wo_b, shared experts, indexer wq_b, MTP e/h_proj
    ActionRule("fp8.weight", FP8, COPY, SELF, "already FP8 block, as the release stores it"),
    ActionRule("block_scale", FP8, COPY, SELF, "the FP8 weight's tile scale, as the release stores it"),
    ActionRule(
        "nvfp4.weight",
        FP8,
        NVFP4_TO_FP8,
        WEIGHT_AND_SCALE,
        "vLLM's V4 attention reads these layers as FP8 block (deepseek_v4_fp8_einsum, fused_wqa_wkv); "
        "NVFP4 bytes there were S7/S8/S15",
    ),
    ActionRule("nvfp4.block_scale", FP8, NVFP4_TO_FP8, NOTHING, _OPERAND),
    ActionRule("nvfp4.global_scale", FP8, NVFP4_TO_FP8, NOTHING, _OPERAND),
    ActionRule("nvfp4.input_scale", FP8, DROP, NOTHING, _NO_STATIC_ACT),
    ActionRule(
        "float",
        FP8,
        BF16_TO_FP8,
        WEIGHT_AND_SCALE,
        "a layer ModelOpt left unquantized (wo_a, a grouped linear; or all attention in the experts "
        "recipe) where vLLM reads FP8 block (S13.5)",
    ),
    # NVFP4 targets: routed experts (ModelOptNvFp4FusedMoE)
    ActionRule("nvfp4.weight", NVFP4, KEEP_NVFP4, SELF, "vLLM loads routed experts as ModelOpt NVFP4"),
    ActionRule("nvfp4.block_scale", NVFP4, KEEP_NVFP4, SELF, "NVFP4 block scale of a routed expert"),
    ActionRule("nvfp4.global_scale", NVFP4, KEEP_NVFP4, SELF, "NVFP4 global scale of a routed expert"),
    ActionRule(
        "nvfp4.input_scale",
        NVFP4,
        KEEP_NVFP4,
        SELF,
        "activation scale of a routed expert (vLLM takes the max of w1's and w3's for w13)",
    ),
    ActionRule(
        "float",
        NVFP4,
        BF16_TO_NVFP4,
        NVFP4_WEIGHT,
        "an MTP routed expert that hf_ptq carried unquantized (no calibration reaches the MTP block); in "
        "the layers a float routed expert is an export that skipped the experts, and stays an error",
        where=r"^mtp\.",
    ),
    ActionRule(
        "mxfp4.weight",
        NVFP4,
        DROP,
        NOTHING,
        "the release's MXFP4 routed expert: the NVFP4 expert comes from the quantized export",
    ),
    ActionRule(
        "block_scale",
        NVFP4,
        DROP,
        NOTHING,
        "the release's MXFP4 expert scale: the NVFP4 expert comes from the quantized export",
    ),
    # plain targets: norms, router, compressor, indexer weights_proj, embed, head, hc, sinks, ape
    ActionRule("float", PLAIN, COPY, SELF, "the dtype the release stores"),  # same dtype; else CAST
    ActionRule("int", PLAIN, COPY, SELF, "integer table (hash routing)"),
    ActionRule(
        "nvfp4.weight",
        PLAIN,
        NVFP4_TO_BF16,
        SELF,
        "vLLM builds compressor.fused_wkv_wgate and indexer.weights_proj unquantized (BF16) and the "
        "compressor reads the weight with torch.mm directly (S7, S15)",
    ),
    ActionRule("nvfp4.block_scale", PLAIN, NVFP4_TO_BF16, NOTHING, _OPERAND),
    ActionRule("nvfp4.global_scale", PLAIN, NVFP4_TO_BF16, NOTHING, _OPERAND),
    ActionRule("nvfp4.input_scale", PLAIN, DROP, NOTHING, _NO_STATIC_ACT),
)
_ACTION_INDEX: dict[tuple[str, str], list[ActionRule]] = defaultdict(list)
for _a in ACTIONS:
    _ACTION_INDEX[(_a.form, _a.target_fmt)].append(_a)


def _action_rule(form: str, target_fmt: str, target: str) -> ActionRule | None:
    return next(
        (
            a
            for a in _ACTION_INDEX.get((form, target_fmt), ())
            if a.where is None or re.search(a.where, target)
        ),
        None,
    )


_W13_SCALE = re.compile(r"\.experts\.\d+\.w[13]\.weight_scale(_2)?$")
_UNIFY_REASON = (
    "vLLM keeps w1's weight_scale_2 for the fused w13 and warns, then uses the wrong scale for w3, "
    "when w3's differs: w1 and w3 get one global scale (block scales re-expressed against it)"
)


def decide_action(target: str, dtype: str, spec: TargetTensor) -> tuple[str, str, tuple[str, ...]]:
    """(action, reason, keys written) for a tensor of stored ``dtype`` renamed to ``target`` whose
    target-layout entry (or its weight's) is ``spec``."""
    form = source_form(target, dtype)
    # a sibling that the target format has no place for is decided by its form alone
    entry = _action_rule(form, spec.fmt, target)
    if entry is None:
        raise MappingError(
            f"{target}: no action turns a {form} tensor ({dtype}) into the target's {spec.fmt} "
            f"{spec.dtype} (e.g. routed experts must arrive quantized as NVFP4)"
        )
    action, reason = entry.action, entry.reason
    if entry.form == "float" and spec.fmt == PLAIN and dtype != spec.dtype:
        if spec.dtype not in _FLOATS:
            raise MappingError(f"{target}: a {dtype} tensor cannot become the target's {spec.dtype}")
        action, reason = CAST, f"{dtype} -> {spec.dtype}, the dtype the release stores"
    if spec.fmt == NVFP4 and entry.action == KEEP_NVFP4 and _W13_SCALE.search(target):
        action, reason = UNIFY_W13, _UNIFY_REASON
    base = _base(target)
    if entry.writes == NOTHING:
        writes: tuple[str, ...] = ()
    elif entry.writes in (WEIGHT_AND_SCALE, NVFP4_WEIGHT):
        if base + ".weight" != target:
            raise MappingError(f"{target}: a {form} tensor ({dtype}) under a suffix that is not .weight")
        if entry.writes == WEIGHT_AND_SCALE:
            writes = (target, scale_key(target))
        else:
            writes = (target, base + ".weight_scale", base + ".weight_scale_2")
    else:
        if _role(target) not in _role_layout():
            raise MappingError(
                f"{target}: a {form} tensor ({dtype}) has no place in the target's {spec.fmt} layout"
            )
        writes = (target,)
    return action, reason, writes
