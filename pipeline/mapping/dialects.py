"""Which dialect a checkpoint speaks: the one whose rules map every key."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import MappingError
from .keys import _INDEX, _maps, nearest_rule
from .rules import DIALECTS


def detect_dialect(keys: Iterable[str]) -> str:
    """The one dialect whose rules map every key; MappingError naming the best candidate otherwise."""
    keys = list(keys)
    if not keys:
        raise MappingError("no keys: cannot tell the dialect of an empty checkpoint")
    unmapped: dict[str, list[str]] = {}
    for d in DIALECTS:
        # rules treat every index alike, so each role (indices set to 0) is decided once: V4 Pro's 288k
        # keys are a few hundred roles
        maps = {c: _maps(c, d) for c in {_INDEX.sub("0", k) for k in keys}}
        unmapped[d] = [k for k in keys if not maps[_INDEX.sub("0", k)]]
    full = [d for d, bad in unmapped.items() if not bad]
    if len(full) == 1:
        return full[0]
    if len(full) > 1:
        raise MappingError(
            f"keys fit dialects {', '.join(full)} alike (e.g. {keys[0]}); name the dialect explicitly"
        )
    best = min(DIALECTS, key=lambda d: len(unmapped[d]))
    sample = unmapped[best][:3]
    raise MappingError(
        f"no dialect maps every key; closest is {best} ({DIALECTS[best]}), which cannot map "
        f"{len(unmapped[best])} key(s), e.g. "
        + "; ".join(f"{k} (nearest rule {nearest_rule(k, best).name})" for k in sample)
    )
