"""Per-row errors shared by every stage: a bad row or product is recorded with its reason, never fatal.

Each stage (manifest ingest, image fetch, inference) turns a problem into a :class:`RowError`;
``repository.record_errors`` stores them in ``product_errors``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RowError:
    """One rejected input row (or product) and why; stored in ``product_errors``."""

    reason: str
    product_id: int | None = None
    source: str = ""
    stage: str = "manifest"


def describe_error(error: Exception) -> str:
    """First line of an exception, bounded: enough for an error row, never a traceback."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
