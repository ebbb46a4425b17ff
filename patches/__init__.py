"""Runtime patches for ModelOpt and the vLLM plugin.

Every patch names its target (module, qualified name, expected signature) and the failure it prevents,
and is checked against the installed version before it is applied. The patches arrive with the
quantize and serving issues; this package exists now so that the layout is fixed from the start.
"""
