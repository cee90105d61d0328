"""Small wording helpers for what the command line prints."""

from __future__ import annotations


def plural(count: int | float, word: str, many: str | None = None) -> str:
    """'1 epoch', '2 epochs', '0.5 epochs' (``many`` for irregular plurals: 'processes')."""
    shown = f"{count:g}" if isinstance(count, float) else str(count)
    return f"{shown} {word if count == 1 else (many or word + 's')}"
