"""What operators install: the systemd unit, checked by the real `systemd-analyze
verify` (any warning fails), and the Dockerfile, which cannot be built here (no
container runtime): it copies files that exist and runs the unit's command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "etc" / "systemd" / "lightmail.service"
COMMAND = ["/opt/lightmail/bin/twistd", "-n", "--pidfile=", "lightmail", "--config",
           "/etc/lightmail/lightmail.conf"]


def _unit() -> dict[str, list[str]]:
    """The [Service] section's directives, each with every value it is given."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#") and section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def _verify(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: scripts/test-peers.sh installs it "
                    "(Debian's systemd package)", pytrace=False)
    unit = tmp_path / "lightmail.service"
    unit.write_text(text)
    return subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True,
                          timeout=120)


def _here(text: str) -> str:
    # verify checks that ExecStart's program exists: this machine's twistd stands in
    # for /opt/lightmail's (the rest of the unit is verified as shipped).
    twistd = str(Path(sys.executable).parent / "twistd")
    return text.replace("/opt/lightmail/bin/twistd", twistd)


def test_the_systemd_unit_passes_systemd_analyze_verify_without_a_warning(
        tmp_path: Path) -> None:
    result = _verify(_here(UNIT.read_text()), tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # verify does read every directive: a misspelt one, or a bad value, is reported.
    broken = _here(UNIT.read_text()).replace("ProtectSystem=", "ProtectSytem=")
    broken = broken.replace("RestrictAddressFamilies=", "RestrictAddressFamilies=AF_BOGUS ")
    result = _verify(broken, tmp_path)
    assert "Unknown key 'ProtectSytem'" in result.stderr, result.stderr
    assert "AF_BOGUS" in result.stderr, result.stderr


def test_the_unit_runs_twistd_hardened_and_reloads_with_sighup() -> None:
    unit = _unit()
    assert unit["ExecStart"] == [" ".join(COMMAND)]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Type"] == ["simple"] and unit["User"] == ["lightmail"]
    hardening = {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                 "ProtectHome": "yes", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
                 "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
                 "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}
    for key, value in hardening.items():
        assert unit.get(key) == [value], key
    # With ProtectSystem=strict, the state and log directories are the writable ones.
    assert unit["ReadWritePaths"] == ["/var/lib/lightmail /var/log/lightmail"]
    # The logrotate config signals this unit's main process.
    assert "--kill-whom=main lightmail.service" in (
        REPO / "etc" / "logrotate.d" / "lightmail").read_text()


def test_the_dockerfile_copies_what_exists_and_runs_the_units_command() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:\S+-slim$", text, re.M)
    copied = [path for line in re.findall(r"^COPY (.+) \S+$", text, re.M)
              for path in line.split()]
    assert copied
    for path in copied:
        assert (REPO / path).exists(), path
    cmd = re.search(r"^CMD (.+)$", text, re.M)
    assert cmd and json.loads(cmd.group(1)) == COMMAND
    assert re.search(r"^USER lightmail$", text, re.M)
    assert "VOLUME [\"/var/lib/lightmail\"" in text
    assert "pip install --no-cache-dir /src" in text
