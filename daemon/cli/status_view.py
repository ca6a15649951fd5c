"""`expertd status --watch`: a live terminal view, redrawn in place every interval.

Each frame is the `format_status` page under a line of what happened since the previous
frame (rates, the hit rate of just those accesses, stall per acquire, bytes per second per
link, prefetches used and wasted), because lifetime totals barely move on a daemon that has
served for hours. A daemon that stops answering is shown as such and polled again; Ctrl-C
ends the view.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def _delta(new: dict[str, Any], old: dict[str, Any], *path: str) -> float:
    for key in path[:-1]:
        new, old = new.get(key, {}), old.get(key, {})
    return float(new.get(path[-1], 0)) - float(old.get(path[-1], 0))


def format_recent(stats: dict[str, Any], previous: dict[str, Any] | None, seconds: float) -> str:
    """What changed between two stats snapshots ``seconds`` apart, in one or two lines."""
    if previous is None or seconds <= 0 or "daemon" not in stats:
        return "since the last frame: (first frame)"
    acquires = _delta(stats, previous, "acquires", "count")
    waited = _delta(stats, previous, "acquires", "waited")
    stall = _delta(stats, previous, "acquires", "stall_s")
    parts = [f"{acquires / seconds:,.0f} acquires/s"]
    for name in stats["tiers"]:
        accesses = _delta(stats, previous, "tiers", name, "accesses")
        hits = _delta(stats, previous, "tiers", name, "hits")
        parts.append(f"{name} hit {hits / accesses:.1%}" if accesses else f"{name} idle")
    if acquires:
        parts.append(f"stall {stall / acquires * 1e3:.2f} ms/acquire ({waited / acquires:.0%} waited)")
    links = [
        f"{name} {_delta(stats, previous, 'links', name, 'bytes') / seconds / 1e6:,.1f} MB/s"
        for name in stats["links"]
    ]
    used = sum(_delta(stats, previous, "tiers", n, "prefetch_used") for n in stats["tiers"])
    wasted = sum(_delta(stats, previous, "tiers", n, "prefetch_wasted") for n in stats["tiers"])
    second = ", ".join(links) + f"; prefetches used {used / seconds:,.1f}/s, wasted {wasted / seconds:,.1f}/s"
    return f"last {seconds:.1f} s: " + ", ".join(parts) + "\n" + " " * 11 + second


def watch(
    fetch: Callable[[], dict[str, Any]],
    page: Callable[[dict[str, Any]], str],
    every_s: float,
    address: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    out: Any = None,
) -> int:
    """Redraw ``page(fetch())`` every ``every_s`` seconds until Ctrl-C."""
    from expertd.daemon.cli.main import CliError

    out = out or sys.stdout
    previous: dict[str, Any] | None = None
    previous_at = 0.0
    try:
        while True:
            header = (
                f"expertd status --watch {address}: every {every_s:g} s, Ctrl-C stops  {time.strftime('%X')}"
            )
            try:
                stats = fetch()
            except CliError as exc:
                out.write(f"{CLEAR}{header}\n\n{exc} -- polling again\n")
                out.flush()
                previous = None
            else:
                now = clock()
                recent = format_recent(stats, previous, now - previous_at)
                out.write(f"{CLEAR}{header}\n{recent}\n\n{page(stats)}\n")
                out.flush()
                previous, previous_at = stats, now
            time.sleep(every_s)
    except KeyboardInterrupt:
        out.write("\n")
        return 0
