"""The hf_ptq driver against the recorded contract only (no ModelOpt): each test names the seed run whose
mistake it catches. A stand-in hf_ptq.py is generated from the contract (its flags, the ``__main__``
conversions, a main() that consumes args the way the real one does) to run import/parse/convert/main
end to end in the unit tier."""

from __future__ import annotations

import argparse
import json
import runpy
import subprocess
import sys
import textwrap
import types
from dataclasses import fields, replace
from pathlib import Path

import pytest

from pipeline import hf_ptq as drv
from pipeline.errors import DsV4Error

pytestmark = pytest.mark.unit

SHELL_SCRIPT_FLAGS = ("--quant", "--calib", "--kv_cache_quant", "--tp")  # Run 8's names


@pytest.fixture(scope="module")
def contract() -> dict:
    return drv.load_contract()


def seeds_cfg() -> drv.HfPtqConfig:
    return drv.seeds_config("/models/DeepSeek-V4-Pro-BF16", "/models/DeepSeek-V4-Pro-NVFP4")


# ---- the stand-in hf_ptq.py, generated from the recorded contract ----------------------------------


def _resolved(value):
    return value.get("resolved") if isinstance(value, dict) and "expr" in value else value


def render_stub(contract: dict, sibling: str = "example_utils") -> str:
    """A hf_ptq.py with the recorded flags and __main__ conversions, whose main() reads every recorded
    attribute and consumes dataset/calib_size like the real load_model/quantize_main do."""
    types_ = {"int": "int", "float": "float", "str": "str"}
    lines = [
        "import argparse",
        f"from {sibling} import SIBLING_TAG",
        f"KV_QUANT_CFG_CHOICES = {contract['runtime']['KV_QUANT_CFG_CHOICES']!r}",
        f"REQUIRED = {contract['main_reads']['required']!r}",
        f"FALLBACKS = {[(f['attribute'], f['value']) for f in contract['fallbacks']]!r}",
        "MAIN_CALLS = []",
        "",
        "def parse_args():",
        "    parser = argparse.ArgumentParser()",
    ]
    for flag in contract["flags"]:
        opts = [o for o in flag["option_strings"] if not o.startswith("--no-")]
        kw = [f"dest={flag['dest']!r}"]
        if flag["action"] == "BooleanOptionalAction":
            kw.append("action=argparse.BooleanOptionalAction")
        elif flag["action"] != "store":
            kw.append(f"action={flag['action']!r}")
        if flag["type"]:
            kw.append(f"type={types_[flag['type']]}")
        if flag["action"] not in ("store_true", "store_false"):
            kw.append(f"default={_resolved(flag['default'])!r}")
        if flag["choices"] is not None:
            kw.append(f"choices={_resolved(flag['choices'])!r}")
        if flag["nargs"] is not None:
            kw.append(f"nargs={_resolved(flag['nargs'])!r}")
        if flag["required"]:
            kw.append("required=True")
        lines.append(f"    parser.add_argument({', '.join(map(repr, opts))}, {', '.join(kw)})")
    lines.append("    args = parser.parse_args()")
    lines += [f"    args.{attr} = None" for attr in contract["added_by_parse_args"]]
    lines += [
        "    return args",
        "",
        "def main(args):",
        f"    import {sibling}  # a lazy sibling import, as example_utils does for vlm_utils",
        "    for name in REQUIRED:",
        "        getattr(args, name)  # AttributeError, as in Runs 6-7",
        "    for name, value in FALLBACKS:",
        "        if getattr(args, name) is None:",
        "            setattr(args, name, value)",
        "    # load_model pads calib_size to the datasets; quantize_main sums it (Run 9's TypeError)",
        "    args.calib_size = (args.calib_size + [args.calib_size[-1]] * len(args.dataset))[: len(args.dataset)]",
        "    assert sum(args.calib_size) > 0",
        "    MAIN_CALLS.append(args)",
        "",
        'if __name__ == "__main__":',
        "    args = parse_args()",
    ]
    for conv in contract["main_block"]["conversions"]:
        a, sep = conv["attribute"], conv["split_on"]
        if conv["only_if_str"]:
            lines.append(f"    args.{a} = args.{a}.split({sep!r}) if isinstance(args.{a}, str) else args.{a}")
        else:
            lines.append(f"    args.{a} = [{conv['element']}(v) for v in args.{a}.split({sep!r})]")
    lines.append("    main(args)")
    return "\n".join(lines) + "\n"


