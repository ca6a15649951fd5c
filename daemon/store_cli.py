"""`expertd pack` and `expertd store ...` (filled in by the store work)."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add this module's subcommands."""
