"""SMTP TLS Reporting (RFC 8460): the ``_smtp._tls`` record, outcomes counted in SQL
(every backend), and the daily report, parsed back and checked against the report
schema of RFC 8460 §4.4 (tests/fixtures/tlsrpt, with ``jsonschema``), delivered by
mail through LightMail's queue and POSTed over verified HTTPS: from a running
LightMail that delivers to a real Postfix, and from ``lightmail tlsrpt send-reports``."""

from __future__ import annotations

import email
import email.policy
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dnsserver import DNSServer
from harness import free_port
from inprocess import in_thread, start
from test_outbound import ReceivingMX, queue_state, submit, until
from testca import TestCA
from twisted.internet import reactor
from twisted.web import resource, server

from lightmail.tlsrpt.interfaces import NO_POLICY, STS, SUCCESS, TLSA, ReportPolicy, TLSResult
from lightmail.tlsrpt.report import (
    Reporter,
    build_report,
    file_name,
    mailto_address,
    report_addresses,
)
from lightmail.tlsrpt.store import SQLTLSReports
from tests.conftest import StorageStack

SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "tlsrpt" /
                     "rfc8460-report.schema.json").read_text())
YESTERDAY = time.time() - 86400
REPORTER = Reporter("Example Org", "tlsrpt@example.test", "tlsrpt@example.test")


def check_schema(report: Any) -> None:
    jsonschema.validate(report, SCHEMA, format_checker=jsonschema.FormatChecker())


def test_the_record_and_its_addresses() -> None:
    assert report_addresses(["v=TLSRPTv1; rua=mailto:a@b.test, https://r.test/x"]) == [
        "mailto:a@b.test", "https://r.test/x"]
    assert report_addresses(["v=TLSRPTv1;rua=mailto:a@b.test;ext=1", "v=spf1 -all"]) == [
        "mailto:a@b.test"]
    assert report_addresses(["v=TLSRPTv1; rua=ftp://x.test/, http://r.test/"]) == []
    assert report_addresses(["v=TLSRPTv1; rua=mailto:a@b.test",
                             "v=TLSRPTv1; rua=mailto:c@d.test"]) is None   # two: none
    assert report_addresses(["rua=mailto:a@b.test; v=TLSRPTv1"]) is None   # v= first
    assert report_addresses([]) is None
    assert mailto_address("mailto:tls%2Dreports@b.test?subject=x") == "tls-reports@b.test"
    assert mailto_address("mailto:not-an-address") is None


def test_report_structure_and_file_name() -> None:
    sts = ReportPolicy(STS, ("version: STSv1", "mode: enforce", "mx: mx.b.test",
                             "max_age: 86400"), ("mx.b.test",))
    from lightmail.tlsrpt.store import Counted
    rows = [Counted(TLSResult("b.test", sts, SUCCESS, "192.0.2.1", "mx.b.test",
                              "192.0.2.9"), 5),
            Counted(TLSResult("b.test", sts, "certificate-expired", "192.0.2.1",
                              "mx.b.test", "2001:db8::9", "expired"), 2),
            Counted(TLSResult("b.test", ReportPolicy(NO_POLICY), "sts-policy-fetch-error",
                              reason="HTTP 404"), 1)]
    report = build_report(rows, "2026-12-09", "b.test", REPORTER, "id-1")
    check_schema(report)
    assert report["date-range"] == {"start-datetime": "2026-12-09T00:00:00Z",
                                    "end-datetime": "2026-12-09T23:59:59Z"}
    first, second = report["policies"]
    assert first["summary"] == {"total-successful-session-count": 5,
                                "total-failure-session-count": 2}
    assert first["failure-details"] == [{
        "result-type": "certificate-expired", "sending-mta-ip": "192.0.2.1",
        "receiving-mx-hostname": "mx.b.test", "receiving-ip": "2001:db8::9",
        "failed-session-count": 2, "failure-reason-code": "expired"}]
    assert second["policy"] == {"policy-type": "no-policy-found", "policy-domain": "b.test"}
    assert file_name(report, "b.test", REPORTER) == (
        "example.test!b.test!1796774400!1796860799.json.gz")
    with pytest.raises(jsonschema.ValidationError):      # the schema does check
        check_schema({**report, "policies": [{"policy": {"policy-type": "dane"}}]})