def make_repo(root: Path, contract: dict, layout: str = "hf_ptq", tag: str = "A") -> Path:
    folder = root / "examples" / layout
    folder.mkdir(parents=True)
    (folder / "hf_ptq.py").write_text(render_stub(contract))
    (folder / "example_utils.py").write_text(f"SIBLING_TAG = {tag!r}\n")
    return root


@pytest.fixture
def stub_repo(tmp_path: Path, contract: dict) -> Path:
    return make_repo(tmp_path / "modelopt", contract)


# ---- Run 8: hf_ptq's flag names, never the shell script's -------------------------------------------


def test_argv_uses_hf_ptq_flag_names_never_the_shell_scripts(contract):
    argv = drv.build_argv(seeds_cfg(), contract)
    known = {o for f in contract["flags"] for o in f["option_strings"]}
    flags = [w for w in argv if w.startswith("--")]
    assert set(flags) <= known
    assert not set(flags) & set(SHELL_SCRIPT_FLAGS)
    pairs = dict(zip(argv, [*argv[1:], None], strict=True))
    assert pairs["--qformat"] == "nvfp4"
    assert pairs["--calib_size"] == "128"
    assert pairs["--calib_seq"] == "512"
    assert pairs["--kv_cache_qformat"] == "fp8_cast"
    assert pairs["--inference_tensor_parallel"] == "8"
    assert pairs["--gpu_max_mem_percentage"] == "0.7"
    assert "--use_seq_device_map" in argv and "--trust_remote_code" not in argv
    assert "--dataset" not in argv  # hf_ptq's own default mix, as Run 11 used


def test_option_table_covers_the_config_and_names_real_dests(contract):
    dests = {f["dest"] for f in contract["flags"]}
    assert {f.name for f in fields(drv.HfPtqConfig)} == set(drv.OPTION_TABLE)
    assert set(drv.OPTION_TABLE.values()) <= dests


def test_a_dest_missing_from_the_contract_is_an_error_naming_it(contract):
    broken = {**contract, "flags": [f for f in contract["flags"] if f["dest"] != "kv_cache_qformat"]}
    with pytest.raises(DsV4Error, match="kv_cache_qformat"):
        drv.build_argv(seeds_cfg(), broken)


def test_switches_and_lists_render_as_argparse_expects(contract):
    cfg = replace(
        seeds_cfg(),
        calib_size=(64, 32),
        datasets=("cnn_dailymail", "nemotron-post-training-dataset-v2"),
        verbose=False,
    )
    argv = drv.build_argv(cfg, contract)
    pairs = dict(zip(argv, [*argv[1:], None], strict=True))
    assert pairs["--calib_size"] == "64,32"
    assert pairs["--dataset"] == "cnn_dailymail,nemotron-post-training-dataset-v2"
    assert "--no-verbose" in argv


# ---- Runs 7, 9: after parse + conversions, calib_size is list[int] and dataset a list or the default --


def test_parsed_and_converted_args_have_the_types_main_needs(stub_repo, contract):
    _, args, _ = drv.prepare(seeds_cfg(), stub_repo, contract)
    assert args.calib_size == [128] and all(type(n) is int for n in args.calib_size)
    assert args.dataset is None
    fallback = {f["attribute"]: f["value"] for f in contract["fallbacks"]}
    assert isinstance(fallback["dataset"], list) and fallback["dataset"]  # hf_ptq documents the default

    cfg = replace(
        seeds_cfg(), datasets=("cnn_dailymail", "nemotron-post-training-dataset-v2"), calib_size=(64, 32)
    )
    _, args, _ = drv.prepare(cfg, stub_repo, contract)
    assert args.dataset == ["cnn_dailymail", "nemotron-post-training-dataset-v2"]
    assert args.calib_size == [64, 32]


