"""config.json in the export's dialect: what transformers 5.23 writes for a release config.json.

``dsv4 convert EXPORT`` rewrites the export's config.json, which transformers wrote when ModelOpt saved the
model: it loaded the release's config into ``DeepseekV4Config`` (configuration_deepseek_v4.py) and saved
it, folding the release's legacy fields into its own. ``dsv4 convert RELEASE --amax`` has only the
release's config.json; :func:`transformers_saved_config` applies the same folds, as a table, so that both
paths hand fix-config the same config and write the same bytes. The quant tier checks the table against
transformers itself (a release config loaded and saved by ``AutoConfig``).

What transformers 5.23 does, field by field (``DeepseekV4Config.__post_init__`` and PreTrainedConfig):
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from .errors import MappingError

TRANSFORMERS_VERSION = "5.23.0"  # what the saved config says wrote it

# DeepseekV4Config's per-layer attention type of each legacy compress ratio.
RATIO_TO_LAYER_TYPE: dict[int, str] = {
    0: "sliding_attention",
    4: "compressed_sparse_attention",
    128: "heavily_compressed_attention",
}
DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
DEFAULT_NUM_HASH_LAYERS = 3

# Fields the release config lacks that DeepseekV4Config 5.23 declares, with the default it saves.
ADDED_DEFAULTS: dict[str, object] = {
    "mlp_bias": False,
    "output_router_logits": False,
    "pad_token_id": None,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
}

# (legacy field, what transformers saves instead, why): the folds transformers_saved_config applies.
FOLDS: tuple[tuple[str, str, str], ...] = (
    ("compress_ratios", "layer_types", "per-layer ratios become attention types (its MTP entries dropped)"),
    ("compress_ratios", "compress_rates", "the ratio of each compressed attention type (default 4 / 128)"),
    ("num_hash_layers", "mlp_layer_types", "hash_moe for the first num_hash_layers layers, moe after"),
    ("qk_rope_head_dim", "partial_rotary_factor", "qk_rope_head_dim / head_dim; qk_rope_head_dim is kept"),
    ("rope_scaling", "rope_parameters", "nested {main: plain RoPE, compress: YaRN with compress_rope_theta}"),
    ("torch_dtype", "dtype", "transformers 5 reads and writes dtype"),
    ("quantization_config", "quantization_config", "moved last: ModelOpt's export appends its own there"),
)


def transformers_saved_config(release: Mapping) -> dict:
    """The config.json transformers 5.23 saves for ``release`` (keys sorted as it writes them), with
    ``quantization_config`` last, where ModelOpt's export puts its own."""
    c = copy.deepcopy(dict(release))
    quant = c.pop("quantization_config", None)
    try:
        n = c["num_hidden_layers"]
        ratios = c.pop("compress_ratios")
        c["layer_types"] = [RATIO_TO_LAYER_TYPE[r] for r in ratios][:n]
        c.setdefault("compress_rates", dict(DEFAULT_COMPRESS_RATES))
        n_hash = c.pop("num_hash_layers", DEFAULT_NUM_HASH_LAYERS)
        c["mlp_layer_types"] = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
        prf = c["qk_rope_head_dim"] / c["head_dim"]
        c["partial_rotary_factor"] = prf
        c["qk_rope_head_dim"] = int(c["head_dim"] * prf)
        yarn = dict(c.pop("rope_scaling", None) or {})
        if "type" in yarn:
            yarn.setdefault("rope_type", yarn["type"])  # PreTrainedConfig's legacy rope_scaling.type
        compress = {**yarn, "rope_theta": c["compress_rope_theta"], "partial_rotary_factor": prf}
        compress.setdefault("rope_type", "default")
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)  # V4 does not scale cos/sin by YaRN's mscale
        main = {"rope_type": "default", "rope_theta": c["rope_theta"], "partial_rotary_factor": prf}
        c["rope_parameters"] = {"compress": _sorted(compress), "main": _sorted(main)}
    except (KeyError, TypeError, ZeroDivisionError) as err:
        raise MappingError(f"config.json: cannot read it as a DeepSeek V4 release config ({err!r})") from None
    if "torch_dtype" in c:
        c.setdefault("dtype", c.pop("torch_dtype"))
    for key, value in ADDED_DEFAULTS.items():
        c.setdefault(key, value)
    c["transformers_version"] = TRANSFORMERS_VERSION
    out = _sorted(c)
    if quant is not None:
        out["quantization_config"] = quant
    return out


def _sorted(d: dict) -> dict:
    return {k: d[k] for k in sorted(d)}


__all__ = [
    "ADDED_DEFAULTS",
    "FOLDS",
    "RATIO_TO_LAYER_TYPE",
    "TRANSFORMERS_VERSION",
    "transformers_saved_config",
]