@pytest_twisted.ensureDeferred
async def test_outcomes_are_counted_in_sql(stack: StorageStack) -> None:
    now = [YESTERDAY]
    store = SQLTLSReports(stack.db, clock=lambda: now[0])
    tlsa = ReportPolicy(TLSA, ("3 1 1 " + "ab" * 32,), ("mx.a.test",))
    success = TLSResult("a.test", tlsa, SUCCESS, "192.0.2.1", "mx.a.test", "192.0.2.2")
    failure = TLSResult("a.test", tlsa, "validation-failure", "192.0.2.1", "mx.a.test",
                        "192.0.2.2", "no match")
    for _ in range(3):
        store.record(success)
    store.record(failure)
    store.record(TLSResult("other.test", ReportPolicy(NO_POLICY), SUCCESS))
    await store.flush()
    store.record(success)              # added to the row that is there
    await store.flush()
    await store.flush()                # nothing new: nothing done
    now[0] = time.time()
    store.record(success)              # today's: not reported yet
    await store.flush()
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(YESTERDAY))
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert await store.days(before=today) == [(yesterday, "a.test"),
                                              (yesterday, "other.test")]
    rows = await store.take(yesterday, "a.test")
    assert sorted((r.result.result_type, r.count) for r in rows) == [
        ("success", 4), ("validation-failure", 1)]
    assert {r.result for r in rows} == {success, failure}
    assert await store.take(yesterday, "a.test") == []          # taken once
    report = build_report(rows, yesterday, "a.test", REPORTER, "id-2")
    check_schema(report)
    assert report["policies"][0]["policy"]["mx-host"] == ["mx.a.test"]
    assert await store.days(before=today) == [(yesterday, "other.test")]


# -- from a running LightMail ------------------------------------------------------------------

