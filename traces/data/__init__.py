"""Routing traces shipped with expertd (see traces/README.md)."""
