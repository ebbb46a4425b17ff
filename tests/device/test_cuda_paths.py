"""The GPU tier: what a CPU cannot check. Run it with bench/gpu_tier.sh on a machine with CUDA.

- every pipeline/formats function gives the same bytes on CUDA as on the CPU;
- `dsv4 dequant --device cuda` and `dsv4 convert --device cuda` (every action, graft, transcode) write
  the same bytes as the CPU path;
- the micro model through ModelOpt with CUDA calibration and a forward with quantization ON (the
  fake-quant kernels need CUDA), scored against the BF16 model;
- the export-on-cpu patch (seeds' Runs 2 and 10) actually moves CUDA weights and amax at export, and
  the NVFP4 weights it writes equal a CPU run's byte for byte.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import formats as F
from pipeline.formats.e2m1 import block_square_sums

pytestmark = pytest.mark.gpu


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _weight(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02 + torch.randn(shape, generator=gen).pow(3) * 0.004
    return w.to(torch.bfloat16)


CASES = {
    "fp8_block_quantize-ue8m0": lambda w: F.fp8_block_quantize(w, scale_fmt="ue8m0"),
    "fp8_block_quantize-float32": lambda w: F.fp8_block_quantize(w, scale_fmt="float32"),
    "fp8_block_dequantize": lambda w: (F.fp8_block_dequantize(*F.fp8_block_quantize(w)),),
    "mxfp4_quantize": lambda w: F.mxfp4_quantize(w),
    "mxfp4_dequantize": lambda w: (F.mxfp4_dequantize(*F.mxfp4_quantize(w)),),
    "mxfp4_to_fp8_block": lambda w: F.mxfp4_to_fp8_block(*F.mxfp4_quantize(w)),
    "nvfp4_quantize": lambda w: F.nvfp4_quantize(w),
    "nvfp4_dequantize": lambda w: (F.nvfp4_dequantize(*F.nvfp4_quantize(w)),),
    "e2m1_roundtrip": lambda w: (F.e2m1_encode(w * 100), F.e2m1_decode(F.e2m1_encode(w * 100))),
    "mxfp4_to_nvfp4": lambda w: F.mxfp4_to_nvfp4(*F.mxfp4_quantize(w))[:3],
    "nvfp4_rescale": lambda w: (F.nvfp4_rescale(F.nvfp4_quantize(w)[1], 0.01, 0.0137),),
    "block_square_sums": lambda w: (block_square_sums(F.nvfp4_quantize(w)[0], 16),),
    # one amax per row: thousands of divisions (a product with the reciprocal differs for ~1 in 5)
    "nvfp4_global_scale": lambda w: (F.nvfp4_global_scale(w.float().abs().amax(-1)),),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("shape", [(3072, 7168), (7168, 3072), (130, 8000)], ids=str)
def test_format_on_cuda_gives_the_cpu_bytes(name, shape):
    w = _weight(shape, seed=shape[0])
    on_cpu = CASES[name](w)
    on_gpu = CASES[name](w.cuda())
    assert all(t.device.type == "cuda" for t in on_gpu)  # results follow the input's device
    assert all(_same(a, b) for a, b in zip(on_cpu, on_gpu, strict=True))


# where the converter threads put their tensors (pipeline.checkpoint.producer.Converters): every one on
# the GPU (no CPU threads), or the step's own mix (the jobs that ask for the GPU on its thread when free)
THREADS = {"all-on-gpu": dict(workers=0, gpu_workers=2), "gpu-beside-cpu": dict(workers=2, gpu_workers=1)}


@pytest.fixture(params=sorted(THREADS))
def on_cuda(request) -> dict:
    return dict(device="cuda", **THREADS[request.param])


def test_dequant_on_cuda_writes_the_cpu_bytes(tmp_path, on_cuda):
    from harness.checkpoints import tree_digest
    from harness.tiny import build_tiny_release
    from pipeline.dequant import dequantize_checkpoint

    src = build_tiny_release(tmp_path / "release", "vllm-shaped", seed=0)
    dequantize_checkpoint(src, tmp_path / "cpu", device="cpu", progress=False)
    dequantize_checkpoint(src, tmp_path / "cuda", progress=False, **on_cuda)
    assert tree_digest(tmp_path / "cpu") == tree_digest(tmp_path / "cuda")


@pytest.mark.parametrize(
    ("recipe", "dialect", "w13", "options"),
    [
        ("full", "H", "separate", {}),  # every action: NVFP4->FP8, NVFP4->BF16, BF16->FP8, unify, cast
        ("experts", "X", "shared", {"graft": True}),  # graft + the MTP experts transcoded
        ("experts", "X", "shared", {"graft": True, "experts": "transcode"}),
    ],
    ids=["full-H-separate", "experts-graft", "transcode"],
)
def test_convert_on_cuda_writes_the_cpu_bytes(tmp_path, recipe, dialect, w13, options, on_cuda):
    from harness.checkpoints import tree_digest
    from harness.exports import build_synthetic_export
    from harness.tiny import build_tiny_release
    from pipeline.convert import convert_checkpoint
    from pipeline.dequant import dequantize_checkpoint

    release = build_tiny_release(tmp_path / "release", "vllm-shaped", seed=0)
    bf16 = dequantize_checkpoint(release, tmp_path / "bf16", progress=False).out_dir
    export = build_synthetic_export(bf16, tmp_path / "export", recipe=recipe, dialect=dialect, w13_global=w13)
    kw = {
        "graft_from": release if options.get("graft") else None,
        "experts": options.get("experts", "export"),
    }
    cpu = convert_checkpoint(export, tmp_path / "cpu", device="cpu", progress=False, **kw)
    gpu = convert_checkpoint(export, tmp_path / "cuda", progress=False, **kw, **on_cuda)
    assert tree_digest(cpu.out_dir) == tree_digest(gpu.out_dir)
    assert gpu.stats.unify.rel_error == pytest.approx(cpu.stats.unify.rel_error, rel=1e-6)


def test_convert_amax_on_cuda_writes_the_cpu_bytes(tmp_path, on_cuda):
    from harness.amax_files import write_amax
    from harness.checkpoints import tree_digest
    from harness.tiny import build_tiny_release
    from pipeline.checkpoint import Checkpoint
    from pipeline.convert import convert_checkpoint

    release = build_tiny_release(tmp_path / "release", "vllm-shaped", seed=0)
    config = Checkpoint.open(release).config
    # amaxes of no particular form (write_amax's own are multiples of 1/8), so the division is tested
    gen = torch.Generator().manual_seed(0)
    extra = {
        f"model.layers.{n}.mlp.experts.{kind}_proj_weight_quantizers.{e}": float(
            torch.rand((), generator=gen)
        )
        * 3
        for n in range(config["num_hidden_layers"])
        for e in range(config["n_routed_experts"])
        for kind in ("gate_up", "down")
    }
    amax = write_amax(release, tmp_path / "amax.safetensors", extra=extra)
    cpu = convert_checkpoint(release, tmp_path / "cpu", amax=amax, device="cpu", progress=False)
    gpu = convert_checkpoint(release, tmp_path / "cuda", amax=amax, progress=False, **on_cuda)
    assert tree_digest(cpu.out_dir) == tree_digest(gpu.out_dir)


@pytest.fixture(scope="module")
def micro_bf16(tmp_path_factory):
    from harness.tiny import build_tiny_release
    from pipeline.dequant import dequantize_checkpoint

    root = tmp_path_factory.mktemp("gpu-micro")
    return dequantize_checkpoint(
        build_tiny_release(root / "release", "micro", 0), root / "bf16", progress=False
    ).out_dir


@pytest.mark.quant
@pytest.mark.parametrize("recipe", ["experts", "full"])
def test_fake_quant_forward_on_cuda_against_bf16(micro_bf16, recipe, record_property):
    """Calibrate on CUDA, then a forward with quantization on (NVFP4 weights AND activations)."""
    import modelopt.torch.quantization as mtq

    from harness.reference import compare, reference_batch
    from pipeline.quantize import load_bf16_model
    from pipeline.recipes import recipe_config

    cuda = torch.device("cuda")
    base = load_bf16_model(micro_bf16, cuda)
    model = load_bf16_model(micro_bf16, cuda)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, model.config.vocab_size, (4, 32), generator=gen) for _ in range(8)]

    def loop(m):
        with torch.no_grad():
            for batch in calib:
                m(input_ids=batch.to(cuda))

    mtq.quantize(model, recipe_config(recipe), loop)
    tokens = reference_batch(model.config.vocab_size, seed=0, batch=4, seq=64).to(cuda)
    with torch.no_grad():
        ref = base(input_ids=tokens).logits.float().cpu()
        got = model(input_ids=tokens).logits.float().cpu()
    score = compare(got, ref)
    record_property(f"{recipe}_kl", score["kl"])
    print(f"\n{recipe}: fake-quant forward on CUDA vs BF16: {score}")
    assert torch.isfinite(got).all() and score["kl"] > 0  # quantization really was on


@pytest.mark.quant
def test_export_on_cuda_moves_gpu_tensors_and_matches_the_cpu_weights(micro_bf16, tmp_path):
    from pipeline.checkpoint import Checkpoint
    from pipeline.quantize import QuantizeOptions, quantize_checkpoint

    on_gpu = quantize_checkpoint(
        micro_bf16, tmp_path / "gpu", QuantizeOptions(recipe="experts", device="cuda")
    )
    on_cpu = quantize_checkpoint(
        micro_bf16, tmp_path / "cpu", QuantizeOptions(recipe="experts", device="cpu")
    )
    assert on_gpu.tensors_moved_to_cpu > 0 and on_cpu.tensors_moved_to_cpu == 0
    a, b = Checkpoint.open(tmp_path / "gpu"), Checkpoint.open(tmp_path / "cpu")
    assert a.tensors.keys() == b.tensors.keys()
    weights = [k for k in a.tensors if k.endswith((".weight", ".weight_scale", ".weight_scale_2"))]
    differ = [k for k in weights if not _same(a.read(k), b.read(k))]
    # weight scales depend on the weights alone; input_scale depends on GPU vs CPU activations
    assert differ == []
