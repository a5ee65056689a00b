"""DMARC aggregate reports (RFC 7489 §7.1, §7.2, Appendix C;
lightmail/policy/dmarc/reports.py): verdicts recorded in SQL, a run that builds the
gzip'ed XML report per policy domain and queues it for the record's rua= addresses
(local ones to a local mailbox, others over SMTP), external destinations verified
through the test DNS server, !size limits, the rows forgotten once reported; the
report read back with the standard library and validated against RFC 7489
Appendix C's XML Schema by xmlschema; the rows on every database backend; the timer;
and ``lightmail dmarc send-reports``."""

from __future__ import annotations

import email
import email.policy
import gzip
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from dnsserver import DNSServer
from spfzone import ZoneResolver
from twisted.internet import defer, task

from lightmail.config import DMARCConfig
from lightmail.dns import Resolver
from lightmail.policy.dmarc import (
    DMARCChecker,
    DMARCReports,
    DMARCResult,
    ReportRun,
    ReportService,
    ReportSettings,
    load_suffixes,
)
from lightmail.policy.dmarc.destinations import check_destination
from lightmail.policy.dmarc.store import STALE_CLAIM_MS, ResultStore
from lightmail.storage import schema as s
from tests.conftest import StorageStack

SUFFIXES = load_suffixes()
XSD = Path(__file__).parent / "fixtures" / "dmarc" / "rfc7489-appendix-c.xsd"
RECEIVER = "mx.lightmail.test"
SETTINGS = ReportSettings(enabled=True, org_name="LightMail Test",
                          sender="dmarc-noreply@lightmail.test", receiver=RECEIVER)
FILENAME = re.compile(r"mx\.lightmail\.test!(?P<domain>[a-z0-9.-]+)!(?P<begin>\d+)!"
                      r"(?P<end>\d+)!(?P<unique>[A-Za-z0-9]+)\.xml\.gz")


VALIDATOR = """
import sys, xmlschema
text = open(sys.argv[1]).read()
schema = xmlschema.XMLSchema(text.replace(
    'targetNamespace="http://dmarc.org/dmarc-xml/0.1"', ""))
errors = [str(error) for error in schema.iter_errors(sys.stdin.buffer.read())]
print("\\n".join(errors))
sys.exit(1 if errors else 0)
"""


