"""Every default README.md and docs/ state is the code's, and every such statement is checked here.

docs/config.md is generated whole (`expertd serve --print-config-doc`; tests/test_daemon.py
compares it). Prose elsewhere that quotes a default is listed in `stated_defaults` with the value
read from the code; a new "(default X)" in the docs that is not listed fails
`test_every_quoted_default_is_checked`, so a quote cannot go stale unnoticed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from expertd.client import vllm_plugin
from expertd.daemon.cli.main import build_parser
from expertd.daemon.core import defaults
from expertd.daemon.service.config import KEYS
from expertd.traces import convert, convert_csv, convert_sglang

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "traces" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
GENERATED = {REPO / "docs" / "config.md"}
#: How the docs quote a default: "(default `lru`)", "`none` (the default)", "defaults: ...", "default `x`".
QUOTE = re.compile(r"\(default\b|\(the default[,)]|\bdefaults?: |\bdefault `")


_FRACTION = {0.5: "half", 0.25: "a quarter", 1.0: "the whole tier"}


def option(command: list[str], flag: str) -> argparse.Action:
    """The argparse action of ``flag`` under ``expertd COMMAND...``."""
    parser = build_parser()
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return next(a for a in parser._actions if flag in a.option_strings)


def text_of(path: Path) -> str:
    """A doc's text with every run of whitespace as one space (quotes may wrap lines)."""
    return " ".join(path.read_text().split())


def stated_defaults() -> list[tuple[str, str]]:
    """(doc, the exact phrase it must contain, built from the code's values)."""
    p = defaults.PREFETCH
    key = {k.attr: k.default for k in KEYS}  # expertd.toml's keys
    return [
        ("docs/getting-started.md", f"`--device-policy NAME` (default `{defaults.DEVICE_POLICY}`"),
        ("docs/getting-started.md", f"`--host-policy NAME` (default `{defaults.HOST_POLICY}`)"),
        ("docs/getting-started.md", f"redrawn every {option(['status'], '--watch').const:g} s"),
        (
            "docs/prefetch.md",
            f"device policy `{defaults.DEVICE_POLICY}`, host policy `{defaults.HOST_POLICY}`, predictor "
            f"`{p['predictor']}`, depth {p['depth']}, min_prob {p['min_prob']}, width {p['width']}, "
            f"budget {p['budget']}, share {p['share']}, window {p['window']}.",
        ),
        ("docs/prefetch.md", f"the default `{defaults.DEVICE_POLICY}` eviction"),
        ("docs/store.md", f"`{option(['pack'], '--codec').default}` (the default)"),
        ("docs/security.md", "`ipc://` (the default, local clients)"),
        ("docs/security.md", f'`[auth] ipc_admin = "{key["auth_ipc_admin"]}"`, by kernel uid'),
        ("docs/reliability.md", f'under the default `[auth] ipc_admin = "{key["auth_ipc_admin"]}"`'),
        ("docs/security.md", f"`[clients] capacity_wait_s` (default {key['clients_capacity_wait_s']:g} s)"),
        (
            "docs/security.md",
            f"max_pinned_share` of a tier (default {_FRACTION[key['clients_max_pinned_share']]};",
        ),
        ("traces/README.md", f'The default license is "{convert.UNKNOWN_LICENSE}".'),
        (
            "traces/README.md",
            f"defaults: `{convert_sglang.DEFAULT_MODEL}`, {convert_sglang.DEFAULT_EXPERTS} experts",
        ),
        (
            "traces/README.md",
            f"defaults: `{convert_csv.DEFAULT_MODEL}`, {convert_csv.DEFAULT_EXPERTS} experts",
        ),
        # vllm_method takes os.environ[ENV_TIER] or else client.default_tier
        ("docs/getting-started.md", f"`{vllm_plugin.ENV_TIER}` picks the tier (default: the daemon's)"),
    ]


@pytest.mark.parametrize(("doc", "phrase"), stated_defaults())
def test_stated_default_is_the_codes(doc: str, phrase: str) -> None:
    assert phrase in text_of(REPO / doc), f"{doc} should say: {phrase}"


def test_every_quoted_default_is_checked() -> None:
    checked: dict[str, list[str]] = {}
    for doc, phrase in stated_defaults():
        checked.setdefault(doc, []).append(phrase)
    unchecked = []
    for path in DOCS:
        if path in GENERATED:
            continue
        text = text_of(path)
        doc = path.relative_to(REPO).as_posix()
        spans = [
            (m.start(), m.end())
            for phrase in checked.get(doc, [])
            for m in re.finditer(re.escape(phrase), text)
        ]
        for quote in QUOTE.finditer(text):
            if not any(start <= quote.start() < end for start, end in spans):
                unchecked.append(f"{doc}: ...{text[max(0, quote.start() - 50) : quote.end() + 30]}...")
    assert not unchecked, "defaults quoted but not checked in stated_defaults():\n" + "\n".join(unchecked)
