"""`dsv4 serve` (pipeline/serve/, pipeline/cli/serve.py) without vLLM: the command built for a converted
micro checkpoint, every refusal with its reason (the seeds' S6 deep_gemm_mega_moe first), the checkpoint
preflight, the compose file (JSON under a comment header, which is YAML: read back with json), and the
run path end to end against a fake server (harness/fake_vllm.py): health wait, one greedy completion,
tokens/s, a clean stop. tests/serve/test_serve_vllm.py parses the same argv with vLLM's own parser.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import fake_vllm
from harness.replica import clone_replica
from pipeline import mapping as M
from pipeline import serve as S
from pipeline.cli import serve as serve_cmd
from pipeline.errors import DsV4Error
from pipeline.vllm_config import VLLM_TARGETS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


# ---- helpers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture
def ckpt(converted) -> Path:
    """The micro model's experts-recipe export through `dsv4 convert` (no MTP block). Do not mutate."""
    return converted("experts").out_dir


@pytest.fixture
def ckpt_mtp(converted) -> Path:
    """The same with --graft-from the micro release: the MTP block is kept. Do not mutate."""
    return converted("experts", graft=True).out_dir


def make(ckpt: Path, tokenizer: Path | None, **kw) -> S.ServeSettings:
    kw.setdefault("tensor_parallel_size", 4)  # the micro model has 4 attention heads
    return S.ServeSettings(ckpt=Path(ckpt), tokenizer=tokenizer, **kw)


