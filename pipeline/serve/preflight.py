"""`dsv4 serve`'s preflight: everything refused before any GPU time, in order: flags, config.json, then
the checkpoint (`dsv4 validate`'s checks, then the serve checks)."""

from __future__ import annotations

from pipeline.errors import DsV4Error, one_line
from pipeline.serve.checks import CHECKPOINT_CHECKS, CONFIG_CHECKS, CheckContext
from pipeline.serve.refusals import refusals
from pipeline.serve.settings import STEP, ServeSettings


def preflight(settings: ServeSettings) -> CheckContext:
    """Refuse what cannot work, before any GPU time: flags first, then config.json, then the checkpoint
    (`dsv4 validate`'s checks, then CHECKPOINT_CHECKS). Raises DsV4Error listing every problem."""
    from pipeline.checkpoint import CONFIG_NAME, ensure_valid, read_config  # imports torch: not for --help

    problems = refusals(settings)
    if problems:
        raise DsV4Error(f"{STEP}: refused: {one_line(problems, show=len(problems))}")
    ckpt = settings.ckpt
    if not ckpt.is_dir():
        raise DsV4Error(f"{ckpt}: not a checkpoint directory")
    config = read_config(ckpt)
    if config is None:
        raise DsV4Error(f"{ckpt}: no {CONFIG_NAME}")
    ctx = CheckContext(settings, config)
    for check in CONFIG_CHECKS:
        problem = check.problem(ctx)
        if problem:
            raise DsV4Error(f"{ckpt}: {problem}")
    ctx.checkpoint = ensure_valid(ckpt, step=STEP)
    problems = [f"{c.name}: {p}" for c in CHECKPOINT_CHECKS if (p := c.problem(ctx))]
    if problems:
        raise DsV4Error(f"{ckpt}: not servable: {one_line(problems, show=len(problems))}")
    return ctx
