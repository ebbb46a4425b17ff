"""dsv4 convert on synthetic ModelOpt exports of the micro model (harness/exports.py: real NVFP4 data, the
key sets of real exports in dialects H and X), checked tensor by tensor against pipeline.formats applied
to the export's own bytes, independently of the step's planning, threading and writing.

The tiny tier (tests/convert/test_convert_tiny.py) converts real ModelOpt exports and scores them through
a reproduction of vLLM's loading; tests/mapping/test_mapping_vllm.py checks the output names against vLLM's own mapper.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from syrupy.extensions.json import JSONSnapshotExtension

from harness.checkpoints import tree_digest
from harness.format_reference import e4m3_nearest, e4m3_values
from pipeline import mapping as M
from pipeline.checkpoint import JOURNAL_NAME, Checkpoint, validate_checkpoint
from pipeline.cli import main as dsv4
from pipeline.convert import REPORT_NAME, convert_checkpoint, plan_convert
from pipeline.errors import DsV4Error
from pipeline.formats import (
    fp8_block_dequantize,
    fp8_block_quantize,
    mxfp4_dequantize,
    nvfp4_dequantize,
)
from pipeline.formats.e2m1 import decode_packed
from pipeline.mapping import target_layout
from pipeline.release_layout import ROUTED_EXPERT

pytestmark = pytest.mark.unit


def load_all(path: Path) -> dict[str, torch.Tensor]:
    return dict(Checkpoint.open(path).iter_tensors())


def raw(t: torch.Tensor) -> bytes:
    return (
        t.contiguous().view(torch.uint8).numpy().tobytes()
        if t.dim()
        else t.reshape(1).view(torch.uint8).numpy().tobytes()
    )


def expected_from_export(export: Path) -> dict[str, torch.Tensor]:
    """What each output tensor must be, from the export's bytes and the mapping table's actions alone."""
    tensors = load_all(export)
    ck = Checkpoint.open(export)
    config = json.loads((export / "config.json").read_text())
    layout = target_layout(config)
    plan = M.plan([(k, i.dtype, i.shape) for k, i in ck.tensors.items()], config)
    out: dict[str, torch.Tensor] = {}
    for m in plan.mappings:
        t = tensors[m.source]
        base = m.source.removesuffix(".weight")
        if m.action in (M.COPY, M.KEEP_NVFP4, M.UNIFY_W13):
            out[m.target] = t
        elif m.action == M.CAST and m.writes:
            out[m.target] = t.to(torch.bfloat16 if layout[m.target].dtype == "BF16" else torch.float32)
        elif m.action == M.NVFP4_TO_FP8 and m.writes:
            w = nvfp4_dequantize(
                t, tensors[base + ".weight_scale"], tensors[base + ".weight_scale_2"], torch.float32
            )
            out[m.writes[0]], out[m.writes[1]] = fp8_block_quantize(w)
        elif m.action == M.NVFP4_TO_BF16 and m.writes:
            w = nvfp4_dequantize(
                t, tensors[base + ".weight_scale"], tensors[base + ".weight_scale_2"], torch.bfloat16
            )
            out[m.target] = w
        elif m.action == M.BF16_TO_FP8:
            out[m.writes[0]], out[m.writes[1]] = fp8_block_quantize(t)
    return out


@pytest.mark.parametrize("recipe", ["experts", "full"])
def test_every_output_tensor_is_its_action_applied_to_the_export(converted, exports, recipe):
    result = converted(recipe)
    got, want = load_all(result.out_dir), expected_from_export(exports(recipe))
    assert got.keys() == want.keys()
    layout = target_layout(json.loads((exports(recipe) / "config.json").read_text()))
    assert set(got) == {k for k in layout if not k.startswith("mtp.")}
    for key, t in got.items():
        assert (t.dtype, tuple(t.shape)) == (want[key].dtype, tuple(want[key].shape)), key
        assert raw(t) == raw(want[key]), key
    actions = {a for (_, _, a) in result.plan.counts()}
    wanted = {M.KEEP_NVFP4, M.UNIFY_W13, M.CAST, M.COPY, M.BF16_TO_FP8}
    if recipe == "full":
        wanted |= {M.NVFP4_TO_FP8, M.NVFP4_TO_BF16}
    assert wanted <= actions


def test_output_validates_and_its_config_is_the_mixed_layout(converted):
    result = converted("full")
    report = validate_checkpoint(result.out_dir, full_scales=True)
    assert report.ok, report.problems
    config = json.loads((result.out_dir / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["moe_quant_algo"], q["scale_fmt"]) == ("fp8", "NVFP4", "ue8m0")
    # no MTP weights in the export, so the output announces none
    assert config["num_nextn_predict_layers"] == 0
    assert len(config["compress_ratios"]) == config["num_hidden_layers"]
    hfq = json.loads((result.out_dir / "hf_quant_config.json").read_text())
    experts = {k.rsplit(".", 1)[0] for k in load_all(result.out_dir) if k.endswith(".weight_scale_2")}
    assert set(hfq["quantization"]["quantized_layers"]) == experts
    assert all(ROUTED_EXPERT.match(k) for k in experts)


def test_dialects_h_and_x_of_the_same_export_convert_to_the_same_bytes(converted):
    """The same tensors under H and X names: the table maps both onto one output, byte for byte."""
    h, x = converted("full", "H"), converted("full", "X")
    assert h.plan.dialect == "H" and x.plan.dialect == "X"
    dh, dx = tree_digest(h.out_dir), tree_digest(x.out_dir)
    dh.pop(REPORT_NAME), dx.pop(REPORT_NAME)  # records the dialect and rule names, which differ
    dh.pop(JOURNAL_NAME), dx.pop(JOURNAL_NAME)  # fingerprints its own input folder
    assert dh == dx


def test_graft_takes_every_non_expert_tensor_from_the_release(converted, _tiny_release_master):
    result = converted("experts", graft=True)
    got, release = load_all(result.out_dir), load_all(_tiny_release_master)
    config = json.loads((_tiny_release_master / "config.json").read_text())
    layout = target_layout(config)
    assert set(got) == set(layout)  # the MTP block too
    grafted = [k for k, spec in layout.items() if spec.fmt != M.NVFP4]
    assert grafted
    for key in grafted:
        assert raw(got[key]) == raw(release[key]), key
    out_config = json.loads((result.out_dir / "config.json").read_text())
    assert out_config["num_nextn_predict_layers"] == config["num_nextn_predict_layers"] == 1
    assert validate_checkpoint(result.out_dir, full_scales=True).ok


def test_graft_transcodes_the_mtp_experts_exactly(converted, exports, _tiny_release_master):
    result = converted("experts", graft=True)
    got, release = load_all(result.out_dir), load_all(_tiny_release_master)
    export = load_all(exports("experts"))
    mtp = sorted({k.rsplit(".", 1)[0] for k in got if k.startswith("mtp.") and k.endswith(".weight_scale_2")})
    assert mtp
    for module in mtp:
        want = mxfp4_dequantize(release[module + ".weight"], release[module + ".scale"], torch.float32)
        have = nvfp4_dequantize(
            got[module + ".weight"],
            got[module + ".weight_scale"],
            got[module + ".weight_scale_2"],
            torch.float32,
        )
        assert torch.equal(have, want), module  # the micro release's exponents fit the window
        assert raw(got[module + ".weight"]) == raw(release[module + ".weight"])  # same E2M1 bytes
        if module.endswith("w1"):
            w3 = module[:-1] + "3"
            assert raw(got[module + ".weight_scale_2"]) == raw(got[w3 + ".weight_scale_2"])
        # the activation scale: the largest calibrated one of the same projection (NVIDIA's fallback)
        proj = module.rsplit(".", 1)[1]
        calibrated = [
            float(v) for k, v in export.items() if k.endswith(f".{proj}.input_scale") and ".experts." in k
        ]
        assert float(got[module + ".input_scale"]) == max(calibrated)


def test_w1_w3_global_scales_are_unified_and_the_error_is_measured(converted, exports):
    """A ModelOpt 0.45-style export gives w1 and w3 their own weight_scale_2; vLLM keeps w1's for the fused
    w13. After convert both have the larger one, codes are untouched, and the reported error equals the
    one computed here from the bytes."""
    result = converted("experts", "H", "separate")
    got = load_all(result.out_dir)
    export = load_all(exports("experts", "H", "separate"))
    h_of = {m.target: m.source for m in result.plan.mapping.mappings}
    changed = err_sq = ref_sq = 0
    experts = sorted({k.rsplit(".", 2)[0] for k in got if ROUTED_EXPERT.match(k.rsplit(".", 1)[0])})
    for expert in experts:
        g1, g3 = (float(got[f"{expert}.{w}.weight_scale_2"]) for w in ("w1", "w3"))
        s1, s3 = (float(export[h_of[f"{expert}.{w}.weight_scale_2"]]) for w in ("w1", "w3"))
        assert g1 == g3 == max(s1, s3), expert
        for w, s in (("w1", s1), ("w3", s3)):
            key = f"{expert}.{w}"
            bs_in = export[h_of[key + ".weight_scale"]]
            assert raw(got[key + ".weight"]) == raw(export[h_of[key + ".weight"]])  # codes unchanged
            if s == g1:
                assert raw(got[key + ".weight_scale"]) == raw(bs_in)
                continue
            changed += 1
            # the e4m3 nearest to block_scale * s / g1, derived from the format (not nvfp4_rescale itself)
            want = e4m3_nearest(e4m3_values(bs_in) * s / g1)
            assert raw(got[key + ".weight_scale"]) == raw(want)
            before = nvfp4_dequantize(export[h_of[key + ".weight"]], bs_in, s, torch.float64)
            after = nvfp4_dequantize(got[key + ".weight"], got[key + ".weight_scale"], g1, torch.float64)
            err_sq += float((after - before).pow(2).sum())
            ref_sq += float(before.pow(2).sum())
    assert changed > 0 and result.stats.unify.changed == changed
    assert result.stats.unify.rel_error == pytest.approx((err_sq / ref_sq) ** 0.5, rel=1e-4)
    assert 0 < result.stats.unify.rel_error < 0.05  # e4m3 rounding of a block scale: at most 1/16 relative


def test_unify_is_a_no_op_when_w1_and_w3_already_share_the_scale(converted, exports):
    result = converted("experts", "X", "shared")
    assert (
        result.stats.unify.experts > 0
        and result.stats.unify.changed == 0
        and result.stats.unify.rel_error == 0
    )


def test_nvfp4_to_fp8_requant_keeps_the_signs_and_the_values(converted, exports):
    """S14: an E2M1 decode that ignored bit 3 (the sign) or indexed the LUT with it broke the NVFP4 -> FP8
    conversion. The converted FP8 attention must equal the export's NVFP4 values up to FP8 rounding."""
    result = converted("full")
    got, export = load_all(result.out_dir), load_all(exports("full"))
    key = "layers.0.attn.wq_a"
    x = M.map_key(f"model.{key}.weight", "X").source.removesuffix(".weight")
    ref = nvfp4_dequantize(
        export[x + ".weight"], export[x + ".weight_scale"], export[x + ".weight_scale_2"], torch.float32
    )
    have = fp8_block_dequantize(got[key + ".weight"], got[key + ".scale"], dtype=torch.float32)
    assert (ref < 0).any() and torch.equal(torch.sign(have)[ref != 0], torch.sign(ref)[ref != 0])
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (have - ref).pow(2).sum())
    assert sqnr > 25  # e4m3 keeps 3 mantissa bits: about 30 dB on these weights


