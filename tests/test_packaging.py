"""packaging/: the systemd unit keeps its hardening, and the example config states the code's defaults."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from expertd.daemon.service.config import KEYS, ServeConfig

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "packaging" / "expertd.service"
EXAMPLE = REPO / "packaging" / "expertd.toml"
#: The exposure `systemd-analyze security --offline=true` gives the unit (docs/reliability.md); 3.6 before
#: issue 12's hardening. A change that loosens the sandbox fails here.
MAX_EXPOSURE = 1.6


def unit_directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment in a unit file, in order (keys may repeat)."""
    found, section = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def service(key: str) -> list[str]:
    return [v for s, k, v in unit_directives(UNIT.read_text()) if s == "Service" and k == key]


def test_unit_has_the_hardening_issue_12_asked_for() -> None:
    assert service("UMask") == ["0077"]
    assert service("ProtectProc") == ["invisible"]
    assert service("ProcSubset") == ["all"]  # CUDA reads /proc/driver/nvidia: `pid` would break it
    assert service("DevicePolicy") == ["closed"]
    allowed = {v.split()[0] for v in service("DeviceAllow")}
    assert {"char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps"} <= allowed
    assert service("SystemCallErrorNumber") == ["EPERM"]
    assert service("IPAddressDeny") == ["any"] and service("IPAddressAllow") == ["localhost"]
    for kept in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "RestrictAddressFamilies", "LimitMEMLOCK"):
        assert service(kept), kept


def test_syscall_filter_takes_privileged_calls_away_but_gives_chown_back() -> None:
    # systemd applies the assignments in order: the allow list, then the removal, then chown
    # again (socket_group: the socket and the shared memory are given to that group).
    # Reordered, the last word on chown would be "denied" and socket_group would fail.
    assert service("SystemCallFilter") == ["@system-service", "~@privileged", "@chown"]


def test_memory_max_is_absent_for_a_documented_reason() -> None:
    assert service("MemoryMax") == []
    unit = UNIT.read_text()
    assert "# No MemoryMax:" in unit and "MemoryMax=<host_size" in unit
    assert "MemoryMax" in (REPO / "docs" / "reliability.md").read_text()


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)
def test_unit_exposure_score_is_what_the_docs_quote(tmp_path: Path) -> None:
    # ExecStart must name an executable for the unit to load; point it at this environment's.
    expertd = shutil.which("expertd") or str(Path(sys.executable).parent / "expertd")
    unit = tmp_path / "expertd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/expertd", expertd))
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", str(unit)], capture_output=True, text=True, timeout=60
    )
    found = re.search(r"Overall exposure level for expertd\.service: (\d+\.\d+)", out.stdout)
    if out.returncode != 0 and found is None:
        pytest.skip(f"systemd-analyze security --offline is not supported here: {out.stderr.strip()[:200]}")
    assert found, out.stdout[-500:]
    assert float(found[1]) <= MAX_EXPOSURE, out.stdout
    assert f"exposure {found[1]}" in (REPO / "docs" / "reliability.md").read_text()


def _commented_keys(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value text) of every `# key = value` line of a TOML file."""
    found, section = [], ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip().strip("[]")
        match = re.match(r"#\s*([a-z_]+)\s*=\s*(.+?)\s*(#.*)?$", line)
        if match:
            found.append((section, match[1], match[2]))
    return found


def test_example_config_states_the_codes_defaults() -> None:
    ServeConfig.load(EXAMPLE)  # every key set there is known and valid
    defaults = {(k.section, k.name): k.default for k in KEYS}
    commented = _commented_keys(EXAMPLE.read_text())
    assert len(commented) >= 10
    for section, key, value in commented:
        assert (section, key) in defaults, f"[{section}] {key}: not a config key"
        stated = tomllib.loads(f"v = {value}")["v"]
        assert stated == defaults[section, key], (
            f"[{section}] {key} = {value}: the default is {defaults[section, key]!r}"
        )
    set_policies = tomllib.loads(EXAMPLE.read_text()).get("policy", {})
    assert set_policies == {}, "the example leaves the policies at their defaults"
