"""Mapping one key: the one rule of a dialect that renames it (:func:`rename`, or the nearest rule in
the error), and with a dtype the action too (:func:`map_key` -> :class:`Mapping`). Rules and actions treat
every layer/expert index alike, so each role is decided once and cached."""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .actions import decide_action
from .errors import MappingError, UnmappedKeyError
from .rules import DIALECTS, RULES, Rule
from .target import _role, _target_of


@dataclass(frozen=True)
class Mapping:
    source: str
    target: str  # the native (dialect N) name of the same tensor
    action: str | None  # None when no dtype was given (names only)
    rule: str
    reason: str  # the rename rule's reason, then the action's
    writes: tuple[str, ...] = ()  # target-layout keys this tensor produces
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    target_fmt: str | None = None


def nearest_rule(key: str, dialect: str | None = None) -> Rule:
    """The rule whose example looks most like ``key`` (indices ignored), among ``dialect``'s rules."""
    pool = [r for r in RULES if dialect is None or dialect in r.dialects] or list(RULES)
    norm = _role(key)

    def score(rule: Rule) -> tuple[float, int]:
        ex = _role(rule.example)
        prefix = len(_common_prefix(norm, ex))
        return (difflib.SequenceMatcher(None, norm, ex, autojunk=False).ratio(), prefix)

    return max(pool, key=score)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _matching_rules(key: str, dialect: str) -> list[tuple[Rule, str]]:
    out = []
    for rule in _candidate_rules(_INDEX.sub("0", key), dialect):
        target = rule.apply(key)
        if target is not None:
            out.append((rule, target))
    return out


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


@functools.lru_cache(maxsize=65536)
def _candidate_rules(canonical: str, dialect: str) -> tuple[Rule, ...]:
    """The rules of ``dialect`` matching a key with every index set to 0 (patterns match any index the
    same way, so the 288k keys of V4 Pro cost one regex search per role, not one per rule)."""
    return tuple(r for r in RULES if dialect in r.dialects and r.regex.fullmatch(canonical))


def _maps(key: str, dialect: str) -> bool:
    """Whether a rule of ``dialect`` renames ``key`` onto a tensor of the release layout."""
    return any(_target_of(target) is not None for _, target in _matching_rules(key, dialect))


def rename(key: str, dialect: str) -> tuple[Rule, str]:
    """The one rule of ``dialect`` that maps ``key``, and the native key; UnmappedKeyError if none."""
    if dialect not in DIALECTS:
        raise MappingError(f"unknown dialect {dialect!r}; known: {', '.join(DIALECTS)}")
    hits = _matching_rules(key, dialect)
    if len(hits) > 1:  # pragma: no cover - a bug in the table; the tests check every role
        raise AssertionError(f"{key}: rules {[r.name for r, _ in hits]} all match (dialect {dialect})")
    if not hits:
        near = nearest_rule(key, dialect)
        others = [d for d in DIALECTS if d != dialect and _maps(key, d)]
        hint = f"; it is a dialect {'/'.join(others)} key" if others else ""
        raise UnmappedKeyError(
            key,
            dialect,
            f"{key}: no rule of dialect {dialect} maps this key (nearest rule: {near.name}, "
            f"pattern {near.pattern}, e.g. {near.example}){hint}",
            near,
        )
    rule, target = hits[0]
    if _target_of(target) is None:
        near = nearest_rule(key, dialect)
        raise UnmappedKeyError(
            key,
            dialect,
            f"{key}: rule {rule.name} renames it to {target}, which is not a tensor of the release layout "
            f"(nearest rule: {near.name}, e.g. {near.example})",
            near,
        )
    return rule, target


def map_key(key: str, dialect: str, dtype: str | None = None, shape: Iterable[int] | None = None) -> Mapping:
    """Map one key of ``dialect``. With ``dtype`` the action is decided too; without it, names only."""
    shp = None if shape is None else tuple(shape)
    parts = key.split(".")
    indices = [p for p in parts[1:] if p.isdigit()]  # what _INDEX matches: a dotted all-digit part
    if len(indices) <= len(_SENTINELS):
        # Rules and actions treat every index alike: decide once per role, then put the indices back.
        it = iter(_SENTINELS)
        canonical = ".".join([parts[0], *(next(it) if p.isdigit() else p for p in parts[1:])])
        try:
            m = _map_canonical(canonical, dialect, dtype)
        except MappingError:
            pass  # redone below on the real key, so that the message names it
        else:

            def restore(text: str) -> str:
                for sentinel, index in zip(_SENTINELS, indices, strict=False):
                    text = text.replace(sentinel, index)
                return text

            return Mapping(
                key,
                restore(m.target),
                m.action,
                m.rule,
                m.reason,
                tuple(restore(w) for w in m.writes),
                dtype,
                shp,
                m.target_fmt,
            )
    return _map_key(key, dialect, dtype, shp)


_SENTINELS = ("9990001", "9990002", "9990003")


@functools.lru_cache(maxsize=8192)
def _map_canonical(canonical: str, dialect: str, dtype: str | None) -> Mapping:
    return _map_key(canonical, dialect, dtype, None)


def _map_key(key: str, dialect: str, dtype: str | None, shp: tuple[int, ...] | None) -> Mapping:
    rule, target = rename(key, dialect)
    spec = _target_of(target)
    assert spec is not None  # rename checked it
    if dtype is None:
        return Mapping(key, target, None, rule.name, rule.reason, (), None, shp, spec.fmt)
    action, why, writes = decide_action(target, dtype, spec)
    return Mapping(key, target, action, rule.name, f"{rule.reason} | {why}", writes, dtype, shp, spec.fmt)