def test_dry_run_writes_nothing_and_prints_the_rule_table(exports, tmp_path, capsys):
    export = exports("full", "H")
    before = tree_digest(export)
    assert dsv4(["convert", str(export), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not (tmp_path / "out").exists() and tree_digest(export) == before
    for fragment in ("dialect H", "h.expert.gate_proj", "keep-nvfp4", "nvfp4->fp8-block", "dropped"):
        assert fragment in text, fragment


def test_resume_after_losing_a_shard_is_byte_identical(exports, tmp_path):
    export = exports("full")
    whole = convert_checkpoint(export, tmp_path / "whole", max_shard_bytes=300_000, progress=False)
    assert whole.shards_written >= 3
    out = tmp_path / "killed"
    convert_checkpoint(export, out, max_shard_bytes=300_000, progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    shards[-2].unlink()
    (out / "model.safetensors.index.json").unlink()
    again = convert_checkpoint(export, out, max_shard_bytes=300_000, resume=True, progress=False)
    assert again.shards_written == 1 and again.shards_kept == len(shards) - 1
    assert tree_digest(out) == tree_digest(tmp_path / "whole")


def _copy_without(export: Path, out: Path, drop_key: str | None = None, edit=None) -> Path:
    from safetensors.torch import save_file

    tensors = load_all(export)
    if drop_key:
        del tensors[drop_key]
    if edit:
        edit(tensors)
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((export / "config.json").read_text())
    return out


def test_a_missing_export_tensor_stops_before_writing(exports, tmp_path):
    key = "model.layers.2.attn.wo_b.weight"
    bad = _copy_without(exports("experts"), tmp_path / "bad", drop_key=key)
    with pytest.raises(DsV4Error, match=r"layers\.2\.attn\.wo_b\.weight"):
        convert_checkpoint(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_unmapped_export_key_is_named_with_the_nearest_rule(exports, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.mla_attn.q_a_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)

    bad = _copy_without(exports("experts", "H"), tmp_path / "bad", edit=add)
    with pytest.raises(
        DsV4Error, match=r"mla_attn\.q_a_proj\.weight: no rule of dialect H.*nearest rule: h\.attn\.q_a_proj"
    ):
        plan_convert(bad, dialect="H")


def test_a_wrong_shape_is_named(exports, tmp_path):
    key = "model.layers.1.ffn.experts.2.w2.weight_scale"

    def shrink(t):
        t[key] = t[key][:, :-1].contiguous()

    bad = _copy_without(exports("experts"), tmp_path / "bad", edit=shrink)
    with pytest.raises(DsV4Error, match=r"experts\.2\.w2"):
        plan_convert(bad)


def test_graft_refuses_a_release_of_another_model(exports, tmp_path):
    from harness.tiny import build_tiny_release

    other = build_tiny_release(tmp_path / "other", "vllm-shaped", seed=0)
    with pytest.raises(DsV4Error, match=r"num_hidden_layers: 4 differs from .*other/config\.json's 2"):
        plan_convert(exports("experts"), graft_from=other)


def test_refuses_to_write_into_its_input(exports, tmp_path):
    export = exports("experts")
    before = tree_digest(export)
    with pytest.raises(DsV4Error, match="inside the input"):
        convert_checkpoint(export, export / "out", progress=False)
    assert tree_digest(export) == before


@pytest.fixture
def json_snapshot(snapshot):
    return snapshot.use_extension(JSONSnapshotExtension)


@pytest.mark.parametrize(
    ("recipe", "dialect", "w13", "graft"),
    [("experts", "X", "shared", False), ("full", "H", "separate", False), ("experts", "X", "shared", True)],
)
def test_snapshot_convert_report(converted, recipe, dialect, w13, graft, json_snapshot):
    """The record written beside the output: outputs per source, rule and action; drops and omissions
    with their reasons; config changes. A change of the mapping table or fix-config shows here."""
    result = converted(recipe, dialect, w13, graft)
    report = json.loads((result.out_dir / REPORT_NAME).read_text())
    assert report.pop("code")  # the code digest (pipeline/provenance.py) changes with every commit
    assert report == {k: v for k, v in result.plan.report().items() if k != "code"}
    assert report == json_snapshot


def test_decode_packed_energy_helper_matches_dequantize():
    """The error measurement weights each block by its codes' energy; check that identity on random data."""
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (8, 16), dtype=torch.uint8, generator=g)
    bs = (torch.rand(8, 2, generator=g) * 4 + 0.5).to(torch.float8_e4m3fn)
    w = nvfp4_dequantize(packed, bs, 0.01, torch.float64)
    energy = decode_packed(packed).unflatten(-1, (-1, 16)).double().pow(2).sum(-1)
    assert torch.allclose(w.pow(2).sum(), (energy * (bs.double() * 0.01).pow(2)).sum())


def test_every_action_that_writes_has_a_runner():
    from pipeline.convert import RUNNERS

    assert set(RUNNERS) == set(M.ACTION_NAMES) - {M.DROP}


def test_the_jobs_that_ask_for_a_gpu_thread_are_actions_that_compute():
    from pipeline.convert.runners import GPU_ACTIONS, RUNNERS

    assert GPU_ACTIONS.issubset(RUNNERS)
    # copies and the table-lookup transcode stay on the CPU threads (docs/benchmarks.md)
    assert not GPU_ACTIONS & {M.COPY, M.KEEP_NVFP4, M.GRAFT, M.CAST, M.TRANSCODE, M.UNIFY_W13}


# ---- --experts transcode (issue: recipe transcode) --------------------------------------------------


def test_transcode_takes_every_expert_from_the_release_bit_exactly(exports, _tiny_release_master, tmp_path):
    """Expert weights: the release's E2M1 bytes with power-of-two scales, dequantizing to the release's
    MXFP4 values bit for bit; activation scales: the export's calibrated ones (MTP: the fallback);
    everything else grafted."""
    export_dir = exports("experts")
    result = convert_checkpoint(
        export_dir, tmp_path / "out", graft_from=_tiny_release_master, experts="transcode", progress=False
    )
    got, release, export = load_all(result.out_dir), load_all(_tiny_release_master), load_all(export_dir)
    modules = sorted({k.removesuffix(".weight_scale_2") for k in got if k.endswith(".weight_scale_2")})
    assert len(modules) == len([k for k in release if ROUTED_EXPERT.match(k.removesuffix(".weight"))])
    x_of = {M.map_key(k, "X").target: k for k in export}
    for module in modules:
        want = mxfp4_dequantize(release[module + ".weight"], release[module + ".scale"], torch.float32)
        have = nvfp4_dequantize(
            got[module + ".weight"],
            got[module + ".weight_scale"],
            got[module + ".weight_scale_2"],
            torch.float32,
        )
        assert torch.equal(have, want), module
        assert raw(got[module + ".weight"]) == raw(release[module + ".weight"])
        if not module.startswith("mtp."):
            assert raw(got[module + ".input_scale"]) == raw(export[x_of[module + ".input_scale"]])
    stats = result.stats.transcode
    assert stats.tensors == len(modules) and stats.exact == stats.tensors and stats.requantized_blocks == 0
    assert f"{len(modules)} of {len(modules)} expert tensors exactly" in result.summary()
    assert validate_checkpoint(result.out_dir, full_scales=True).ok


def test_transcode_needs_the_release(exports):
    with pytest.raises(DsV4Error, match=r"--experts transcode.*--graft-from"):
        plan_convert(exports("experts"), experts="transcode")


# ---- hf_ptq exports carry the MTP block, unquantized, under native names -------------------------------


@pytest.fixture(scope="module")
def hf_ptq_export(_tiny_bf16_master, tmp_path_factory):
    """As a real hf_ptq export of the micro model (GPU tier) is: dialect X plus the BF16 source's mtp.*."""
    from safetensors.torch import load_file, save_file

    from harness.exports import build_synthetic_export

    export = build_synthetic_export(
        _tiny_bf16_master, tmp_path_factory.mktemp("hf-ptq") / "export", recipe="experts", hf_ptq_mtp=True
    )
    # Halve one MTP expert's w1 so its w1 and w3 amax differ, w3's the larger: a shared global scale taken
    # from the smaller of the two (min instead of max), or from w1 alone (what vLLM keeps), must then
    # change the bytes the MTP test compares.
    key = "mtp.0.ffn.experts.1.w1.weight"
    shard = export / "model.safetensors"  # build_synthetic_export writes one shard
    tensors = load_file(shard)
    tensors[key] = (tensors[key].float() * 0.5).to(tensors[key].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    return export


def test_hf_ptq_mtp_block_is_quantized_without_the_release(hf_ptq_export, tmp_path):
    """Without --graft-from: MTP attention BF16 -> FP8 tiles, MTP experts BF16 -> NVFP4 (w1/w3 one global
    scale), their activation scales the fallback; the output keeps the MTP block."""
    from pipeline.formats import nvfp4_global_scale, nvfp4_quantize

    result = convert_checkpoint(hf_ptq_export, tmp_path / "out", progress=False)
    got, src = load_all(result.out_dir), load_all(hf_ptq_export)  # the export carries hf_ptq's BF16 mtp.*
    assert (
        result.plan.has_mtp
        and json.loads((result.out_dir / "config.json").read_text())["num_nextn_predict_layers"] == 1
    )
    q, s = fp8_block_quantize(src["mtp.0.attn.wq_a.weight"])
    assert raw(got["mtp.0.attn.wq_a.weight"]) == raw(q) and raw(got["mtp.0.attn.wq_a.scale"]) == raw(s)
    e = "mtp.0.ffn.experts.1"
    a1, a3 = (src[f"{e}.{w}.weight"].float().abs().amax() for w in ("w1", "w3"))
    assert a1 < a3  # else min, max and w1's own could not be told apart
    amax = torch.maximum(a1, a3)
    for w in ("w1", "w3"):
        packed, block, _ = nvfp4_quantize(src[f"{e}.{w}.weight"], weight_scale_2=nvfp4_global_scale(amax))
        assert raw(got[f"{e}.{w}.weight"]) == raw(packed) and raw(got[f"{e}.{w}.weight_scale"]) == raw(block)
        assert float(got[f"{e}.{w}.weight_scale_2"]) == float(nvfp4_global_scale(amax))
    calibrated = [float(v) for k, v in src.items() if k.endswith(".w2.input_scale")]
    assert float(got[f"{e}.w2.input_scale"]) == max(calibrated)
    assert validate_checkpoint(result.out_dir, full_scales=True).ok


def test_hf_ptq_mtp_experts_come_from_the_release_when_grafting(
    hf_ptq_export, _tiny_release_master, tmp_path
):
    """With --graft-from the MTP experts are transcoded from the release (exact), not re-quantized from
    the BF16 copy hf_ptq carried."""
    result = convert_checkpoint(
        hf_ptq_export, tmp_path / "out", graft_from=_tiny_release_master, progress=False
    )
    got, release = load_all(result.out_dir), load_all(_tiny_release_master)
    e = "mtp.0.ffn.experts.2.w3"
    want = mxfp4_dequantize(release[e + ".weight"], release[e + ".scale"], torch.float32)
    have = nvfp4_dequantize(
        got[e + ".weight"], got[e + ".weight_scale"], got[e + ".weight_scale_2"], torch.float32
    )
    assert torch.equal(have, want)
    actions = {a for (_, _, a) in result.plan.counts()}
    assert M.TRANSCODE in actions and M.BF16_TO_NVFP4 not in actions


def _recording_pool(real_pool, asked: list):
    """producer_pool, with each job's ask for a GPU thread (``gpu=``) recorded beside its first argument."""

    @contextlib.contextmanager
    def pool_of(converters, name):
        with real_pool(converters, name) as pool:

            class Recording:
                def submit(self, fn, *args, gpu=False):
                    asked.append((args[0], gpu))
                    return pool.submit(fn, *args, gpu=gpu)

            yield Recording()

    return pool_of


def test_convert_asks_a_gpu_thread_for_exactly_the_jobs_that_compute(exports, tmp_path, monkeypatch):
    """The routing (pipeline.checkpoint.producer.Converters): what each job asks of the pool, recorded
    around the real CPU pool."""
    import pipeline.convert.produce as produce
    from pipeline.convert.runners import GPU_ACTIONS

    asked: list = []
    monkeypatch.setattr(produce, "producer_pool", _recording_pool(produce.producer_pool, asked))
    convert_checkpoint(exports("full", "H", "separate"), tmp_path / "out", device="cpu", progress=False)
    by_action = {(job.action, gpu) for job, gpu in asked}
    assert {gpu for _, gpu in by_action} == {True, False}  # the full recipe has jobs of both kinds
    assert all(gpu == (action in GPU_ACTIONS) for action, gpu in by_action), sorted(by_action)


def test_dequant_asks_no_gpu_thread(tiny_release, tmp_path, monkeypatch):
    import pipeline.dequant as D

    asked: list = []
    monkeypatch.setattr(D, "producer_pool", _recording_pool(D.producer_pool, asked))
    D.dequantize_checkpoint(tiny_release, tmp_path / "out", device="cpu", progress=False)
    assert asked and not any(gpu for _, gpu in asked)
