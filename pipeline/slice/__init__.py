"""`dsv4 slice`: a small checkpoint cut out of the release, in the release layout, for the node's canary.

The output is the release as it would be had DeepSeek shipped a model with fewer layers and fewer routed
experts: the same names, dtypes and byte encodings, and a config.json that says so. Every later step
(dequant, quantize, convert, serve) runs on it exactly as on the release, so a few minutes on the node
exercise the real kernels on real weights before an eight-hour run.

What is kept:

* Layers. ``layers=N`` keeps N layers chosen to cover the block kinds of the release, in this order of
  priority: hash routing (``ffn.gate.tid2eid``), CSA attention (compress ratio 4: compressor and
  indexer), top-k routing (``ffn.gate.bias``), HCA attention (any other ratio > 1), sliding-only
  attention (ratio <= 1). Of all N-layer choices, the one covering the highest-priority kinds wins
  (each kind outweighs all below it together); among equals, the earliest layers. When the first N
  layers already cover what any N layers can, they are the first N. On V4 Pro, N=2 gives layers 0 and
  4 (hash-routed HCA, top-k CSA); on the micro tiny model, layers 0 and 3. ``layers=(0, 3)`` names
  them instead. Kept layers are renumbered 0..N-1 in their original order, so hash layers (a prefix of
  the release) stay a prefix and ``num_hash_layers`` becomes the number of kept hash layers.
* Routed experts. The first E of every kept layer and of the MTP blocks; the router's
  ``ffn.gate.weight`` keeps its first E rows and ``ffn.gate.bias`` its first E entries, so expert e of
  the slice is expert e of the release, weights, scales, router row and bias alike.
* Everything else (embeddings, head, final norm, hyper-connection head, attention, shared experts,
  norms, the MTP blocks with their projections): byte for byte, FP8 tensors with their UE8M0 scales.

The hash layers' ``ffn.gate.tid2eid`` ([vocab, top_k] expert ids per token) cannot be sliced: most of
its ids name experts that are gone. The rule (``remap_tid2eid``): in each row, an id below E that occurs
first in the row is kept as it is; every other id becomes the first expert, counting up from ``id mod E``
(wrapping), that the row does not hold yet. Why: every id is then a kept expert; each token still picks
top_k *distinct* experts, as the release's table does (a repeated id would give one expert a double
weight, which no release token has); tokens already routed only among the kept experts are unchanged;
and ``mod E`` spreads the rest evenly over the kept experts. Routing does change for every other token
(the report counts them): the slice is a model for kernels and loading, not for accuracy.

config.json is rewritten: ``num_hidden_layers``, ``n_routed_experts``, ``num_hash_layers``,
``compress_ratios`` (the kept layers' entries, then the MTP blocks' unchanged);
``num_nextn_predict_layers`` is kept; ``num_experts_per_tok`` must not exceed E (refused otherwise: the
routing width is part of what the canary tests). ``dsv4-slice-report.json`` records the choice.

Planned from headers, streamed through pipeline.checkpoint's writer (temporary names, renamed when
complete, index last, ``resume`` byte-identical); the source is validated first and the output after.

The package, top down (each module imports only those below it):

step       slice_step / slice_checkpoint (plan + producer, run by pipeline.streaming_step), dry_run_table
plan       SlicePlan, plan_slice, produce_tensor, remap_tid2eid
selection  which layers and experts, the sliced config.json, the defaults: torch-free, for --help

Names are loaded on first use (PEP 562), so that `from pipeline.slice.selection import ...` does not
import torch.
"""

from __future__ import annotations

import importlib

# name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "DEFAULT_EXPERTS": "selection",
    "DEFAULT_LAYERS": "selection",
    "KINDS": "selection",
    "REPORT_NAME": "selection",
    "STEP": "selection",
    "layer_kinds": "selection",
    "parse_layers": "selection",
    "select_layers": "selection",
    "sliced_config": "selection",
    "SlicePlan": "plan",
    "Source": "plan",
    "plan_slice": "plan",
    "produce_tensor": "plan",
    "remap_tid2eid": "plan",
    "dry_run_table": "step",
    "slice_checkpoint": "step",
    "slice_step": "step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # next time without __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