def test_driver_args_equal_the_stub_command_line_path(stub_repo, contract, monkeypatch):
    """Differential: the driver's parse+conversions give what running the file as __main__ gives."""
    _, ours, argv = drv.prepare(seeds_cfg(), stub_repo, contract)
    path = drv.locate_hf_ptq(stub_repo)
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    monkeypatch.syspath_prepend(str(path.parent))
    monkeypatch.delitem(sys.modules, "example_utils", raising=False)
    ns = runpy.run_path(str(path), run_name="__main__")
    theirs = ns["MAIN_CALLS"][0]
    expected = vars(ours) | {"dataset": theirs.dataset}  # main filled the fallback in place
    assert vars(theirs) == expected


def test_stub_main_rejects_what_runs_7_and_9_passed(stub_repo, contract):
    module, args, argv = drv.prepare(seeds_cfg(), stub_repo, contract)
    unconverted = drv.parse(module, argv)  # Run 9: skipped the __main__ conversions
    # main() imports its siblings lazily, so it runs with its folder on sys.path, as drv.run runs it;
    # the test must not depend on an earlier test leaving example_utils importable
    with drv._folder_on_sys_path(Path(module.__file__).parent):
        with pytest.raises(TypeError):
            module.main(unconverted)
        module.main(args)  # the driver's args pass


def test_conversions_follow_the_recorded_data(contract):
    ns = argparse.Namespace(
        dataset="a,b",
        calib_size="128,64",
        export_fmt="hf",
        specdec_offline_dataset=None,
        cast_mxfp4_to_nvfp4=False,
        qformat="nvfp4",
    )
    drv.apply_main_conversions(ns, contract)
    assert ns.dataset == ["a", "b"] and ns.calib_size == [128, 64]
    with pytest.raises(DsV4Error, match="converted twice"):
        drv.apply_main_conversions(ns, contract)
    ns = argparse.Namespace(**{**vars(ns), "dataset": None, "calib_size": "12x"})
    with pytest.raises(DsV4Error, match="ints"):
        drv.apply_main_conversions(ns, contract)


@pytest.mark.parametrize(
    "override",
    [{"cast_mxfp4_to_nvfp4": True}, {"specdec_offline_dataset": "/x"}, {"export_fmt": "tensorrt_llm"}],
)
def test_a_main_block_guard_the_driver_does_not_replicate_is_refused(contract, override):
    ns = argparse.Namespace(
        dataset=None,
        calib_size="128",
        export_fmt="hf",
        specdec_offline_dataset=None,
        cast_mxfp4_to_nvfp4=False,
        qformat="nvfp4",
    )
    vars(ns).update(override)
    with pytest.raises(DsV4Error, match=next(iter(override))):
        drv.apply_main_conversions(ns, contract)


# ---- Runs 6-7: every attribute main reads exists on the parsed args --------------------------------


def test_every_attribute_main_reads_exists_on_the_parsed_args(stub_repo, contract):
    _, args, _ = drv.prepare(seeds_cfg(), stub_repo, contract)
    assert drv.missing_main_attributes(args, contract) == []
    # Run 6 built a Namespace with just the options it meant to set: the check catches that
    hand_built = argparse.Namespace(**{d: None for d in drv.OPTION_TABLE.values()})
    assert "mlflow_required" in drv.missing_main_attributes(hand_built, contract)


