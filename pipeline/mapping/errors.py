"""The errors of the mapping: a key or a checkpoint that the table cannot map."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import DsV4Error

if TYPE_CHECKING:
    from .rules import Rule


class MappingError(DsV4Error):
    """A key or a checkpoint that the table cannot map."""


class UnmappedKeyError(MappingError):
    def __init__(self, key: str, dialect: str, message: str, nearest: Rule | None):
        self.key, self.dialect, self.nearest = key, dialect, nearest
        super().__init__(message)
