"""layout_config: a config with the release's own fields, whatever wrote it."""

from __future__ import annotations

from .fix import fix_config
from .targets import LAYOUT_TARGET


def layout_config(
    config: dict,
    source_config: dict | None = None,
    *,
    where: str = "config.json",
    source_where: str = "source config",
) -> dict:
    """``config`` with the release's own fields that pipeline.release_layout lists tensors from
    (compress_ratios, num_hash_layers), whatever vLLM target or transformers version wrote it: the
    fix-config rules for vLLM 0.32 restore both. Only the model's shape matters here, so a
    quantization_config is ignored."""
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    return fix_config(
        plain, target=LAYOUT_TARGET, source_config=source_config, where=where, source_where=source_where
    ).config