def test_contract_main_reads_cover_the_options_main_consumes(contract):
    required = set(contract["main_reads"]["required"])
    assert {"dataset", "calib_size", "qformat", "kv_cache_qformat", "batch_size", "calib_seq"} <= required
    assert contract["main_reads"]["functions_walked"], "extraction walked main's callees"


# ---- Run 4: KV_QUANT_CFG_CHOICES from hf_ptq's module, not mtq --------------------------------------


def test_kv_choices_come_from_the_hf_ptq_module_not_mtq(stub_repo, contract, monkeypatch):
    # An mtq without KV_QUANT_CFG_CHOICES, as in Run 4: the driver must not look there.
    fake = {n: types.ModuleType(n) for n in ("modelopt", "modelopt.torch", "modelopt.torch.quantization")}
    for name, mod in fake.items():
        monkeypatch.setitem(sys.modules, name, mod)
    module, args, _ = drv.prepare(seeds_cfg(), stub_repo, contract)
    assert drv.kv_cache_qformat_choices(module) == contract["runtime"]["KV_QUANT_CFG_CHOICES"]
    assert args.kv_cache_qformat == "fp8_cast"
    with pytest.raises(DsV4Error, match="KV_QUANT_CFG_CHOICES"):
        drv.prepare(replace(seeds_cfg(), kv_cache_qformat="fp9"), stub_repo, contract)


def test_recorded_runtime_values_accept_the_seeds_formats(contract):
    assert "nvfp4" in contract["runtime"]["QUANT_CFG_CHOICES"]
    assert "fp8_cast" in contract["runtime"]["KV_QUANT_CFG_CHOICES"]
    assert contract["source"]["commit"] and contract["source"]["path"].endswith("hf_ptq.py")


# ---- locate / import / parse plumbing ---------------------------------------------------------------


@pytest.mark.parametrize("layouts", [("hf_ptq",), ("llm_ptq",), ("hf_ptq", "llm_ptq")])
def test_locate_handles_both_layouts_newest_first(tmp_path, layouts):
    for layout in layouts:
        (tmp_path / "examples" / layout).mkdir(parents=True)
        (tmp_path / "examples" / layout / "hf_ptq.py").write_text("")
    assert drv.locate_hf_ptq(tmp_path) == tmp_path / "examples" / layouts[0] / "hf_ptq.py"


def test_locate_names_what_it_looked_for(tmp_path):
    with pytest.raises(DsV4Error) as e:
        drv.locate_hf_ptq(tmp_path)
    assert "examples/hf_ptq/hf_ptq.py" in str(e.value) and "examples/llm_ptq/hf_ptq.py" in str(e.value)


def test_import_restores_sys_path_and_keeps_checkouts_apart(tmp_path, contract, monkeypatch):
    stale = types.ModuleType("example_utils")  # another checkout's sibling, already imported
    stale.SIBLING_TAG = "STALE"
    monkeypatch.setitem(sys.modules, "example_utils", stale)
    before = list(sys.path)
    a = drv.import_hf_ptq(drv.locate_hf_ptq(make_repo(tmp_path / "a", contract, tag="A")))
    b = drv.import_hf_ptq(drv.locate_hf_ptq(make_repo(tmp_path / "b", contract, tag="B")))
    assert sys.path == before
    assert (a.SIBLING_TAG, b.SIBLING_TAG) == ("A", "B")
    assert a.__name__ != b.__name__
    assert sys.modules["example_utils"] is stale  # theirs left out, the set-aside one put back


def test_parse_restores_sys_argv_even_when_hf_ptq_rejects_the_args(stub_repo, contract):
    module = drv.import_hf_ptq(drv.locate_hf_ptq(stub_repo))
    saved = list(sys.argv)
    with pytest.raises(DsV4Error, match="rejected"):
        drv.parse(module, ["--tp", "8"])  # no --pyt_ckpt_path, unknown flag
    assert sys.argv == saved
    drv.parse(module, ["--pyt_ckpt_path", "x"])
    assert sys.argv == saved


