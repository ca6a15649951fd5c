"""`expertd replay` and `expertd trace ...` (filled in by the traces work)."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add this module's subcommands."""