def validate(document: bytes) -> None:
    """``document`` against Appendix C's schema, its targetNamespace taken out (see
    the fixture's comment: as printed, no validator loads it).  In a fresh
    interpreter: once twisted.internet.testing is imported (other test modules do),
    xmlschema can no longer build a schema in the process."""
    assert 'targetNamespace="http://dmarc.org/dmarc-xml/0.1"' in XSD.read_text()
    done = subprocess.run([sys.executable, "-c", VALIDATOR, str(XSD)], input=document,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")

ZONES = {
    "_dmarc.example.com.": {"TXT": [
        "v=DMARC1; p=reject; rua=mailto:dmarc@example.com,"
        "mailto:agg@reports.example.net!50k, mailto:nope@elsewhere.example.org,"
        "https://reports.example.com/dmarc"]},
    # reports.example.net agrees to receive example.com's reports (§7.1)...
    "example.com._report._dmarc.reports.example.net.": {"TXT": ["v=DMARC1"]},
    # ...elsewhere.example.org says nothing of them
    "_dmarc.small.test.": {"TXT": ["v=DMARC1; p=none; rua=mailto:tiny@small.test!1k"]},
    "_dmarc.quiet.test.": {"TXT": ["v=DMARC1; p=reject"]},
    "other.test._report._dmarc.reports.example.net.": {"TXT": ["v=spf1 -all"]},
}


@pytest.fixture
def dns_world() -> Iterator[DNSServer]:
    with DNSServer(ZONES, ttl=300) as server:
        server.fail("broken.test._report._dmarc.reports.failing.test.")
        yield server
    assert not server.errors


def reports_for(stack: StorageStack, resolver: Any, kicks: list[int] | None = None,
                settings: ReportSettings = SETTINGS) -> DMARCReports:
    return DMARCReports(stack.db, stack.blobs, stack.port, stack.directory, resolver,
                        SUFFIXES, settings,
                        kick=lambda: kicks.append(1) if kicks is not None else None)


async def queued_messages(stack: StorageStack) -> dict[str, tuple[dict[str, Any], bytes]]:
    """Recipient address -> (its queue row, the message)."""
    found = {}
    for row in await stack.queue.list_recipients():
        message = await stack.queue.message(row["queue_id"])
        assert message is not None
        found[row["recipient"]] = (row, await stack.blobs.read(message["blob_id"]))
    return found


def report_of(message: bytes) -> tuple[email.message.EmailMessage, str, bytes]:
    """The message, its attachment's file name, and the XML document in it."""
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    attachments = [part for part in parsed.iter_attachments()]
    assert len(attachments) == 1
    attachment = attachments[0]
    assert attachment.get_content_type() == "application/gzip"
    filename = attachment.get_filename()
    assert filename is not None
    return parsed, filename, gzip.decompress(attachment.get_content())


def records_of(document: bytes) -> list[dict[str, Any]]:
    """The report's <record>s read back with the standard library."""
    root = ET.fromstring(document)
    assert root.tag == "feedback"
    rows = []
    for record in root.iter("record"):
        rows.append({
            "source_ip": record.findtext("row/source_ip"),
            "count": int(record.findtext("row/count") or 0),
            "disposition": record.findtext("row/policy_evaluated/disposition"),
            "dkim": record.findtext("row/policy_evaluated/dkim"),
            "spf": record.findtext("row/policy_evaluated/spf"),
            "reasons": [(r.findtext("type"), r.findtext("comment"))
                        for r in record.iter("reason")],
            "envelope_to": record.findtext("identifiers/envelope_to"),
            "envelope_from": record.findtext("identifiers/envelope_from"),
            "header_from": record.findtext("identifiers/header_from"),
            "auth_dkim": [(d.findtext("domain"), d.findtext("selector"), d.findtext("result"))
                          for d in record.iter("dkim") if d.find("domain") is not None],
            "auth_spf": [(p.findtext("domain"), p.findtext("scope"), p.findtext("result"))
                         for p in record.findall("auth_results/spf")]})
    return sorted(rows, key=lambda row: (row["source_ip"], row["disposition"]))


async def judge(checker: DMARCChecker, reports: DMARCReports, from_domain: str,
                spf: tuple[str, str], dkim: Any, ip: str, envelope_from: str,
                times: int = 1) -> DMARCResult:
    result = await checker.check(from_domain, spf, dkim)
    for _ in range(times):
        await reports.record(result, ip, envelope_from, "rcpt.test")
    return result


@pytest_twisted.ensureDeferred
async def test_recorded_results_reported_through_the_queue(
        sqlite_stack: StorageStack, dns_world: DNSServer) -> None:
    stack = sqlite_stack
    await stack.directory.add_domain("example.com")        # dmarc@example.com: local
    resolver = Resolver(f"127.0.0.1:{dns_world.port}", timeout=1.5)
    kicks: list[int] = []
    reports = reports_for(stack, resolver, kicks)
    checker = DMARCChecker(resolver, SUFFIXES, DMARCConfig())
    capped = DMARCChecker(resolver, SUFFIXES, DMARCConfig(enforce="quarantine"))
    # Three messages that pass (DKIM and SPF aligned), from one address...
    passed = await judge(checker, reports, "example.com", ("example.com", "pass"),
                         [("example.com", "pass", "s2026")], "192.0.2.1",
                         "bounce@example.com", times=3)
    assert passed.result == "pass"
    # ...two that fail, rejected, from an IPv6 address (the null sender: SPF's
    # identity is the HELO domain, scope helo)...
    failed = await judge(checker, reports, "mail.example.com", ("helo.evil.test", "pass"),
                         [("evil.test", "pass", "x"), ("example.com", "fail", "s2026")],
                         "2001:db8::25", "", times=2)
    assert (failed.result, failed.disposition) == ("fail", "reject")
    # ...and one that local policy only quarantined.
    await judge(capped, reports, "example.com", ("evil.test", "softfail"), [],
                "192.0.2.66", "x@evil.test")
    # Not recorded: no policy, no rua=, or no verdict.
    for domain in ("nowhere.test", "quiet.test"):
        await judge(checker, reports, domain, (domain, "pass"), [], "192.0.2.9", "")
    assert await reports.store.count() == 6

    run = await reports.send_reports()
    assert isinstance(run, ReportRun) and len(run.reports) == 1
    sent = run.reports[0]
    assert (sent.policy_domain, sent.messages) == ("example.com", 6)
    assert sorted(address for address, _ in sent.queued) == [
        "agg@reports.example.net", "dmarc@example.com"]
    skipped = dict(sent.skipped)
    assert "§7.1" in skipped["mailto:nope@elsewhere.example.org"]
    assert "only mailto" in skipped["https://reports.example.com/dmarc"]
    assert kicks == [1]
    # the rows are forgotten once reported; the next run has nothing
    assert await reports.store.count() == 0
    assert (await reports.send_reports()).reports == []

    queued = await queued_messages(stack)
    assert sorted(queued) == ["agg@reports.example.net", "dmarc@example.com"]
    assert queued["dmarc@example.com"][0]["transport"] == "local"
    assert queued["agg@reports.example.net"][0]["transport"] == "smtp"
    assert queued["dmarc@example.com"][0]["mail_from"] == SETTINGS.sender
    message, filename, document = report_of(queued["agg@reports.example.net"][1])
    # §7.2.1.1: the file name, the Subject
    match = FILENAME.fullmatch(filename)
    assert match is not None and match["domain"] == "example.com"
    assert int(match["begin"]) <= int(match["end"])
    assert message["Subject"] == (f"Report Domain: example.com Submitter: {RECEIVER} "
                                  f"Report-ID: <{sent.report_id}>")
    assert message["To"] == "agg@reports.example.net"
    assert message["From"] == SETTINGS.sender
    assert message["Auto-Submitted"] == "auto-generated"
    assert document == report_of(queued["dmarc@example.com"][1])[2]

    # The schema of Appendix C accepts it...
    validate(document)
    # ...and the standard library reads back what was recorded.
    root = ET.fromstring(document)
    assert root.findtext("version") == "1.0"
    assert root.findtext("report_metadata/org_name") == "LightMail Test"
    assert root.findtext("report_metadata/email") == SETTINGS.sender
    assert root.findtext("report_metadata/report_id") == sent.report_id
    assert root.findtext("report_metadata/date_range/begin") == match["begin"]
    assert root.findtext("report_metadata/date_range/end") == match["end"]
    policy = {child.tag: child.text for child in root.find("policy_published") or []}
    assert policy == {"domain": "example.com", "adkim": "r", "aspf": "r", "p": "reject",
                      "sp": "reject", "pct": "100", "fo": "0"}
    assert records_of(document) == [
        {"source_ip": "192.0.2.1", "count": 3, "disposition": "none", "dkim": "pass",
         "spf": "pass", "reasons": [], "envelope_to": "rcpt.test",
         "envelope_from": "example.com", "header_from": "example.com",
         "auth_dkim": [("example.com", "s2026", "pass")],
         "auth_spf": [("example.com", "mfrom", "pass")]},
        {"source_ip": "192.0.2.66", "count": 1, "disposition": "quarantine",
         "dkim": "fail", "spf": "fail",
         "reasons": [("local_policy", "[dmarc] enforce: quarantine")],
         "envelope_to": "rcpt.test", "envelope_from": "evil.test",
         "header_from": "example.com", "auth_dkim": [],
         "auth_spf": [("evil.test", "mfrom", "softfail")]},
        {"source_ip": "2001:0db8:0000:0000:0000:0000:0000:0025", "count": 2,
         "disposition": "reject", "dkim": "fail", "spf": "fail", "reasons": [],
         "envelope_to": "rcpt.test", "envelope_from": "", "header_from": "mail.example.com",
         "auth_dkim": [("evil.test", "x", "pass"), ("example.com", "s2026", "fail")],
         "auth_spf": [("helo.evil.test", "helo", "pass")]},
    ]


@pytest_twisted.ensureDeferred
async def test_a_report_over_a_destinations_size_limit(
        sqlite_stack: StorageStack, dns_world: DNSServer) -> None:
    """§7.2.2: not sent there; an error report saying so is."""
    resolver = Resolver(f"127.0.0.1:{dns_world.port}", timeout=1.5)
    reports = reports_for(sqlite_stack, resolver)
    checker = DMARCChecker(resolver, SUFFIXES, DMARCConfig())
    for n in range(40):         # forty sources: a report well over 1 KiB
        await judge(checker, reports, "small.test", ("small.test", "pass"), [],
                    f"198.51.100.{n}", "a@small.test")
    run = await reports.send_reports()
    sent = run.reports[0]
    assert [address for address, _ in sent.queued] == ["tiny@small.test"]
    assert "over the limit of 1024" in sent.skipped[0][1]
    queued = await queued_messages(sqlite_stack)
    notice = email.message_from_bytes(queued["tiny@small.test"][1],
                                      policy=email.policy.default)
    assert notice["Subject"].startswith("Error Report Domain: small.test Submitter: ")
    assert list(notice.iter_attachments()) == []
    text = notice.get_content()
    for field in ("Report-Date:", "Report-Domain: small.test",
                  f"Report-ID: {sent.report_id}", "Report-Size: ", f"Submitter: {RECEIVER}",
                  "Submitting-URI: mailto:tiny@small.test"):
        assert field in text
    assert len(queued["tiny@small.test"][1]) < 1024


@pytest_twisted.ensureDeferred
async def test_external_destinations(dns_world: DNSServer) -> None:
    resolver = Resolver(f"127.0.0.1:{dns_world.port}", timeout=1.5)

    async def allowed(policy_domain: str, destination: str) -> bool:
        verdict = await check_destination(resolver, SUFFIXES, policy_domain, destination)
        return verdict.allowed

    dns_world.queries.clear()
    # the same organizational domain: no question asked
    assert await allowed("mail.example.com", "reports.example.com")
    assert dns_world.queries == []
    # another organization that agrees...
    assert await allowed("example.com", "reports.example.net")
    assert ("example.com._report._dmarc.reports.example.net.", "TXT") in dns_world.queries
    # ...one that says nothing (NXDOMAIN), one whose record is something else, and
    # one whose DNS fails: none of them gets the reports
    assert not await allowed("example.com", "elsewhere.example.org")
    assert not await allowed("other.test", "reports.example.net")
    assert not await allowed("broken.test", "reports.failing.test")


@pytest_twisted.ensureDeferred
async def test_nothing_is_recorded_when_reports_are_off(sqlite_stack: StorageStack) -> None:
    zone = {"_dmarc.example.com": [{"TXT": "v=DMARC1; p=none; rua=mailto:r@example.com"}]}
    checker = DMARCChecker(ZoneResolver(zone), SUFFIXES, DMARCConfig())
    result = await checker.check("example.com", ("example.com", "pass"))
    reports = reports_for(sqlite_stack, ZoneResolver(zone),
                          settings=ReportSettings(enabled=False))
    await reports.record(result, "192.0.2.1", "a@example.com")
    assert await reports.store.count() == 0
    reports.use(SETTINGS)
    await reports.record(result, "192.0.2.1", "a@example.com")
    assert await reports.store.count() == 1


@pytest_twisted.ensureDeferred
async def test_results_kept_and_claimed_on_every_backend(stack: StorageStack) -> None:
    """The SQL side on SQLite, PostgreSQL and MariaDB: rows kept, claimed by one run
    only (two nodes on one database), grouped, forgotten; a stale claim taken again."""
    zone = {"_dmarc.example.com": [{"TXT": "v=DMARC1; p=quarantine; "
                                           "rua=mailto:dmarc@example.com"}],
            "_dmarc.example.org": [{"TXT": "v=DMARC1; p=none; rua=mailto:d@example.org"}]}
    resolver = ZoneResolver(zone)
    await stack.directory.add_domain("example.com")
    await stack.directory.add_domain("example.org")
    reports = reports_for(stack, resolver)
    checker = DMARCChecker(resolver, SUFFIXES, DMARCConfig(), random=lambda: 0.0)
    long_comment = "x" * 3000          # past MariaDB's max_sort_length: grouped right
    for n in range(5):
        result = await checker.check("example.com", ("example.com", "fail"),
                                     [(f"d{n % 2}.example.net", "pass", long_comment)])
        await reports.record(result, "192.0.2.7", "b@example.net", "example.com")
    result = await checker.check("example.org", ("example.org", "pass"))
    await reports.record(result, "192.0.2.8", "b@example.org")
    store = ResultStore(stack.db)
    now = int(1e12) * 10                # far in the future: every row has arrived
    assert await store.claim("run-a", now) == ["example.com", "example.org"]
    assert await store.claim("run-b", now) == []         # another node finds none
    rows = await store.rows_of("run-a", "example.com")
    assert rows.messages == 5 and len(rows.rows) == 2
    assert sorted(row.count for row in rows.rows) == [2, 3]
    assert {row.dkim_results[0][1] for row in rows.rows} == {long_comment}
    assert rows.published["p"] == "quarantine"
    # run-a died: an hour later its claim is taken again
    assert await store.claim("run-c", now + STALE_CLAIM_MS + 1) == [
        "example.com", "example.org"]
    assert await store.forget("run-a", "example.com") == 0
    assert await store.forget("run-c", "example.com") == 5
    run = await reports.send_reports()
    assert [r.policy_domain for r in run.reports] == []          # claimed by run-c
    assert await store.forget("run-c", "example.org") == 1
    assert await store.count() == 0

    def table_rows(conn: Any) -> int:
        return int(conn.execute(sa.select(sa.func.count()).select_from(
            s.dmarc_results)).scalar())
    assert await stack.db.read(table_rows) == 0


def test_the_report_timer() -> None:
    class Reports:
        def __init__(self) -> None:
            self.settings = ReportSettings(enabled=True, interval=3600.0)
            self.runs = 0

        def send_reports(self) -> defer.Deferred[ReportRun]:
            self.runs += 1
            return defer.succeed(ReportRun())

    clock = task.Clock()
    clock.advance(7200 + 1000)
    reports = Reports()
    ready: defer.Deferred[None] = defer.Deferred()
    service = ReportService(reports, ready, clock=clock)  # type: ignore[arg-type]
    service.startService()
    clock.advance(5000)
    assert reports.runs == 0                 # storage is not ready yet
    ready.callback(None)
    # the next multiple of the interval (daily: midnight UTC)
    clock.advance(3600 - (clock.seconds() % 3600) - 1)
    assert reports.runs == 0
    clock.advance(1)
    assert reports.runs == 1
    clock.advance(3600)
    assert reports.runs == 2
    reports.settings = ReportSettings(enabled=False, interval=3600.0)
    clock.advance(3600)
    assert reports.runs == 2                 # off: the timer only waits
    service.stopService()
    assert clock.getDelayedCalls() == []


LIGHTMAIL = [sys.executable, "-m", "lightmail.admin.cli"]


@pytest_twisted.ensureDeferred
async def test_the_send_reports_command(tmp_path: Path, dns_world: DNSServer) -> None:
    state = tmp_path / "state"
    config = tmp_path / "lightmail.conf"
    text = (f"[server]\nstate_dir = {state}\nhostname = {RECEIVER}\n"
            f"[outbound]\ndns_servers = 127.0.0.1:{dns_world.port}\n"
            "[dmarc]\nreports = yes\nreport_org_name = Test Org\n")
    config.write_text(text)
    stack = StorageStack(f"sqlite:///{state / 'lightmail.db'}", state)
    try:
        resolver = Resolver(f"127.0.0.1:{dns_world.port}", timeout=1.5)
        reports = reports_for(stack, resolver)
        checker = DMARCChecker(resolver, SUFFIXES, DMARCConfig())
        await judge(checker, reports, "example.com", ("example.com", "pass"), [],
                    "192.0.2.1", "a@example.com", times=2)
    finally:
        stack.close()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LIGHTMAIL, "--config", str(config), *args],
                              capture_output=True, text=True, timeout=120)
    done = await defer.maybeDeferred(run, "dmarc", "send-reports")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "1 report"
    assert lines[0].startswith("example.com\t") and "\t2 messages\t" in lines[0]
    assert "<agg@reports.example.net> as " in lines[0]
    assert any("not sent to mailto:nope@elsewhere.example.org" in line for line in lines)
    stack = StorageStack(f"sqlite:///{state / 'lightmail.db'}", state)
    try:
        queued = await queued_messages(stack)
        assert sorted(queued) == ["agg@reports.example.net", "dmarc@example.com"]
        _, _, document = report_of(queued["dmarc@example.com"][1])
        validate(document)
        assert ET.fromstring(document).findtext("report_metadata/org_name") == "Test Org"
    finally:
        stack.close()
    assert run("dmarc", "send-reports").stdout.splitlines() == ["0 reports"]
    config.write_text(text.replace("reports = yes", "reports = no"))
    off = run("dmarc", "send-reports")
    assert off.returncode == 1 and "[dmarc] reports = no" in off.stderr


