"""Metrics and health on the admin listener: a real ``twistd lightmail`` with worker
processes and the writer process, scraped over HTTP and checked by Prometheus' own
promtool; the alert rules and the Grafana dashboard of etc/ against what it exposes;
readiness and the bearer token on an in-process server."""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from harness import ServerProcess, free_port, run_cli
from inprocess import in_thread, start

from lightmail.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parent.parent
ADMIN = re.compile(r"admin listener on [^\s:]+:(?P<port>\d+)")


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: run scripts/test-peers.sh (Debian's prometheus)"
    return path


def get(url: str, token: str = "") -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of an exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        found_name, _, rest = metric.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if found_name == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server with 2 workers and the writer process; one message delivered, one
    deferred (its relay refuses connections), a bad command and a failed login."""
    tmp = tmp_path_factory.mktemp("metrics")
    config = tmp / "lightmail.conf"
    config.write_text(
        "[server]\nstate_dir = state\nhostname = mx.example.test\nworkers = 2\n"
        "shutdown_timeout = 5s\n"
        f"[outbound]\nrelay_host = [127.0.0.1]:{free_port()}\nmin_backoff = 1h\n"
        "[directory]\nauth_over_plaintext = yes\n"
        "[admin]\nenabled = yes\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "[listener:submission]\nprotocol = submission\n"
        "endpoint = tcp:0:interface=127.0.0.1\n")
    run_cli(config, "domain", "add", "example.test")
    run_cli(config, "user", "add", "bob@example.test", "--password-stdin", stdin="secret\n")
    proc = ServerProcess(config)
    try:
        ports = proc.ports(expected=2)
        admin = int(proc.wait_for(ADMIN.pattern)[0].group("port"))
        with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=20) as smtp:
            smtp.sendmail("a@remote.example", ["bob@example.test"],
                         b"Subject: one\r\n\r\nhello\r\n")
            assert smtp.docmd("FROBNICATE")[0] == 500
        with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=20) as smtp:
            smtp.ehlo()
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login("bob@example.test", "wrong")
            smtp.login("bob@example.test", "secret")
            smtp.sendmail("bob@example.test", ["friend@far.example"],
                         b"Subject: two\r\n\r\nhello\r\n")
        base = f"http://127.0.0.1:{admin}"
        # The deferred delivery is recorded shortly after the queue runner tries it,
        # and the queue's gauges, read from the database, a little after that.
        for _ in range(100):
            status, text = get(base + "/metrics")
            if sample(text, "lightmail_deliveries_total", status="deferred") and sample(
                    text, "lightmail_queue_recipients", state="deferred"):
                break
            time.sleep(0.2)
        yield {"base": base, "metrics": text, "status": status, "proc": proc}
    finally:
        proc.kill()


def test_metrics_sum_the_workers_and_the_writer(server: dict[str, Any]) -> None:
    text = server["metrics"]
    assert server["status"] == 200
    # Sessions ran in the worker processes; the main process serves their counts.
    assert sample(text, "lightmail_connections_total", protocol="smtp") == 1
    assert sample(text, "lightmail_connections_total", protocol="submission") == 1
    assert sample(text, "lightmail_commands_total", protocol="smtp", command="MAIL") == 1
    assert sample(text, "lightmail_commands_total", protocol="smtp", command="other") == 1
    assert sample(text, "lightmail_auth_total", protocol="submission", mechanism="plain",
                  result="failure") == 1
    assert sample(text, "lightmail_auth_total", protocol="submission", mechanism="plain",
                  result="success") == 1
    assert sample(text, "lightmail_sessions_total", protocol="submission") == 1
    assert sample(text, "lightmail_messages_total", protocol="smtp", result="accepted") == 1
    # The writer process committed the acceptances in groups.
    assert sample(text, "lightmail_group_commit_size_count") >= 1
    assert sample(text, "lightmail_sql_seconds_count", kind="read") >= 1
    # The queue: the remote recipient waits for its next attempt.
    assert sample(text, "lightmail_deliveries_total", transport="smtp",
                  status="deferred") == 1
    assert sample(text, "lightmail_queue_recipients", state="deferred") == 1
    assert sample(text, "lightmail_ready") == 1
    assert sample(text, "lightmail_build_info") == 1        # not once per process


def test_promtool_accepts_the_exposition(server: dict[str, Any]) -> None:
    result = subprocess.run([promtool(), "check", "metrics"], input=server["metrics"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_health_endpoints(server: dict[str, Any]) -> None:
    assert get(server["base"] + "/healthz") == (200, "ok\n")
    status, body = get(server["base"] + "/readyz")
    assert status == 200, body
    verdict = json.loads(body)
    assert verdict["ready"] is True
    assert verdict["checks"] == {"storage": "ok", "queue": "ok", "listener:mx": "ok",
                                 "listener:submission": "ok", "workers": "ok"}


def test_alert_rules_pass_promtool() -> None:
    rules = REPO / "etc" / "prometheus" / "lightmail-alerts.yml"
    result = subprocess.run([promtool(), "check", "rules", str(rules)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _exposed(text: str) -> set[str]:
    """Every sample name the exposition has or declares (a family without samples yet
    declares its type: histogram NAME has NAME_bucket, _sum, _count; a counter is
    declared under its NAME_total)."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    suffixes = {"histogram": ["_bucket", "_sum", "_count"]}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.update(name + suffix for suffix in suffixes.get(kind, [""]))
    return names


def test_dashboard_and_rules_query_only_exposed_metrics(server: dict[str, Any]) -> None:
    dashboard = json.loads((REPO / "etc" / "grafana" /
                            "lightmail-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = (REPO / "etc" / "prometheus" / "lightmail-alerts.yml").read_text()
    used = set(re.findall(r"\blightmail_[a-z_]+", " ".join(exprs) + rules))
    assert len(used) > 10
    assert used - _exposed(server["metrics"]) == set()


# -- in-process: readiness failing, the bearer token, the configuration -------------


def _admin_port(server: Any) -> int:
    return server.root.getServiceNamed("admin").port.getHost().port


@pytest_twisted.inlineCallbacks
def test_readyz_says_which_check_failed(tmp_path: Path) -> Any:
    server = yield start(tmp_path, "[admin]\nenabled = yes\n"
                         "endpoint = tcp:0:interface=127.0.0.1\n")
    try:
        base = f"http://127.0.0.1:{_admin_port(server)}"
        status, _ = yield in_thread(get, base + "/readyz")
        assert status == 200
        yield server.root.getServiceNamed("queue").stopService()
        status, body = yield in_thread(get, base + "/readyz")
        assert status == 503
        assert json.loads(body)["checks"]["queue"] == "not running"
        status, text = yield in_thread(get, base + "/metrics")
        assert sample(text, "lightmail_ready") == 0
        assert (yield in_thread(get, base + "/healthz"))[0] == 200
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_metrics_ask_for_the_bearer_token_when_one_is_set(tmp_path: Path) -> Any:
    (tmp_path / "token").write_text("s3cret-token\n")
    server = yield start(tmp_path, "[admin]\nenabled = yes\n"
                         f"endpoint = tcp:0:interface=127.0.0.1\ntoken_file = "
                         f"{tmp_path / 'token'}\n")
    try:
        base = f"http://127.0.0.1:{_admin_port(server)}"
        assert (yield in_thread(get, base + "/metrics"))[0] == 401
        assert (yield in_thread(get, base + "/metrics", "wrong"))[0] == 401
        status, text = yield in_thread(get, base + "/metrics", "s3cret-token")
        assert status == 200 and "lightmail_build_info" in text
        assert (yield in_thread(get, base + "/healthz"))[0] == 200
    finally:
        yield server.stop()


def test_an_admin_listener_off_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x.conf:3: \[admin\] endpoint: an admin "
                                          r"listener off loopback needs token_file"):
        parse_config("[admin]\nenabled = yes\nendpoint = tcp:8025\n", "x.conf")
    (tmp_path / "token").write_text("zq-token-zq\n")
    config = parse_config(f"[admin]\nenabled = yes\nendpoint = tcp:8025\n"
                          f"token_file = {tmp_path / 'token'}\n", "x.conf")
    assert config.admin.token == "zq-token-zq"
    assert "zq-token-zq" not in repr(config)
    assert parse_config("[admin]\nenabled = yes\nendpoint = tcp6:8025:interface=\\:\\:1\n",
                        "x.conf").admin.enabled
