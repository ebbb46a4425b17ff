"""The byte mix of a checkpoint by tensor role, and a small V4 Pro-shaped config whose mix follows V4 Pro's.

A throughput bench on a few GiB must spend its time where a real run does: in V4 Pro's release the
routed experts are about 96 % of the bytes, attention about 3 %, shared experts, embedding/head and
the rest a few tenths of a percent each. ``role`` sorts a key (native names: the release's, or an
export's in dialect N) into one of ``ROLES``; ``byte_mix`` sums bytes per role.

``bench_config(reference, gib)`` is V4 Pro's config cut to one layer (compress ratio 4: compressor and
indexer, as V4 Pro's layers 2, 4, ..., 60) with real tensor shapes for every routed expert, and three
knobs chosen so that the mix comes close to V4 Pro's at ``gib``:

* ``n_routed_experts``: the routed experts' share of ``gib``;
* ``num_attention_heads`` (with ``o_groups`` and ``index_n_heads`` in proportion): attention's share;
  below 8 heads attention cannot shrink further (the compressor, wq_a and wkv depend on the hidden
  size only), so a small ``gib`` over-weights attention a little;
* ``vocab_size``: embedding and head's share.

The shared expert (66 MB) and the per-layer norms cannot scale; their shares are printed beside V4
Pro's so the reader sees how close a run is.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Iterable, Mapping

from pipeline.checkpoint import dtypes
from pipeline.release_layout import release_tensors

ROLES = ("routed experts", "attention", "shared experts", "embed/head", "router", "norms/hc/mtp proj")
GIB = 1024**3
LAYER_RATIO = 4  # compress ratio of the bench's one layer
HEADS = (128, 64, 32, 16, 8)  # num_attention_heads the bench may pick (o_groups = heads / 8)

Tensor = tuple[str, str, tuple[int, ...]]


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtypes.itemsize(dtype)


def role(key: str) -> str:
    """The role of a native key (release names, or an export's in dialect N; MTP blocks as layers)."""
    if ".ffn.experts." in key:
        return "routed experts"
    if ".attn." in key:
        return "attention"
    if ".ffn.shared_experts." in key:
        return "shared experts"
    if key.startswith(("embed.", "head.")):
        return "embed/head"
    if ".ffn.gate." in key:
        return "router"
    return "norms/hc/mtp proj"


def byte_mix(tensors: Iterable[Tensor]) -> dict[str, int]:
    """Bytes per role (every role of ROLES present, zero if none)."""
    mix = dict.fromkeys(ROLES, 0)
    for key, dtype, shape in tensors:
        mix[role(key)] += nbytes(dtype, shape)
    return mix


def release_specs(config: Mapping) -> list[Tensor]:
    """(key, dtype, shape) of every tensor of the release layout of ``config``."""
    return [(t.key, t.dtype, tuple(t.shape)) for t in release_tensors(config)]


def release_mix(config: Mapping) -> dict[str, int]:
    """``byte_mix`` of the release layout of ``config``, computed once per config (V4 Pro's: 145k tensors)."""
    return dict(_release_mix(json.dumps(config, sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _release_mix(config_json: str) -> tuple[tuple[str, int], ...]:
    return tuple(byte_mix(release_specs(json.loads(config_json))).items())


def shares(mix: Mapping[str, int]) -> dict[str, float]:
    total = sum(mix.values())
    return {r: mix[r] / total for r in ROLES}


def mix_distance(a: Mapping[str, int], b: Mapping[str, int]) -> float:
    """Half the L1 distance of the two shares: the fraction of bytes that sit in another role."""
    sa, sb = shares(a), shares(b)
    return sum(abs(sa[r] - sb[r]) for r in ROLES) / 2


def format_mix(built: Mapping[str, int], reference: Mapping[str, int], what: str) -> str:
    """A table: role, the built checkpoint's GB and share, V4 Pro's share."""
    sb, sr = shares(built), shares(reference)
    lines = [f"  {'role':<20} {'GB':>8} {'share':>7}   V4 Pro {what}"]
    for r in ROLES:
        lines.append(f"  {r:<20} {built[r] / 1e9:8.3f} {sb[r]:7.2%}   {sr[r]:7.2%}")
    lines.append(
        f"  {'total':<20} {sum(built.values()) / 1e9:8.3f}          ({sum(reference.values()) / 1e9:.1f} GB; "
        f"{mix_distance(built, reference):.1%} of the bytes in another role than V4 Pro's)"
    )
    return "\n".join(lines)


def _scaled(reference: Mapping, n_experts: int, heads: int, vocab: int) -> dict:
    cfg = {k: copy.deepcopy(v) for k, v in reference.items()}
    cfg.update(
        num_hidden_layers=1,
        n_routed_experts=n_experts,
        num_experts_per_tok=min(reference["num_experts_per_tok"], n_experts),
        num_hash_layers=0,
        compress_ratios=[LAYER_RATIO],
        num_nextn_predict_layers=0,
        num_attention_heads=heads,
        o_groups=max(1, reference["o_groups"] * heads // reference["num_attention_heads"]),
        index_n_heads=max(1, reference["index_n_heads"] * heads // reference["num_attention_heads"]),
        vocab_size=vocab,
    )
    return cfg


def full_layer_config(reference: Mapping) -> dict:
    """V4 Pro's config cut to one full-size decoder layer (compress ratio 4: attention with compressor and
    indexer, all 384 routed experts, 128 heads, the whole vocabulary), no MTP block: the unit whose
    calibration time and memory, times the layer count, is the one-GPU run's."""
    return _scaled(
        reference, reference["n_routed_experts"], reference["num_attention_heads"], reference["vocab_size"]
    )


def bench_config(reference: Mapping, gib: float) -> dict:
    """V4 Pro's config, one layer, sized to about ``gib`` GiB of release bytes with V4 Pro's mix."""
    want = shares(release_mix(reference))
    total = gib * GIB
    one = byte_mix(release_specs(_scaled(reference, 1, HEADS[-1], 64)))
    two = byte_mix(release_specs(_scaled(reference, 2, HEADS[-1], 64)))
    per_expert = two["routed experts"] - one["routed experts"]
    n_experts = max(1, round(want["routed experts"] * total / per_expert))
    hidden = reference["hidden_size"]
    vocab = max(64, round(want["embed/head"] * total / (2 * hidden * 2) / 64) * 64)  # embed + head, BF16
    best = min(
        HEADS,
        key=lambda h: abs(
            byte_mix(release_specs(_scaled(reference, 1, h, 64)))["attention"] - want["attention"] * total
        ),
    )
    return _scaled(reference, n_experts, best, vocab)
