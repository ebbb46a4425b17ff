"""Layer 0's inputs for every calibration batch, taken from the model's own forward.

The decoder layers get more than the hidden states: the rotary tables of both rope types, the position
ids, the sliding-window mask and the token ids (the hash-routed layers pick experts by token id). Rather
than rebuild them, the real ``DeepseekV4ForCausalLM.forward`` runs on the skeleton (embedding and rotary
real, layers on meta) and a pre-hook on layer 0 takes its ``(hidden_states, kwargs)`` and stops it.
Every layer of the model gets the same kwargs (modeling_deepseek_v4.DeepseekV4Model.forward), so they
are captured once and replayed to each layer.

The cache is off (``use_cache=False``): `dsv4 quantize` runs with transformers' default cache on, but no
layer reads another's cache entry within one forward, and the amax are the same either way (checked
bit for bit by tests/calibrate); off, nothing holds a per-layer state the resume could not restore.
"""

from __future__ import annotations

import torch

from pipeline.errors import DsV4Error


class _Captured(Exception):
    """Raised by the pre-hook: the rest of the forward (every decoder layer) must not run."""


def capture_layer_inputs(model, batches: list[torch.Tensor], device: torch.device):
    """([hidden states of layer 0 per batch], [kwargs per batch]) for ``batches`` of token ids."""
    hidden: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def grab(module, args, kw):
        if len(args) != 1:
            raise DsV4Error(
                f"layer 0 was called with {len(args)} positional arguments; dsv4 calibrate expects the hidden "
                "states alone (the installed transformers changed DeepseekV4Model.forward)"
            )
        hidden.append(args[0])
        kwargs.append(dict(kw))
        raise _Captured

    hook = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Captured:
                    continue
                raise DsV4Error("the model's forward did not reach layer 0; cannot capture its inputs")
    finally:
        hook.remove()
    for kw in kwargs:
        if kw.get("past_key_values") is not None:
            raise DsV4Error("layer 0 got a cache with use_cache=False; the installed transformers changed")
    return hidden, kwargs