class Collector(resource.Resource):
    """The https: report address: keeps what is POSTed."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[bytes, bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        content_type = request.getHeader(b"content-type") or b""
        self.posts.append((content_type, request.content.read()))
        request.setResponseCode(201)
        return b""


def report_of(mail: bytes) -> tuple[Any, dict[str, Any]]:
    """The message and its report, as a reader of RFC 8460 §5.3 mail gets them."""
    message = email.message_from_bytes(mail, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    [attachment] = [part for part in message.iter_attachments()]
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(attachment.get_content()))
    check_schema(report)
    return message, report


@pytest.fixture
def world(tmp_path: Path) -> Any:
    ca = TestCA(Path(tempfile.mkdtemp(prefix="lightmail-tlsrpt-ca-")))
    os.chmod(ca.directory, 0o755)
    cert, key = ca.issue("mx.rpt.test")
    os.chmod(key, 0o644)
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    spki = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    port = free_port()
    collector = Collector()
    from twisted.internet import ssl
    web_cert, web_key = ca.issue("reports.rpt.test")
    https = reactor.listenSSL(  # type: ignore[attr-defined]
        0, server.Site(collector), ssl.DefaultOpenSSLContextFactory(str(web_key),
                                                                   str(web_cert)),
        interface="127.0.0.1")
    rua = f"https://reports.rpt.test:{https.getHost().port}/v1/tlsrpt"
    dns = DNSServer({
        "good.test.": {"MX": [(10, "mx.rpt.test.")]},
        "bad.test.": {"MX": [(10, "bad-mx.rpt.test.")]},
        "none.test.": {"MX": [(10, "none-mx.rpt.test.")]},
        "mx.rpt.test.": {"A": ["127.0.0.1"]},
        "bad-mx.rpt.test.": {"A": ["127.0.0.1"]},
        "none-mx.rpt.test.": {"A": ["127.0.0.1"]},
        "reports.rpt.test.": {"A": ["127.0.0.1"]},
        f"_{port}._tcp.mx.rpt.test.": {"TLSA": [f"3 1 1 {hashlib.sha256(spki).hexdigest()}"]},
        f"_{port}._tcp.bad-mx.rpt.test.": {"TLSA": [f"3 1 1 {'00' * 32}"]},
        "_smtp._tls.good.test.": {"TXT": [f"v=TLSRPTv1; rua=mailto:bob@example.test,{rua}"]},
        "_smtp._tls.bad.test.": {"TXT": ["v=TLSRPTv1;rua=mailto:bob@example.test"]},
    }, ttl=1, authenticated=True)
    dns.start()
    mx = ReceivingMX(port, ["rcpt@good.test", "rcpt@bad.test", "rcpt@none.test"], main={
        "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
        "smtpd_tls_key_file": str(key)})
    yield {"ca": ca, "dns": dns, "mx": mx, "port": port, "collector": collector}
    mx.stop()
    dns.stop()
    https.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_running_server_records_and_reports(tmp_path: Path, world: Any) -> None:
    dns, mx, collector = world["dns"], world["mx"], world["collector"]
    server_ = yield start(tmp_path, f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n"
                          f"port = {world['port']}\nmin_backoff = 1s\nmax_backoff = 2s\n"
                          f"ca_file = {world['ca'].ca_file}\n"
                          "[tlsrpt]\nenabled = yes\norg_name = Example Org\n"
                          "from_address = tlsrpt@example.test\nflush_interval = 1h\n"
                          "interval = 1d\n")
    server_.parts.queue_runner.poll_interval = 0.5
    service = server_.root.getServiceNamed("tlsrpt")
    try:
        yield in_thread(submit, server_.ports["submissions"], ("rcpt@good.test", "good"),
                        ("rcpt@bad.test", "bad"), ("rcpt@none.test", "none"))
        yield until(lambda: mx.messages("rcpt@good.test") and mx.messages("rcpt@none.test"))
        yield until(lambda: queue_state(server_).addCallback(
            lambda state: state["rcpt@bad.test"][0] == "deferred"))
        yield service.store.flush()
        # The job reports complete days: the test moves its clock a day on.
        service.job.clock = lambda: time.time() + 86400
        sent = yield service.run_job()
        assert sorted(uri.split(":")[0] for _, domain, uri in sent.reports
                      if domain == "good.test") == ["https", "mailto"]
        assert [domain for _, domain, _ in sent.reports] .count("bad.test") == 1
        assert [(domain, why) for _, domain, why in sent.skipped] == [
            ("none.test", "no TLS-RPT record")]
        mails = yield server_.delivered("bob@example.test", 2)
        by_domain = {}
        for mail in mails:
            message, report = report_of(mail)
            by_domain[message["TLS-Report-Domain"]] = (message, report)
        message, good = by_domain["good.test"]
        assert message["TLS-Report-Submitter"] == "example.test"
        assert message["From"] == "tlsrpt@example.test"
        assert message["Subject"].startswith("Report Domain: good.test Submitter: "
                                             "example.test Report-ID: <")
        [attachment] = list(message.iter_attachments())
        assert attachment.get_filename().startswith("example.test!good.test!")
        assert attachment.get_filename().endswith(".json.gz")
        assert good["organization-name"] == "Example Org"
        [policy] = good["policies"]
        assert policy["policy"]["policy-type"] == "tlsa"
        assert policy["summary"] == {"total-successful-session-count": 1,
                                     "total-failure-session-count": 0}
        [policy] = by_domain["bad.test"][1]["policies"]
        assert policy["summary"]["total-successful-session-count"] == 0
        assert policy["summary"]["total-failure-session-count"] >= 1
        detail = policy["failure-details"][0]
        assert detail["result-type"] == "validation-failure"
        assert detail["receiving-mx-hostname"] == "bad-mx.rpt.test"
        assert detail["receiving-ip"] == "127.0.0.1"
        assert detail["sending-mta-ip"] == "127.0.0.1"
        # The same report of good.test, POSTed.
        [(content_type, body)] = collector.posts
        assert content_type == b"application/tlsrpt+gzip"
        posted = json.loads(gzip.decompress(body))
        check_schema(posted)
        assert posted["report-id"] == good["report-id"]
        # Reported once: the next run finds nothing.
        again = yield service.run_job()
        assert not again.reports
    finally:
        yield server_.root.stopService()


@pytest_twisted.ensureDeferred
async def test_send_reports_command_queues_the_report(tmp_path: Path) -> None:
    state = tmp_path / "state"
    url = f"sqlite:///{state / 'lightmail.db'}"
    with DNSServer({"_smtp._tls.far.test.": {
            "TXT": ["v=TLSRPTv1; rua=mailto:tls-reports@far.test"]}}) as dns:
        config = tmp_path / "lightmail.conf"
        config.write_text(f"[server]\nstate_dir = {state}\nhostname = mx.example.test\n"
                          f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n"
                          "[tlsrpt]\nenabled = yes\n")
        stack = StorageStack(url, state)
        try:
            store = SQLTLSReports(stack.db, clock=lambda: YESTERDAY)
            store.record(TLSResult("far.test", ReportPolicy(NO_POLICY),
                                   "starttls-not-supported", "192.0.2.1", "mx.far.test",
                                   "192.0.2.2", "STARTTLS not offered"))
            await store.flush()
        finally:
            stack.close()
        done = await in_thread(
            subprocess.run, [sys.executable, "-m", "lightmail.admin.cli", "--config",
                             str(config), "tlsrpt", "send-reports"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        assert done.returncode == 0, done.stderr
        assert "sent to mailto:tls-reports@far.test" in done.stdout
        assert "1 report sent" in done.stdout
    stack = StorageStack(url, state)
    try:
        [row] = await stack.queue.list_recipients()
        assert (row["mail_from"], row["recipient"], row["transport"]) == (
            "postmaster@mx.example.test", "tls-reports@far.test", "smtp")
        [item] = await stack.queue.claim_message("test", row["queue_id"], 60)
        assert item.envelope.source == "local"
        message, report = report_of(await stack.blobs.read(item.blob.id))
        assert message["TLS-Report-Domain"] == "far.test"
        assert message["TLS-Report-Submitter"] == "mx.example.test"
        assert report["policies"][0]["failure-details"][0]["result-type"] == (
            "starttls-not-supported")
    finally:
        stack.close()


@pytest_twisted.ensureDeferred
async def test_mta_sts_policies_that_cannot_be_had_are_reported() -> None:
    from twisted.internet import defer

    from lightmail.outbound.mtasts import MTASTS, PolicyError

    class Records:
        def __init__(self) -> None:
            self.results: list[TLSResult] = []

        def record(self, result: TLSResult) -> None:
            self.results.append(result)

    class TXT:
        def txt(self, name: str) -> Any:
            # An id of letters and digits only (RFC 8461 §3.1; others are no id).
            return defer.succeed(["v=STSv1; id=" + "".join(filter(str.isalnum, name))])

    bodies: list[Any] = [PolicyError("HTTP 404"), b"version: STSv9\n"]

    def fetch(url: str) -> Any:
        body = bodies.pop(0)
        return defer.fail(body) if isinstance(body, Exception) else defer.succeed(body)
    records = Records()
    sts = MTASTS(TXT(), fetch, reports=records)  # type: ignore[arg-type]
    assert await sts.policy("a.test") is None
    assert await sts.policy("b.test") is None
    assert [(r.policy_domain, r.policy.type, r.result_type, r.reason)
            for r in records.results] == [
        ("a.test", "sts", "sts-policy-fetch-error", "HTTP 404"),
        ("b.test", "sts", "sts-policy-invalid", "not an STSv1 policy")]