def test_run_calls_main_with_the_converted_args_and_its_folder_on_sys_path(stub_repo, contract):
    args = drv.run(seeds_cfg(), stub_repo, contract)  # the stub's main imports its sibling lazily
    assert args.calib_size == [128]
    assert args.dataset == next(f["value"] for f in contract["fallbacks"] if f["attribute"] == "dataset")


# ---- the extractor itself, on the generated stand-in -------------------------------------------------


def test_extractor_recovers_the_recorded_flags_and_conversions_from_the_stub(stub_repo, contract):
    fresh = drv.extract_contract(drv.locate_hf_ptq(stub_repo), commit="stub")
    keys = ("dest", "option_strings", "action", "type", "required")
    assert [{k: f[k] for k in keys} for f in fresh["flags"]] == [
        {k: f[k] for k in keys} for f in contract["flags"]
    ]
    assert fresh["main_block"]["conversions"] == contract["main_block"]["conversions"]
    assert fresh["added_by_parse_args"] == contract["added_by_parse_args"]


def test_extractor_refuses_a_main_block_it_does_not_understand(tmp_path):
    path = tmp_path / "examples" / "hf_ptq" / "hf_ptq.py"
    path.parent.mkdir(parents=True)
    path.write_text(
        textwrap.dedent(
            """
            def parse_args(): ...
            def main(args): ...
            if __name__ == "__main__":
                args = parse_args()
                args.calib_size = tuple(args.calib_size)
                main(args)
            """
        )
    )
    with pytest.raises(drv.ContractError, match="calib_size"):
        drv.extract_contract(path, commit="x")


def test_recorded_contract_is_well_formed_json_with_provenance(contract):
    assert json.loads(drv.CONTRACT_PATH.read_text()) == contract
    assert "syntax tree" in contract["produced_by"]
    assert len(contract["flags"]) == len({f["dest"] for f in contract["flags"]})


def test_the_driver_imports_no_heavy_package():
    code = "import sys, pipeline.hf_ptq; print([m for m in ('transformers', 'modelopt') if m in sys.modules])"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "[]"


# ---- Run 3: the model is loaded by hf_ptq's own load_model, never by the driver ----------------------
# Run 3 loaded V4 Pro with AutoModelForCausalLM.from_pretrained, whose torch.cat of the experts' gate_up
# OOMed a GPU (31.5 GB asked, 25.9 GB free). hf_ptq's load_model goes through example_utils.get_model,
# which caps max_memory per GPU; the driver must hand the loading to it (checked against a real
# checkout in tests/quantize/test_hf_ptq_contract.py).


def test_the_driver_never_loads_the_model_itself():
    import ast

    tree = ast.parse("\n".join(p.read_text() for p in sorted(Path(drv.__file__).parent.glob("*.py"))))
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    used |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom | ast.Import) for a in n.names}
    assert not used & {"from_pretrained", "AutoModelForCausalLM", "AutoModel", "get_model"}


def test_main_loads_the_model_through_hf_ptq_load_model(contract):
    assert "hf_ptq.load_model" in contract["main_reads"]["functions_walked"]


# ---- `dsv4 quantize --driver hf_ptq` -------------------------------------------------------------------


