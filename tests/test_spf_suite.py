"""The RFC 7208 test suite (the openspf project's rfc7208-tests.yml, from pyspf's
source distribution: scripts/fetch-spf-suite.sh, which ``make test`` runs) judging
LightMail's SPF evaluator.

Each scenario's zone data is served by a test resolver (tests/spfzone.py); each case
is checked as pyspf's driver checks it: the MAIL FROM identity (postmaster@HELO for
an empty MAIL FROM), the result (one of the results listed, where the suite accepts
several) and, where the case gives one, the explanation, with "DEFAULT" as the
default explanation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from spfzone import ZoneResolver
from twisted.internet import task

from lightmail.policy.spf import IdentityResults, SPFChecker

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
SUITE = CACHE / "lightmail" / "rfc7208" / "rfc7208-tests.yml"
DIGEST = Path(__file__).with_name("rfc7208-tests.yml.sha256")


def _cases() -> list[Any]:
    if not SUITE.exists():
        return [pytest.param(None, None, id="suite-missing")]
    cases = []
    for scenario in yaml.safe_load_all(SUITE.read_bytes()):
        for name, case in scenario["tests"].items():
            cases.append(pytest.param(scenario["zonedata"], case, id=name))
    return cases


CASES = _cases()


def test_the_suite_is_the_reviewed_one() -> None:
    assert SUITE.exists(), (f"{SUITE} is missing: run scripts/fetch-spf-suite.sh "
                            "(make test runs it through scripts/test-peers.sh)")
    assert hashlib.sha256(SUITE.read_bytes()).hexdigest() == DIGEST.read_text().split()[0]
    assert len(CASES) > 150        # all of it was read: 2014.04 has 200-odd cases


@pytest.mark.parametrize("zonedata, case", CASES)
def test_rfc7208(zonedata: dict[str, Any], case: dict[str, Any]) -> None:
    if case is None:
        pytest.fail(f"{SUITE} is missing: run scripts/fetch-spf-suite.sh (make test runs "
                    "it through scripts/test-peers.sh)", pytrace=False)
    checker = SPFChecker(ZoneResolver(zonedata), clock=task.Clock(),
                         default_explanation="DEFAULT")
    done: list[IdentityResults] = []
    checker.check_identities(case["host"], case["helo"], case["mailfrom"],
                             check_helo=False).addCallback(done.append)
    assert done, "the check did not finish (the zone resolver answers at once)"
    got = done[0].mail_from
    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    assert got.result in expected, (
        f"{got.result} ({got.reason}), expected {' or '.join(expected)} "
        f"(RFC 7208 {case['spec']})")
    if "explanation" in case:
        assert got.explanation == case["explanation"]
