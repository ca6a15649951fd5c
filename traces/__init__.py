"""Routing traces: the `.etrace` format, converters, stats and the traces shipped with expertd."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_SHIPPED = "granite-3.0-1b-a400m"


def list_shipped() -> list[str]:
    """Names of the traces shipped with expertd, sorted (see traces/data/ATTRIBUTION.md)."""
    return sorted(path.stem for path in DATA_DIR.glob("*.etrace"))


def shipped(name: str | None = None) -> Path:
    """The path of a shipped trace; the default is the Granite-3.0-1B-A400M one."""
    path = DATA_DIR / f"{name or DEFAULT_SHIPPED}.etrace"
    if not path.is_file():
        known = ", ".join(list_shipped()) or "none"
        raise ValueError(f"no shipped trace {name or DEFAULT_SHIPPED!r} (shipped: {known})")
    return path