def test_quantize_cli_hf_ptq_driver_prints_the_parsed_and_converted_args(stub_repo, capsys, tmp_path):
    from pipeline.cli import main as dsv4

    rc = dsv4(
        [
            "quantize", str(tmp_path / "bf16"), str(tmp_path / "out"), "--driver", "hf_ptq",
            "--modelopt-repo", str(stub_repo), "--recipe", "experts", "--calib-size", "64", "--print-argv",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "--qformat nvfp4_experts_only" in out and "--calib_size 64" in out
    assert "calib_size = [64]" in out  # the __main__ conversion applied (Run 9)


def test_recipes_map_to_hf_ptq_qformats_modelopt_ships():
    """The qformats are keys of ModelOpt 0.47's QUANT_CFG_CHOICES (checked against the installed ModelOpt
    in tests/quantize/test_hf_ptq_contract.py)."""
    assert drv.RECIPE_QFORMAT == {"experts": "nvfp4_experts_only", "full": "nvfp4"}
    cfg = drv.config_for_recipe("full", "/m", "/e", calib_size=128, calib_seq=512)
    assert (cfg.qformat, cfg.calib_size, cfg.datasets) == ("nvfp4", (128,), None)
    with pytest.raises(DsV4Error, match="no hf_ptq qformat"):
        drv.config_for_recipe("transcode", "/m", "/e", calib_size=1, calib_seq=1)


def test_quantize_cli_hf_ptq_driver_needs_a_checkout(capsys, tmp_path):
    from pipeline.cli import main as dsv4

    assert dsv4(["quantize", str(tmp_path), str(tmp_path / "o"), "--driver", "hf_ptq"]) == 2
    assert "--modelopt-repo" in capsys.readouterr().err


def test_quantize_cli_hf_ptq_driver_refuses_a_release_fp8_source(tiny_release, stub_repo, capsys, tmp_path):
    """Run 1 on the node's path: hf_ptq given the FP8/MXFP4 release crashed in batch probing. The driver
    refuses it from the headers, before importing hf_ptq or checking ModelOpt."""
    from pipeline.cli import main as dsv4

    argv = ["quantize", str(tiny_release), str(tmp_path / "out"), "--driver", "hf_ptq"]
    assert dsv4([*argv, "--modelopt-repo", str(stub_repo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv4: error:") and "dsv4 quantize --driver hf_ptq needs a BF16" in err
    assert not (tmp_path / "out").exists()


def test_quantize_without_modelopt_names_the_package_and_how_to_install_it(monkeypatch, capsys, tmp_path):
    from pipeline.cli import main as dsv4

    monkeypatch.setitem(sys.modules, "modelopt", None)  # `import modelopt` raises ImportError
    assert dsv4(["quantize", str(tmp_path / "bf16"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsv4: error: dsv4 quantize needs nvidia-modelopt")
    assert "pip install -e '.[quant]'" in err


@pytest.mark.parametrize("driver", ["in-process", "hf_ptq"])
def test_quantize_into_a_file_is_refused(driver, tiny_bf16, stub_repo, capsys, tmp_path):
    from pipeline.cli import main as dsv4

    dst = tmp_path / "out"
    dst.write_text("not an export")
    argv = ["quantize", str(tiny_bf16), str(dst), "--driver", driver, "--modelopt-repo", str(stub_repo)]
    assert dsv4(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not a directory" in err and str(dst) in err
    assert dst.read_text() == "not an export"


def test_low_memory_mode_is_never_passed_to_hf_ptq(stub_repo, contract):
    """The seeds: '--low_memory_mode' gives meta device errors with V4. No recipe may turn it on."""
    assert "low_memory_mode" in {f["dest"] for f in contract["flags"]}  # hf_ptq has the flag
    assert "low_memory_mode" not in drv.OPTION_TABLE.values()
    for recipe in drv.RECIPE_QFORMAT:
        cfg = drv.config_for_recipe(recipe, "/m", "/e", calib_size=128, calib_seq=512)
        _, args, argv = drv.prepare(cfg, stub_repo, contract)
        assert not args.low_memory_mode and not any("low_memory" in a for a in argv), recipe


def test_calib_size_above_run_11s_128_is_refused_on_the_node():
    """The seeds: 'Don't use calib_size=256 — OOMs with 3TB BF16 on CPU offload'."""
    assert drv.config_for_recipe("full", "/m", "/e", calib_size=128, calib_seq=512).calib_size == (128,)
    with pytest.raises(DsV4Error, match=r"--calib-size 256: .*ran out of memory"):
        drv.config_for_recipe("full", "/m", "/e", calib_size=256, calib_seq=512)