def test_every_kind_of_row_is_valid_against_the_schema() -> None:
    """Every override reason, every DKIM and SPF word, addresses of both families
    (IPv4-mapped IPv6 as IPv4), no envelope_to, no DKIM signature."""
    from lightmail.policy.dmarc.check import DKIM_RESULTS, OVERRIDE_TYPES, SPF_RESULTS
    from lightmail.policy.dmarc.store import GroupedRow
    from lightmail.policy.dmarc.xmlreport import AggregateReport, report_xml
    rows = [GroupedRow(
        source_ip=ip, count=n + 1, disposition=("none", "quarantine", "reject")[n % 3],
        dkim="pass" if n % 2 else "fail", spf="fail",
        reasons=tuple((kind, f"comment {kind}" if n % 2 else "") for kind in OVERRIDE_TYPES),
        envelope_to="" if n % 2 else "rcpt.example", envelope_from="",
        header_from="example.com",
        dkim_results=tuple((f"d{k}.example", "" if k % 2 else "sel", word)
                           for k, word in enumerate(DKIM_RESULTS)) if n else (),
        spf_domain="helo.example", spf_scope=("helo", "mfrom")[n % 2],
        spf_result=SPF_RESULTS[n % len(SPF_RESULTS)])
        for n, ip in enumerate(["192.0.2.1", "::ffff:192.0.2.2", "2001:db8::1",
                                "fe80::1:2:3:4", "198.51.100.255"])]
    document = report_xml(AggregateReport(
        org_name="Org & <Co>", email="r@example.net", report_id="id.1@mx", begin=1, end=2,
        policy_domain="example.com", published={"p": "reject"}, rows=rows))
    validate(document)
    root = ET.fromstring(document)
    assert [r.findtext("row/source_ip") for r in root.iter("record")] == [
        "192.0.2.1", "192.0.2.2", "2001:0db8:0000:0000:0000:0000:0000:0001",
        "fe80:0000:0000:0000:0001:0002:0003:0004", "198.51.100.255"]
    assert root.findtext("report_metadata/org_name") == "Org & <Co>"
    assert root.findtext("policy_published/sp") == "reject"


def test_the_schema_check_refuses_what_is_not_a_report() -> None:
    """The validation the report tests rely on does refuse a bad document."""
    with pytest.raises(AssertionError):
        validate(b"<feedback><not_a_report/></feedback>")