def flag_values(args: list[str]) -> dict[str, list[str]]:
    """{--flag: [values]} of an argv that starts with the model (our own argv only: no booleans)."""
    out: dict[str, list[str]] = {}
    key = None
    for word in args[1:]:
        if word.startswith("--"):
            key = word
            out[key] = []
        else:
            out[key].append(word)
    return out


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsv4")
    serve_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["serve", *argv])
    return args.func(args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_compose(text: str):
    """Reads back what S.to_yaml writes: comment lines, then one JSON document (JSON is YAML)."""
    return json.loads("\n".join(ln for ln in text.splitlines() if not ln.startswith("#")))


# ---- the command ------------------------------------------------------------------------------------


def test_command_for_a_converted_checkpoint(ckpt, tokenizer_dir):
    s = make(ckpt, tokenizer_dir, max_model_len=4096, port=8123)
    S.preflight(s)
    args = S.vllm_args(s)
    assert args[0] == str(ckpt)
    assert flag_values(args) == {
        "--tensor-parallel-size": ["4"],
        "--kv-cache-dtype": ["fp8"],
        "--moe-backend": ["flashinfer_trtllm"],
        "--max-model-len": ["4096"],
        "--served-model-name": [ckpt.name],
        "--host": ["127.0.0.1"],
        "--port": ["8123"],
        "--tokenizer": [str(tokenizer_dir)],
    }
    assert S.server_command(s, "/opt/vllm") == ["/opt/vllm", "serve", *args]


def test_flags_follow_the_table_in_order_and_only_with_a_value(ckpt):
    s = make(ckpt, None)
    args = S.vllm_args(s)
    emitted = [w for w in args if w.startswith("--")]
    assert emitted == [f.option for f in S.FLAGS if f.value(s) is not None]
    assert "--tokenizer" not in emitted and "--speculative-config" not in emitted


def test_every_flag_and_backend_row_says_why():
    assert len({f.dest for f in S.FLAGS}) == len(S.FLAGS) == len({f.option for f in S.FLAGS})
    for f in S.FLAGS:
        assert f.why and f.source.startswith("vllm/"), f.option
        assert f.dest in S.SPELLINGS and f.option in S.SPELLINGS[f.dest], f.option
    assert len(S.MOE_BY_NAME) == len(S.MOE_BACKENDS)
    for b in S.MOE_BACKENDS:
        assert b.note, b.name
        if (b.nvfp4 is None and b.name != "auto") or not b.clamp:
            assert b.refused, f"{b.name}: not runnable with V4's NVFP4 experts, so it must be refused"
    assert S.MOE_BY_NAME[S.DEFAULT_MOE_BACKEND].allowed


def test_mtp_adds_the_speculative_config_only_when_asked(ckpt_mtp, tokenizer_dir):
    s = make(ckpt_mtp, tokenizer_dir, mtp_tokens=2)
    S.preflight(s)
    values = flag_values(S.vllm_args(s))
    assert json.loads(values["--speculative-config"][0]) == {"method": "mtp", "num_speculative_tokens": 2}
    assert "--speculative-config" not in S.vllm_args(make(ckpt_mtp, tokenizer_dir))


def test_mtp_refused_without_an_mtp_block(ckpt, tokenizer_dir):
    with pytest.raises(DsV4Error, match=r"mtp: --mtp 1: the checkpoint has no MTP block.*--graft-from"):
        S.preflight(make(ckpt, tokenizer_dir, mtp_tokens=1))


def test_pass_through_flags_go_last_unchanged(ckpt, tokenizer_dir):
    extra = ("--gpu-memory-utilization", "0.92", "--enforce-eager")
    s = make(ckpt, tokenizer_dir, extra=extra)
    assert S.refusals(s) == []
    assert tuple(S.vllm_args(s)[-3:]) == extra


# ---- refusals -----------------------------------------------------------------------------------------

MEGA_MOE_SPELLINGS = [
    ("ours", "deep_gemm_mega_moe"),
    ("ours", "Deep-Gemm-Mega-MoE"),
    ("extra", ("--moe-backend", "deep_gemm_mega_moe")),
    ("extra", ("--moe-backend=deep_gemm_mega_moe",)),
    ("extra", ("--moe_backend", "DEEP_GEMM_MEGA_MOE")),
    ("extra", ("--kernel-config", '{"moe_backend": "deep_gemm_mega_moe"}')),
    ("extra", ("--kernel-config.moe_backend=deep_gemm_mega_moe",)),
    ("extra", ("--kernel_config.moe_backend", "deep-gemm-mega-moe")),
]


@pytest.mark.parametrize(("where", "value"), MEGA_MOE_SPELLINGS)
def test_deep_gemm_mega_moe_is_refused_with_the_s6_reason(ckpt, tokenizer_dir, where, value):
    kw = {"moe_backend": value} if where == "ours" else {"extra": value}
    s = make(ckpt, tokenizer_dir, **kw)
    problems = S.refusals(s)
    assert len(problems) == 1, problems
    assert "refused for NVFP4 experts" in problems[0]
    assert "(7168, 96) vs (7168, 192)" in problems[0] and "S6" in problems[0]
    assert "32 inputs" in problems[0] and "16 inputs" in problems[0]
    assert "DeepseekV4MegaMoEExperts in vLLM 0.32" in problems[0]  # each version's MXFP4 MegaMoE experts
    assert "DeepGemmMegaMoEExperts with its MEGA_MOE_MXFP4 format in 0.33" in problems[0]
    assert "0.33 has an NVFP4 mega-MoE format, which V4's MoE layer does not use" in problems[0]
    with pytest.raises(
        DsV4Error, match=r"refused for NVFP4 experts: V4's MoE layer then builds MegaMoE experts"
    ):
        S.preflight(s)


@pytest.mark.parametrize("backend", [b.name for b in S.MOE_BACKENDS])
def test_each_moe_backend_is_allowed_or_refused_as_the_table_says(ckpt, backend):
    problems = S.refusals(make(ckpt, None, moe_backend=backend))
    row = S.MOE_BY_NAME[backend]
    if row.allowed:
        assert problems == []
    else:
        assert len(problems) == 1 and row.refused in problems[0]


@pytest.mark.parametrize("target", VLLM_TARGETS)
def test_unknown_moe_backend_is_refused_naming_the_known_ones(ckpt, target):
    (problem,) = S.refusals(make(ckpt, None, target_vllm=target, extra=("--moe-backend", "fast_nvfp4")))
    assert f"not a vLLM {target} MoE backend" in problem and "flashinfer_trtllm" in problem


def test_moe_backends_new_in_033_are_known_to_033_only(ckpt):
    """vLLM 0.33's MoEBackend adds aiter_triton_mxfp4_mxfp4 (ROCm MXFP4 W4A4): 0.32 would reject the
    value, 0.33 takes it but cannot build NVFP4 experts with it."""
    new = "aiter_triton_mxfp4_mxfp4"
    assert [b.name for b in S.moe_backends("0.33") if b not in S.moe_backends("0.32")] == [new]
    (on_032,) = S.refusals(make(ckpt, None, target_vllm="0.32", moe_backend=new))
    assert on_032.startswith(f"--moe-backend {new}: not a vLLM 0.32 MoE backend") and f"{new}," not in on_032
    (on_033,) = S.refusals(make(ckpt, None, target_vllm="0.33", moe_backend=new))
    assert "refused for NVFP4 experts: not an NVFP4 MoE backend" in on_033


@pytest.mark.parametrize(
    "flag", [f for f in S.FLAGS if f.dest != "moe_backend"], ids=lambda f: f.option.lstrip("-")
)
def test_pass_through_of_a_setting_we_make_is_refused_naming_our_option(ckpt, flag):
    for spelling in S.SPELLINGS[flag.dest]:
        for extra in ((spelling, "1"), (f"{spelling}=1",)):
            problems = S.refusals(make(ckpt, None, extra=extra))
            assert len(problems) == 1, (extra, problems)
            assert f"sets {flag.option} itself" in problems[0]
            assert (flag.ours or "always") in problems[0]


def test_underscore_spelling_is_recognised_as_vllm_does(ckpt):
    (problem,) = S.refusals(make(ckpt, None, extra=("--max_model_len", "1024")))
    assert "--max-model-len" in problem


@pytest.mark.parametrize(
    "extra",
    [("--quantization", "modelopt_fp4"), ("-q", "modelopt"), ("--quantization=ModelOpt_Mixed",)],
)
def test_modelopt_quantization_flag_is_refused(ckpt, extra):
    (problem,) = S.refusals(make(ckpt, None, extra=extra))
    assert "S7-S8" in problem and "DeepseekV4FP8Config" in problem and "leave --quantization unset" in problem


def test_config_file_flag_is_refused(ckpt):
    (problem,) = S.refusals(make(ckpt, None, extra=("--config", "serve.yaml")))
    assert "cannot check" in problem


def test_model_flag_is_refused(ckpt):
    (problem,) = S.refusals(make(ckpt, None, extra=("--model", "/elsewhere")))
    assert "passes the checkpoint as the model" in problem


def test_all_refusals_are_reported_together(ckpt):
    s = make(ckpt, None, moe_backend="triton", extra=("-tp", "2", "-q", "modelopt", "--config", "x"))
    assert len(S.refusals(s)) == 4
    with pytest.raises(DsV4Error, match="refused") as err:
        S.preflight(s)
    message = str(err.value)
    assert "\n" not in message  # one line, every refusal numbered in it
    assert [message.index(f"[{i}/4] {p}") for i, p in enumerate(S.refusals(s), 1)] == sorted(
        message.index(f"[{i}/4] ") for i in range(1, 5)
    )


# ---- the checkpoint -----------------------------------------------------------------------------------


def test_raw_modelopt_export_is_refused_with_the_convert_fix(exports, tokenizer_dir):
    with pytest.raises(DsV4Error, match=r"quant_method is 'modelopt'.*dsv4 convert"):
        S.preflight(make(exports("experts", "X"), tokenizer_dir))


def test_modelopt_config_on_native_tensors_is_refused(ckpt, exports, tokenizer_dir, tmp_path):
    copy = clone_replica(ckpt, tmp_path / "ckpt")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = json.loads((exports("experts", "X") / "config.json").read_text())[
        "quantization_config"
    ]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(DsV4Error, match=r"'modelopt'.*dsv4 convert.*dsv4 fix-config"):
        S.preflight(make(copy, tokenizer_dir))


def test_export_tensors_under_a_converted_config_are_refused(ckpt, exports, tokenizer_dir, tmp_path):
    copy = clone_replica(exports("experts", "X"), tmp_path / "export")
    (copy / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(DsV4Error) as err:
        S.preflight(make(copy, tokenizer_dir))
    text = str(err.value)
    assert "native names:" in text and "transformers' names" in text and "dsv4 convert" in text
    assert "layout: not the layout dsv4 convert writes" in text


def test_release_and_bf16_checkpoints_are_refused(tiny_release, tiny_bf16, tokenizer_dir):
    with pytest.raises(DsV4Error, match=r"the release layout \(MXFP4 routed experts\)"):
        S.preflight(make(tiny_release, tokenizer_dir))
    with pytest.raises(DsV4Error, match=r"no quantization_config: an unquantized \(BF16\)"):
        S.preflight(make(tiny_bf16, tokenizer_dir))


def test_layout_check_names_missing_extra_and_wrong_tensors(ckpt, tokenizer_dir):
    config = json.loads((ckpt / "config.json").read_text())
    want = M.target_layout(config)
    tensors = {k: SimpleNamespace(dtype=t.dtype, shape=t.shape) for k, t in want.items()}
    ctx = S.CheckContext(make(ckpt, tokenizer_dir), config, SimpleNamespace(tensors=tensors))
    assert S._target_layout(ctx) is None
    expert = next(k for k in want if k.endswith("experts.0.w2.weight_scale"))
    del tensors[expert]
    tensors["layers.0.attn.norm.weight"] = SimpleNamespace(dtype="BF16", shape=(64,))
    w1 = expert.replace("w2.weight_scale", "w1.weight")
    tensors[w1] = SimpleNamespace(dtype="BF16", shape=want[w1].shape)
    problem = S._target_layout(ctx)
    assert f"1 tensor(s) missing, e.g. {expert}" in problem
    assert "1 not in the layout, e.g. layers.0.attn.norm.weight" in problem
    assert f"1 with another dtype/shape, e.g. {w1}: BF16" in problem


def test_config_not_fixed_for_the_target_vllm_names_fix_config(ckpt, tokenizer_dir, tmp_path):
    copy = clone_replica(ckpt, tmp_path / "ckpt")
    config = json.loads((copy / "config.json").read_text())
    del config["quantization_config"]["scale_fmt"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        DsV4Error, match=r"vLLM config: .*rules quant_layout would change.*dsv4 fix-config .* 0.33"
    ):
        S.preflight(make(copy, tokenizer_dir))


def test_tokenizer_from_the_checkpoint_or_the_option(ckpt, tokenizer_dir, tmp_path):
    with pytest.raises(DsV4Error, match=r"tokenizer: no tokenizer .*--tokenizer RELEASE"):
        S.preflight(make(ckpt, None))
    with pytest.raises(DsV4Error, match="no tokenizer"):
        S.preflight(make(ckpt, tmp_path))  # an empty directory
    copy = clone_replica(ckpt, tmp_path / "with-tokenizer")
    (copy / "tokenizer.json").write_text("{}")
    S.preflight(make(copy, None))
    assert S.tokenizer_dir(make(copy, None)) == copy
    assert S.tokenizer_dir(make(ckpt, tokenizer_dir)) == tokenizer_dir
    with pytest.raises(DsV4Error, match=r"no tokenizer .* in --tokenizer"):
        S.preflight(make(copy, tmp_path / "empty"))  # vLLM reads --tokenizer, not the checkpoint's


def test_tensor_parallel_size_must_divide_the_heads(ckpt, tokenizer_dir):
    with pytest.raises(DsV4Error, match=r"tensor parallel size 8 \(the default\) does not divide .* 4"):
        S.preflight(make(ckpt, tokenizer_dir, tensor_parallel_size=8, tp_reason="the default"))
    for tp in (1, 2, 4):
        S.preflight(make(ckpt, tokenizer_dir, tensor_parallel_size=tp))


def test_max_model_len_within_the_config(ckpt, tokenizer_dir):
    with pytest.raises(DsV4Error, match="exceeds max_position_embeddings 1048576"):
        S.preflight(make(ckpt, tokenizer_dir, max_model_len=1048577))
    with pytest.raises(DsV4Error, match="must be positive"):
        S.preflight(make(ckpt, tokenizer_dir, max_model_len=0))
    S.preflight(make(ckpt, tokenizer_dir, max_model_len=1048576))


def test_not_a_checkpoint(tmp_path, tokenizer_dir):
    with pytest.raises(DsV4Error, match="not a checkpoint directory"):
        S.preflight(make(tmp_path / "absent", tokenizer_dir))
    with pytest.raises(DsV4Error, match=r"no config\.json"):
        S.preflight(make(tmp_path, tokenizer_dir))


# ---- defaults ---------------------------------------------------------------------------------------


def test_visible_gpus_from_cuda_visible_devices_or_nvidia_smi():
    def no_smi(name):
        return None

    assert S.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2"}, which=no_smi)[0] == 3
    assert S.visible_gpus({"CUDA_VISIBLE_DEVICES": "4,-1,5"}, which=no_smi)[0] == 1  # CUDA stops at -1
    assert S.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, which=no_smi)[0] == 0
    assert S.visible_gpus({}, which=no_smi) == (None, "no nvidia-smi on PATH")
    smi = "GPU 0: NVIDIA B200 (UUID: GPU-a)\nGPU 1: NVIDIA B200 (UUID: GPU-b)\n"

    def run(cmd, **kw):
        assert cmd == ["/usr/bin/nvidia-smi", "-L"]
        return SimpleNamespace(returncode=0, stdout=smi)

    assert S.visible_gpus({}, which=lambda n: "/usr/bin/nvidia-smi", run=run) == (2, "nvidia-smi -L")


def test_default_tensor_parallel_size_is_the_visible_gpus_else_eight():
    assert S.default_tensor_parallel_size(environ={"CUDA_VISIBLE_DEVICES": "0,1"})[0] == 2
    tp, why = S.default_tensor_parallel_size(environ={"CUDA_VISIBLE_DEVICES": ""})
    assert tp == S.NODE_GPUS == 8 and "no GPU visible" in why
    tp, why = S.default_tensor_parallel_size(environ={}, which=lambda n: None)
    assert tp == 8 and "no nvidia-smi" in why


def test_cli_defaults_the_tensor_parallel_size_from_the_environment(ckpt, tokenizer_dir, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert cli([str(ckpt), "--print", "--tokenizer", str(tokenizer_dir)]) == 0
    assert "--tensor-parallel-size 2 " in capsys.readouterr().out
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DsV4Error, match=r"tensor parallel size 8 \(no GPU visible here"):
        cli([str(ckpt), "--print", "--tokenizer", str(tokenizer_dir)])


# ---- the CLI ----------------------------------------------------------------------------------------


def test_cli_print_is_the_command(ckpt_mtp, tokenizer_dir, capsys):
    argv = [str(ckpt_mtp), "--print", "--tp", "2", "--tokenizer", str(tokenizer_dir), "--mtp", "1"]
    assert cli([*argv, "--port", "9001", "--vllm-args", "--gpu-memory-utilization", "0.9"]) == 0
    printed = shlex.split(capsys.readouterr().out)
    s = make(ckpt_mtp, tokenizer_dir, tensor_parallel_size=2, mtp_tokens=1, port=9001)
    s = S.ServeSettings(**{**s.__dict__, "extra": ("--gpu-memory-utilization", "0.9")})
    assert printed == S.server_command(s)


def test_cli_refuses_mega_moe_before_touching_the_checkpoint(tmp_path):
    with pytest.raises(DsV4Error, match=r"refused for NVFP4 experts.*S6"):
        cli([str(tmp_path / "absent"), "--print", "--moe-backend", "deep_gemm_mega_moe"])


def test_cli_help_lists_the_tables(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in S.FLAGS:
        assert f.option in text
    for b in S.MOE_BACKENDS:
        if b.refused:
            assert b.name in text
    for c in (*S.CONFIG_CHECKS, *S.CHECKPOINT_CHECKS):
        assert c.name in text


# ---- compose ------------------------------------------------------------------------------------------


def test_compose_spec(ckpt_mtp, tokenizer_dir):
    s = make(ckpt_mtp, tokenizer_dir, tensor_parallel_size=4, port=8011, mtp_tokens=1)
    spec = S.compose_spec(s)
    (name,) = spec["services"]
    svc = spec["services"][name]
    assert svc["image"] == "vllm/vllm-openai:v0.33.0"
    assert svc["entrypoint"] == ["vllm", "serve"]
    inside, mounts = S.in_container(s)
    assert svc["command"] == S.vllm_args(inside)
    values = flag_values(svc["command"])
    assert svc["command"][0] == f"/models/{ckpt_mtp.name}"
    assert values["--host"] == ["0.0.0.0"] and values["--port"] == ["8011"]
    assert values["--tokenizer"] == ["/models/tokenizer"]
    assert values["--served-model-name"] == [ckpt_mtp.name]
    assert "--speculative-config" in values
    assert svc["volumes"] == mounts
    assert [(v["source"], v["target"]) for v in mounts] == [
        (str(ckpt_mtp.resolve()), svc["command"][0]),
        (str(tokenizer_dir.resolve()), "/models/tokenizer"),
    ]
    assert all(v["type"] == "bind" and v["read_only"] is True for v in mounts)
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 4, "capabilities": ["gpu"]}
    assert svc["ports"] == ["8011:8011"] and svc["shm_size"] == S.DEFAULT_SHM_SIZE
    assert svc["healthcheck"]["test"][:2] == ["CMD", "python3"]
    assert "http://127.0.0.1:8011/health" in svc["healthcheck"]["test"][-1]
    text = json.dumps(spec)
    assert "deepseek_v4.py" not in text and "site-packages" not in text and " cp " not in text


def test_compose_image_override_and_target(ckpt, tokenizer_dir):
    s = make(ckpt, tokenizer_dir, target_vllm="0.32")
    assert S.compose_spec(s)["services"]["vllm"]["image"] == "vllm/vllm-openai:v0.32.0"
    assert S.compose_spec(s, image="my/vllm:dev")["services"]["vllm"]["image"] == "my/vllm:dev"
    assert len(S.compose_spec(s)["services"]["vllm"]["volumes"]) == 2
    assert len(S.compose_spec(make(ckpt, None))["services"]["vllm"]["volumes"]) == 1


def test_yaml_reads_back_as_the_spec(ckpt_mtp, tokenizer_dir):
    spec = S.compose_spec(make(ckpt_mtp, tokenizer_dir, mtp_tokens=2))
    text = S.to_yaml(spec, "a header\nof two lines")
    assert text.startswith('# a header\n# of two lines\n{\n  "services": {\n')
    assert read_compose(text) == spec
    odd = {
        "a": {"no": "yes", "x y": [1, 2.5, True, None], "list": [{"k": "v: w", "n": []}, "plain"]},
        "e": {},
    }
    assert read_compose(S.to_yaml(odd)) == odd


def test_cli_compose_writes_the_file(ckpt, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "docker-compose.yml"
    argv = [str(ckpt), "--compose", str(out), "--tp", "4", "--tokenizer", str(tokenizer_dir)]
    assert cli([*argv, "--shm-size", "32gb", "--port", "8100"]) == 0
    spec = read_compose(out.read_text())
    want = S.compose_spec(make(ckpt, tokenizer_dir, port=8100), shm_size="32gb")
    assert spec == want
    assert f"wrote {out}" in capsys.readouterr().out


# ---- running: health, smoke request, tokens/s -----------------------------------------------------------


class _Alive:
    pid = 0

    def poll(self):
        return None


def test_health_wait_returns_once_the_server_is_healthy(tmp_path):
    fake = fake_vllm.FakeVllm(healthy_after=0.15).start()
    try:
        waited = S.wait_for_health(fake.url, _Alive(), tmp_path / "log", timeout=10, interval=0.05)
    finally:
        fake.stop()
    assert 0.1 <= waited < 5


def test_health_wait_times_out_with_the_log_tail(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "Loading safetensors shard 3/95\n")
    fake = fake_vllm.FakeVllm(healthy=False).start()
    try:
        with pytest.raises(DsV4Error, match=r"did not answer 200 within 0.2 s") as err:
            S.wait_for_health(fake.url, _Alive(), log, timeout=0.2, interval=0.05)
    finally:
        fake.stop()
    assert "Loading safetensors shard 3/95" in str(err.value) and "line 61" in str(err.value)
    assert "line 60\n" not in str(err.value)  # the last 40 lines only


def test_health_wait_stops_when_the_server_exits(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("KeyError: 'layers.0.attn.norm.weight'\n")
    dead = SimpleNamespace(poll=lambda: 1)
    with pytest.raises(DsV4Error, match=r"exited with status 1 .*\n.*KeyError: 'layers.0.attn.norm.weight'"):
        S.wait_for_health(f"http://127.0.0.1:{free_port()}", dead, log, timeout=60)


def test_health_wait_reports_progress(tmp_path):
    class Clock:
        t = 0.0

        def __call__(self):
            return self.t

        def sleep(self, d):
            self.t += d

    clock, log, lines = Clock(), tmp_path / "log", []
    log.write_text("INFO Loading weights took 330 s\n")
    out = SimpleNamespace(write=lines.append, flush=lambda: None)
    with pytest.raises(DsV4Error):
        S.wait_for_health(
            f"http://127.0.0.1:{free_port()}",
            _Alive(),
            log,
            timeout=100,
            interval=10,
            progress_every=30,
            out=out,
            clock=clock,
            sleep=clock.sleep,
        )
    progress = [ln for ln in "".join(lines).splitlines() if ln.startswith("waiting for")]
    assert len(progress) == 3
    assert "of 100 s; log: INFO Loading weights took 330 s" in progress[0]


def test_smoke_request_is_greedy_and_parses_usage():
    fake = fake_vllm.FakeVllm(model="v4").start()
    try:
        result = S.smoke_request(fake.url, "v4", max_tokens=5)
    finally:
        fake.stop()
    assert fake.requests == [S.smoke_body("v4", S.SMOKE_PROMPT, 5)]
    assert fake.requests[0]["temperature"] == 0.0 and fake.requests[0]["n"] == 1
    assert result.text == fake_vllm.CANNED_TEXT and result.finish_reason == "length"
    assert result.completion_tokens == 5 and result.prompt_tokens == len(S.SMOKE_PROMPT.split())
    assert result.seconds > 0


def test_smoke_request_wrong_model_name_is_an_error():
    fake = fake_vllm.FakeVllm(model="v4").start()
    try:
        with pytest.raises(DsV4Error, match=r"HTTP 404: .*`other` does not exist"):
            S.smoke_request(fake.url, "other")
    finally:
        fake.stop()


def test_tokens_per_second_arithmetic():
    assert S.tokens_per_second(32, 2.0) == 16.0
    times = iter([100.0, 102.5])
    fake = fake_vllm.FakeVllm(model="m", completion_tokens=20).start()
    try:
        result = S.smoke_request(fake.url, "m", max_tokens=64, clock=lambda: next(times))
    finally:
        fake.stop()
    assert result.seconds == 2.5 and result.completion_tokens == 20 and result.tokens_per_second == 8.0
    with pytest.raises(DsV4Error, match="wall time of 0"):
        S.tokens_per_second(10, 0.0)


def test_unexpected_response_is_an_error():
    with pytest.raises(DsV4Error, match="unexpected /v1/completions response"):
        S.parse_completion({"choices": [{"text": "x"}]}, 1.0)  # no usage
    with pytest.raises(DsV4Error, match="unexpected"):
        S.parse_completion({"choices": [], "usage": {"completion_tokens": 1}}, 1.0)


# ---- the run path end to end, with a fake `vllm` executable ------------------------------------------


def test_docs_tables_are_the_code_tables():
    text = (ROOT / "docs" / "serve.md").read_text()
    begin, end = "<!-- generated: pipeline.serve.tables_markdown() -->\n", "<!-- end generated -->"
    section = text.split(begin, 1)[1].split(end, 1)[0]
    assert section.strip() == S.tables_markdown().strip(), "regenerate docs/serve.md's tables (see the file)"


def test_a_converted_checkpoint_whose_config_has_no_num_hash_layers_is_accepted(
    ckpt, tokenizer_dir, tmp_path
):
    """A real ModelOpt export's config (transformers >= 5.8) has mlp_layer_types, not num_hash_layers,
    and fix-config for vLLM 0.33 keeps it so. The tensor list must come from pipeline.vllm_config.layout_config,
    or every hash layer is expected with gate.bias and the checkpoint is refused (found by the canary)."""
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    config = json.loads((copy / "config.json").read_text())
    hashed = config.pop("num_hash_layers")
    config["mlp_layer_types"] = ["hash_moe"] * hashed + ["moe"] * (config["num_hidden_layers"] - hashed)
    (copy / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    assert cli([str(copy), "--print", "--tp", "2", "--tokenizer", str(tokenizer_dir)]) == 0


def test_a_plugin_opted_export_is_refused_with_the_way_to_serve_it(ckpt, tokenizer_dir, tmp_path):
    """dsv4 serve checks for the converted layout; an export opted into the plugin (dsv4 use-plugin) is
    served by `vllm serve` with the plugin's flags instead, and the refusal says so."""
    import shutil

    from patches.vllm_plugin import ARCHITECTURE

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = [ARCHITECTURE]
    (copy / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with pytest.raises(DsV4Error, match=r"opted into the dsv4 vLLM plugin.*docs/plugin\.md"):
        cli([str(copy), "--print", "--tp", "2", "--tokenizer", str(tokenizer_dir)])
