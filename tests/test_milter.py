"""The milter client (lightmail/policy/milter): its wire format, the chain's one
rewrite with a milter's edits, a scripted milter (tests/milterpeer.py) for each
answer and each way to fail, and OpenDKIM (Debian's opendkim) in milter mode as the
real peer, signing and verifying."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
import pytest_twisted
from dnsserver import DNSServer
from inprocess import in_thread, start
from milterpeer import CLOSE, HANG, FakeMilter, LibMilter, free_socket_dir, negotiation, packet
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from lightmail.config import parse_config
from lightmail.policy.dkim import dns_record, generate_key, signing_key
from lightmail.policy.inbound.edits import apply_edits
from lightmail.policy.inbound.findings import HeaderEdit
from lightmail.policy.milter import wire
from lightmail.policy.milter.check import (
    RECIPIENT_ARGUMENTS,
    SENDER_ARGUMENTS,
    envelope_arguments,
)
from lightmail.policy.milter.client import MilterClient, MilterProtocol, MilterUnavailable
from lightmail.policy.milter.wire import ProtocolError
from lightmail.smtp.codes import Reply

BODY = (b"From: Ann <ann@sender.example>\r\nTo: bob@example.test\r\n"
        b"Subject: milter\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        b"Message-ID: <m1@sender.example>\r\nX-Remove: me\r\n\r\nHello.\r\n")


# --- the wire format ---------------------------------------------------------------------

def test_negotiation_by_version_and_macro_lists() -> None:
    symlist = struct.pack("!I", wire.STAGE_MAIL) + b"{mail_addr} i\0"
    current = wire.read_negotiation(b"O", struct.pack("!III", 6, 0x1FF, 0x80 | 0x800)
                                    + symlist)
    assert current.version == 6 and current.wants(wire.P_NR_HDR)
    assert not current.wants(wire.P_RCPT_REJ)          # not offered: left out
    assert current.macros == {wire.STAGE_MAIL: ("{mail_addr}", "i")}
    old = wire.read_negotiation(b"O", struct.pack("!III", 2, 0x3, 0xFFFFF))
    assert old.version == 2 and old.protocol == 0x7F    # what version 2 knew
    with pytest.raises(ProtocolError, match="too old"):
        wire.read_negotiation(b"O", struct.pack("!III", 1, 0, 0))
    with pytest.raises(ProtocolError):
        wire.read_negotiation(b"O", struct.pack("!III", 6, 0x400, 0))
    with pytest.raises(ProtocolError):
        wire.read_negotiation(b"c", b"")


def test_reply_codes_are_checked_and_sanitised() -> None:
    assert wire.smtp_reply(b"554 5.7.0 Bad\x01thing, 100%% sure\0") == Reply(
        554, "5.7.0", "Bad?thing, 100% sure")
    assert wire.smtp_reply(b"451 5.7.1 wrong class\0") == Reply(451, "4.7.1",
                                                                  "wrong class")
    assert wire.smtp_reply(b"550-5.7.1 first\r\n550 5.7.1 second\0") == Reply(
        550, "5.7.1", "first\nsecond")
    for bad in (b"250 2.0.0 fine\0", b"garbage\0", b"\0", b"550-x\r\n451 y\0"):
        with pytest.raises(ProtocolError):
            wire.smtp_reply(bad)


def test_packets_and_edits_that_break_the_protocol() -> None:
    reader = wire.PacketReader()
    assert list(reader.feed(packet(b"c") + packet(b"h", b"X\0y\0")[:5])) == [(b"c", b"")]
    for garbage in (b"\0\0\0\0", b"\xff\xff\xff\xff"):
        with pytest.raises(ProtocolError):
            list(wire.PacketReader().feed(garbage))
    for command, data in ((b"h", b"Bad Name\0v\0"), (b"h", b"X\0"), (b"i", b"\0\0"),
                          (b"+", b"<a@b> <c@d>\0"), (b"Z", b""), (b"h", b"X: y\0v\0")):
        with pytest.raises(ProtocolError):
            wire.read_edit(command, data)
    assert wire.read_edit(b"m", struct.pack("!I", 2) + b"Subject\0\0") == wire.Edit(
        b"m", "Subject", b"", 2)


def test_edits_are_made_in_order_on_the_fields_as_seen() -> None:
    message = (b"Received: by us\r\nSubject: one\r\n\tfolded\r\nX-A: 1\r\nX-A: 2\r\n"
               b"\r\nbody\r\n")
    edits = [HeaderEdit("insert", "X-Top", b" first", 0),
             HeaderEdit("change", "x-a", b" two", 2),
             HeaderEdit("change", "Subject", None, 1),
             HeaderEdit("append", "X-Last", b" last"),
             HeaderEdit("change", "X-New", b" made", 1),
             HeaderEdit("insert", "X-Far", b" end", 99)]
    assert apply_edits(message, edits, b"new\r\n") == (
        b"X-Top: first\r\nReceived: by us\r\nX-A: 1\r\nX-A: two\r\nX-Last: last\r\n"
        b"X-New: made\r\nX-Far: end\r\n\r\nnew\r\n")
    assert apply_edits(message, []) is message


def test_the_client_waits_with_a_clock_and_progress_restarts_it() -> None:
    """The client over an in-memory transport: answers a milter said it would not
    give are not awaited, PROGRESS restarts the clock, silence is a failure."""
    clock = task.Clock()
    protocol = MilterProtocol(clock)
    transport = StringTransport()
    protocol.makeConnection(transport)
    client = MilterClient(protocol, command_timeout=5, eom_timeout=10)
    client.negotiated = wire.Negotiated(6, wire.ACT_ADDHDRS, wire.P_NR_HDR | wire.P_NOHELO)
    assert succeeded(client.command(wire.HELO, b"x\0")) == wire.CONTINUED  # not sent
    assert succeeded(client.command(wire.HEADER, wire.cstrings("X", "y"),
                                    [("i", "Q1")])) == wire.CONTINUED      # no answer
    assert transport.value() == (packet(b"D", b"L" + b"i\0Q1\0")
                                 + packet(b"L", b"X\0y\0"))
    eom = Deferred.fromCoroutine(client.end_of_message())
    clock.advance(9)
    protocol.dataReceived(packet(b"p"))
    clock.advance(9)
    protocol.dataReceived(packet(b"h", b"X-A\0v\0") + packet(b"a"))
    assert succeeded(eom) == (wire.Verdict("accept"), [wire.Edit(b"h", "X-A", b"v")])
    mail = Deferred.fromCoroutine(client.command(wire.MAIL, b"<a@b>\0"))
    clock.advance(5.1)
    failure = mail.result
    mail.addErrback(lambda _: None)
    assert failure.check(MilterUnavailable) and "no answer in 5s" in str(failure.value)
    assert transport.disconnecting
    # An edit it did not negotiate is a protocol error.
    protocol2 = MilterProtocol(clock)
    protocol2.makeConnection(StringTransport())
    other = MilterClient(protocol2, 5, 5)
    other.negotiated = wire.Negotiated(6, wire.ACT_ADDHDRS, 0)
    eom = Deferred.fromCoroutine(other.end_of_message())
    protocol2.dataReceived(packet(b"b", b"new body"))
    assert eom.result.check(ProtocolError)
    eom.addErrback(lambda _: None)


def succeeded(d: Any) -> Any:
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results and not isinstance(results[0], Failure), results
    return results[0]


def test_milter_sections_in_the_config() -> None:
    config = parse_config(
        "[milter:dkim]\nsocket = inet:11332@127.0.0.1\ndefault_action = accept\n"
        "[milter:spam]\nsocket = unix:spam.sock\neom_timeout = 1m\n", "/etc/lm/lm.conf")
    assert [(m.name, m.socket, m.default_action) for m in config.milters] == [
        ("dkim", "inet:127.0.0.1:11332", "accept"),
        ("spam", "unix:/etc/lm/spam.sock", "tempfail")]
    assert config.milters[1].eom_timeout == 60
    for bad in ("[milter:x]\ncommand_timeout = 1s\n", "[milter:x]\nsocket = tcp:1\n",
                "[milter:x]\nsocket = inet:host:99999\n"):
        with pytest.raises(Exception, match="milter"):
            parse_config(bad)


# --- a scripted milter, on a running LightMail ----------------------------------------------

def lightmail(tmp_path: Path, dns: DNSServer, *milters: tuple[str, str],
              options: str = "", extra: str = "") -> Any:
    """A LightMail whose listener ``milt`` runs only the milter check."""
    options = options or "command_timeout = 2s\neom_timeout = 2s\n"
    sections = "".join(f"[milter:{name}]\nsocket = {socket}\n{options}"
                       for name, socket in milters)
    return start(tmp_path, extra=(
        f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n{extra}"
        "[listener:milt]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        "checks = milter\n" + sections))


def send(port: int, message: bytes = BODY, rcpts: tuple[str, ...] = ("bob@example.test",),
         sender: str = "ann@sender.example", times: int = 1) -> Any:
    """What the server said: {} (all taken), a dict of refused recipients, or the
    (code, text) that refused the transaction; each of ``times`` in one session."""
    def go() -> Any:
        out: list[Any] = []
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example",
                          timeout=30) as smtp:
            for _ in range(times):
                try:
                    refused = smtp.sendmail(sender, list(rcpts), message)
                    out.append({rcpt: (code, text.decode())
                                for rcpt, (code, text) in refused.items()})
                except smtplib.SMTPResponseException as exc:
                    out.append((exc.smtp_code, exc.smtp_error.decode()))
                    smtp.rset()
                except smtplib.SMTPRecipientsRefused as exc:
                    out.append({rcpt: (code, text.decode())
                                for rcpt, (code, text) in exc.recipients.items()})
                    smtp.rset()
        return out if times > 1 else out[0]
    return in_thread(go)


@pytest.fixture
def milters() -> Iterator[list[FakeMilter]]:
    made: list[FakeMilter] = []
    try:
        yield made
    finally:
        for milter in made:
            milter.close()


def fake(milters: list[FakeMilter], *args: Any, **kwargs: Any) -> FakeMilter:
    milter = FakeMilter(*args, **kwargs)
    milters.append(milter)
    return milter


def macros(milter: FakeMilter) -> dict[str, str]:
    found = {}
    for command, data in milter.received:
        if command == b"D":
            parts = data[1:-1].split(b"\0")
            found.update({parts[i].decode(): parts[i + 1].decode()
                          for i in range(0, len(parts) - 1, 2)})
    return found


async def until(predicate: Any, seconds: float = 10) -> None:
    from twisted.internet import reactor, task
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "never happened"
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_every_step_reaches_the_milter_with_its_macros(tmp_path: Path, dns: DNSServer,
                                                             milters: list[FakeMilter]
                                                             ) -> None:
    milter = fake(milters)
    server = await lightmail(tmp_path, dns, ("fake", milter.socket))
    try:
        # Two messages in one session, the second refused at RCPT by the directory
        # (the milter is not told), then a third: one connection, ABORT between.
        assert await send(server.ports["milt"], times=2) == [{}, {}]
        await until(lambda: milter.commands().endswith(b"Q"))
        assert milter.connections == 1
        # Q: the session ended.  The second MAIL needs no ABORT: EOB closed the first.
        assert milter.commands() == b"OCHMRTLLLLLLLNBE" + b"MRTLLLLLLLNBE" + b"Q"
        connect = dict(milter.received)[b"C"]
        assert connect.startswith(b"[127.0.0.1]\x004") and connect.endswith(b"127.0.0.1\0")
        mail = next(data for command, data in milter.received if command == b"M")
        assert mail.split(b"\0")[0] == b"<ann@sender.example>"
        assert mail.split(b"\0")[1].startswith(b"SIZE=")
        headers = [data for command, data in milter.received if command == b"L"]
        assert headers[1] == b"From\0Ann <ann@sender.example>\0"     # no leading space
        assert headers[0].startswith(b"Received\0from client.example")
        assert b"\n\tby mx.example.test" in headers[0]                # folds as bare LF
        body = next(data for command, data in milter.received if command == b"B")
        assert body == b"Hello.\r\n"
        seen = macros(milter)
        assert seen["j"] == "mx.example.test" and seen["{daemon_name}"] == "mx"
        assert seen["{client_addr}"] == "127.0.0.1" and int(seen["{client_port}"]) > 0
        assert seen["{mail_addr}"] == "ann@sender.example"
        assert seen["{rcpt_addr}"] == "bob@example.test"
        assert len(seen["i"]) > 5                                      # the queue id
        milter.received.clear()
        result = await send(server.ports["milt"], rcpts=("nobody@example.test",))
        assert result["nobody@example.test"][0] == 550
        await send(server.ports["milt"])
        await until(lambda: milter.commands().count(b"Q") == 2)
        # The refused transaction's MAIL is ABORTed before the next one; RCPT for
        # the unknown recipient is never sent.
        assert milter.commands() == b"OCHMQ" + b"OCHMRTLLLLLLLNBEQ"
        assert len(await server.delivered("bob@example.test", 3)) == 3
    finally:
        await server.stop()


def refuse_with(command: bytes, answer: bytes, data: bytes = b"") -> Any:
    return {command: lambda _: [packet(answer, data)]}


@pytest_twisted.ensureDeferred
async def test_reject_tempfail_and_reply_codes(tmp_path: Path, dns: DNSServer,
                                              milters: list[FakeMilter]) -> None:
    at_rcpt = fake(milters, {b"R": lambda data: [packet(
        b"r" if b"postmaster" in data else b"c")]})
    at_mail = fake(milters, refuse_with(b"M", b"t"))
    at_eob = fake(milters, refuse_with(b"E", b"y", b"554 5.7.0 No thanks\r\n\0"))
    at_connect = fake(milters, refuse_with(b"C", b"r"))
    for milter, expected in ((at_rcpt, {"postmaster@example.test": (550, "5.7.1 Command "
                                                                     "rejected")}),
                             (at_mail, (451, "4.7.1 Service unavailable - try again "
                                             "later")),
                             (at_eob, (554, "5.7.0 No thanks")),
                             (at_connect, (550, "5.7.1 Command rejected"))):
        server = await lightmail(tmp_path / milter.dir.name, dns, ("m", milter.socket))
        try:
            result = await send(server.ports["milt"],
                                rcpts=("bob@example.test", "postmaster@example.test"),
                                times=2)
            assert result == [expected, expected], milter.commands()
        finally:
            await server.stop()
    # Refused at connect: for the session, MAIL never sent.
    assert b"M" not in at_connect.commands()


def eob_edits(*edits: bytes) -> Any:
    return {b"E": lambda _: [*edits, packet(b"c")]}


@pytest_twisted.ensureDeferred
async def test_header_edits_and_a_new_body_reach_the_stored_message(
        tmp_path: Path, dns: DNSServer, milters: list[FakeMilter]) -> None:
    milter = fake(milters, eob_edits(
        packet(b"h", b"X-Filtered\0yes,\n folded\0"),
        packet(b"i", struct.pack("!I", 0) + b"X-Top\0on top\0"),
        packet(b"m", struct.pack("!I", 1) + b"Subject\0changed\0"),
        packet(b"m", struct.pack("!I", 1) + b"X-Remove\0\0"),
        packet(b"h", b"X-Injected\0a\r\nBcc: evil@example\0"),
        packet(b"h", b"Authentication-Results\0mx.example.test; dkim=pass\0"),
        packet(b"p"),
        packet(b"b", b"New body\nline two\n"), packet(b"b", b"three\r\n")))
    server = await lightmail(tmp_path, dns, ("fake", milter.socket))
    try:
        assert await send(server.ports["milt"]) == {}
        [message] = await server.delivered("bob@example.test", 1)
        head, body = message.split(b"\r\n\r\n", 1)
        assert body == b"New body\r\nline two\r\nthree\r\n"
        # Our Received field is no longer first: Authentication-Results goes on top.
        assert head.startswith(b"Authentication-Results: mx.example.test;\r\n\tnone\r\n"
                               b"X-Top: on top\r\nReceived: ")
        assert b"\r\nSubject: changed\r\n" in head and b"milter\r\n" not in head
        assert b"X-Remove" not in head
        assert head.endswith(b"X-Filtered: yes,\r\n folded\r\n"
                             b"X-Injected: a\r\n\tBcc: evil@example")
        assert b"\r\nBcc:" not in head                   # a fold, not a field of its own
        # Ours only: one a milter adds with our authserv-id is removed too.
        assert head.count(b"Authentication-Results: mx.example.test;") == 1
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_discard_and_quarantine(tmp_path: Path, dns: DNSServer,
                                      milters: list[FakeMilter]) -> None:
    discarding = fake(milters, {b"E": lambda _: [packet(b"d")]})
    quarantining = fake(milters, eob_edits(packet(b"q", b"looks like spam\0")))
    server = await lightmail(tmp_path, dns, ("discarding", discarding.socket))
    try:
        assert await send(server.ports["milt"]) == {}         # 250: taken ...
        assert await server.inbox("bob@example.test") == []   # ... and dropped
        assert await server.queued() == []
    finally:
        await server.stop()
    server = await lightmail(tmp_path / "q", dns, ("quarantining", quarantining.socket))
    try:
        # (Junk is made at a user's first IMAP login; without it, INBOX.)
        bob = await server.parts.directory.get_user("bob@example.test")
        await server.parts.mailstore.create_mailbox(bob.id, "Junk")
        assert await send(server.ports["milt"]) == {}
        [junk] = await server.delivered("bob@example.test", 1, mailbox="Junk")
        assert b"Hello." in junk
        assert await server.inbox("bob@example.test") == []
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_envelope_changes_go_through_recipient_rules(
        tmp_path: Path, dns: DNSServer, milters: list[FakeMilter]) -> None:
    milter = fake(milters, eob_edits(
        packet(b"-", b"<bob@example.test>\0"), packet(b"+", b"<carol@example.test>\0"),
        packet(b"+", b"<someone@remote.example>\0"),       # no relay from an MX
        packet(b"e", b"<changed@sender.example>\0")))
    server = await lightmail(tmp_path, dns, ("fake", milter.socket))
    try:
        await server.parts.directory.add_user("carol@example.test", None)
        assert await send(server.ports["milt"]) == {}
        [message] = await server.delivered("carol@example.test", 1)
        assert b"Hello." in message
        assert await server.inbox("bob@example.test") == []
        assert [r for r in await server.queued()] == []
    finally:
        await server.stop()


def test_esmtp_arguments_of_envelope_changes() -> None:
    """What a milter may give with an added recipient (NOTIFY, ORCPT) and a new sender
    (RET, ENVID), by the rules RCPT TO's and MAIL FROM's are held to; the rest is
    ignored, each with the reason the log gives, and garbage never raises."""
    taken, ignored = envelope_arguments(
        b"notify=success,delay ORCPT=rfc822;a+2Bb@x.example SIZE=10 NOTIFY=NEVER",
        RECIPIENT_ARGUMENTS)
    assert taken == {"NOTIFY": "success,delay", "ORCPT": "rfc822;a+2Bb@x.example"}
    assert ignored == ["SIZE=10 (not one we honour)", "NOTIFY=NEVER (given twice)"]
    taken, ignored = envelope_arguments(
        b"NOTIFY=NEVER,SUCCESS ORCPT=no-type NOTIFY= ORCPT NOTIFY=FAILURE", RECIPIENT_ARGUMENTS)
    assert taken == {"NOTIFY": "FAILURE"}
    assert [why.rsplit(" (", 1)[1] for why in ignored] == ["malformed)"] * 4
    taken, ignored = envelope_arguments(b"RET=hdrs ENVID=q+2B1 BODY=8BITMIME AUTH=<>",
                                        SENDER_ARGUMENTS)
    assert taken == {"RET": "hdrs", "ENVID": "q+2B1"}
    assert len(ignored) == 2
    taken, ignored = envelope_arguments(b"RET=NONE ENVID=" + b"x" * 101, SENDER_ARGUMENTS)
    assert taken == {} and len(ignored) == 2
    for garbage in (b"\xff\xfe\x00\x01", b"ORCPT=rfc822;a\x07b", b"NOTIFY=\xc3\xa9",
                    b"=" * 5000, b"\t\r\n", b""):
        taken, ignored = envelope_arguments(garbage, RECIPIENT_ARGUMENTS)
        assert taken == {}
        assert all(len(why) < 140 and "\x07" not in why for why in ignored)


def queue_rows(server: Any) -> list[tuple[Any, ...]]:
    with server.parts.storage.db.engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(
            "select r.recipient, r.transport, r.notify, r.orcpt, m.mail_from, m.ret, "
            "m.envid from queue_recipients r join queue_messages m on m.id = r.queue_id "
            "order by r.id").all()]


@pytest_twisted.ensureDeferred
async def test_libmilter_envelope_changes_keep_their_dsn_arguments(
        tmp_path: Path, dns: DNSServer) -> None:
    """Sendmail's libmilter (smfi_addrcpt_par, smfi_chgfrom) adds recipients with
    NOTIFY and ORCPT, and changes the sender with RET and ENVID: they reach the
    queue as if the client had given them; what is malformed or not ours to take
    is ignored with a warning, and the change itself stands."""
    milter = LibMilter([
        ("chgfrom", "<changed@sender.example>", "RET=HDRS ENVID=new+2Benv SIZE=99"),
        ("addrcpt", "<carol@example.test>",
         "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;carol+orig@example.test"),
        ("addrcpt", "<outside@example.test>", "NOTIFY=never XTRA=1"),
        ("addrcpt", "<dave@example.test>", "NOTIFY=SOMETIMES ORCPT=no-type"),
        ("addrcpt", "<erin@example.test>", None)])
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        server = await lightmail(tmp_path, dns, ("lib", milter.socket),
                                 extra="[smtp]\ndirect_delivery = no\n")
        server.parts.queue_runner.stopService()    # the rows stay to be looked at
        try:
            for user in ("carol", "dave", "erin"):
                await server.parts.directory.add_user(f"{user}@example.test", None)
            assert await send(server.ports["milt"]) == {}, milter.output()
            rows = queue_rows(server)
        finally:
            await server.stop()
    finally:
        globalLogPublisher.removeObserver(events.append)
        milter.stop()
    sender = ("changed@sender.example", "HDRS", "new+2Benv")
    assert rows == [
        ("bob@example.test", "local", None, "rfc822;bob@example.test", *sender),
        ("carol@example.test", "local", "SUCCESS,FAILURE", "rfc822;carol+orig@example.test",
         *sender),
        ("friend@remote.example", "smtp", "NEVER", "rfc822;outside@example.test", *sender),
        ("dave@example.test", "local", None, "rfc822;dave@example.test", *sender),
        ("erin@example.test", "local", None, "rfc822;erin@example.test", *sender)]
    warned = {e["address"]: e["ignored"] for e in events
              if "ignoring ESMTP arguments" in e.get("log_format", "")}
    assert warned == {"changed@sender.example": "SIZE=99 (not one we honour)",
                      "outside@example.test": "XTRA=1 (not one we honour)",
                      "dave@example.test": "NOTIFY=SOMETIMES (malformed); "
                                           "ORCPT=no-type (malformed)"}


@pytest_twisted.ensureDeferred
async def test_garbage_arguments_of_envelope_changes_are_ignored(
        tmp_path: Path, dns: DNSServer, milters: list[FakeMilter]) -> None:
    """Raw packets a libmilter would not send: arguments in several strings, control
    characters, bytes that are not UTF-8.  The recipient is added and the sender
    changed all the same; the milter is not counted as failed."""
    milter = fake(milters, eob_edits(
        packet(b"2", b"<carol@example.test>\0NOTIFY=\x01\xff\0ORCPT=rfc822;x\x07y\0"),
        packet(b"2", b"<dave@example.test>\0\0"),
        packet(b"e", b"<changed@sender.example>\0RET=FULL\0ENVID=\xc3\xa9\0")))
    server = await lightmail(tmp_path, dns, ("fake", milter.socket),
                             extra="[smtp]\ndirect_delivery = no\n")
    server.parts.queue_runner.stopService()
    try:
        for user in ("carol", "dave"):
            await server.parts.directory.add_user(f"{user}@example.test", None)
        assert await send(server.ports["milt"], times=2) == [{}, {}]
        rows = queue_rows(server)
    finally:
        await server.stop()
    assert len(rows) == 6 and milter.connections == 1
    for row in rows[:3]:
        assert row[4:] == ("changed@sender.example", "FULL", None)
    assert [row[:4] for row in rows[:3]] == [
        ("bob@example.test", "local", None, "rfc822;bob@example.test"),
        ("carol@example.test", "local", None, "rfc822;carol@example.test"),
        ("dave@example.test", "local", None, "rfc822;dave@example.test")]


# --- a milter that fails ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("case", ["hang", "garbage", "close-mid-body", "bad-edit",
                                  "no-socket"])
@pytest.mark.parametrize("action", ["accept", "tempfail", "reject"])
async def test_a_failing_milter_gets_its_default_action(
        tmp_path: Path, dns: DNSServer, milters: list[FakeMilter], case: str,
        action: str) -> None:
    scripts = {"hang": {b"R": lambda _: HANG},
               "garbage": {b"M": lambda _: b"\x00\x00\x00\x02zz"},
               "close-mid-body": {b"B": lambda _: CLOSE},
               "bad-edit": eob_edits(packet(b"h", b"Not a name\0x\0")),
               "no-socket": {}}
    milter = fake(milters, scripts[case])
    socket = milter.socket + ("-gone" if case == "no-socket" else "")
    server = await lightmail(tmp_path, dns, ("failing", socket),
                             options=f"default_action = {action}\ncommand_timeout = 2s\n"
                                     "eom_timeout = 2s\n")
    try:
        started = time.monotonic()
        result = await send(server.ports["milt"], times=2)
        expected = {"accept": {}, "tempfail": (451, "4.7.1 Service unavailable - try "
                                                    "again later"),
                    "reject": (550, "5.7.1 Command rejected")}[action]
        first = expected
        if case == "hang" and action != "accept":     # refused at RCPT, then at MAIL
            first = {"bob@example.test": expected}
        assert result == [first, expected]
        assert time.monotonic() - started < 10        # the 2 s timeout, once
        if action == "accept":
            assert len(await server.delivered("bob@example.test", 2)) == 2
        assert milter.connections <= 1                 # not tried again in the session
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_an_older_milter_version_is_spoken(tmp_path: Path, dns: DNSServer,
                                                 milters: list[FakeMilter]) -> None:
    """Version 2 knows no DATA and no "no reply" flags (a v6 flag it sets is ignored)."""
    milter = fake(milters, eob_edits(packet(b"h", b"X-Old\0two\0")),
                  optneg=negotiation(2, 0x3, wire.P_NOHELO | wire.P_NR_HDR))
    server = await lightmail(tmp_path, dns, ("old", milter.socket))
    try:
        assert await send(server.ports["milt"]) == {}
        [message] = await server.delivered("bob@example.test", 1)
        assert b"X-Old: two\r\n" in message
        await until(lambda: milter.commands().endswith(b"Q"))
        assert milter.commands() == b"OCMRLLLLLLLNBEQ"          # no H, no T
    finally:
        await server.stop()


# --- OpenDKIM in milter mode ---------------------------------------------------------------

def opendkim_binary() -> str:
    path = shutil.which("opendkim") or "/usr/sbin/opendkim"
    if not Path(path).exists():
        pytest.fail("opendkim is not installed: run scripts/test-peers.sh (it installs "
                    "Debian's opendkim)", pytrace=False)
    return path


class OpenDKIMMilter:
    """opendkim -f with a config of the test's, on a Unix socket."""

    def __init__(self, settings: str, key: bytes = b"") -> None:
        self.dir = free_socket_dir()
        self.socket = self.dir / "opendkim.sock"
        keyfile = self.dir / "key.pem"
        keyfile.write_bytes(key)
        shutil.chown(keyfile, "opendkim")
        keyfile.chmod(0o600)
        settings = settings.replace("KEYFILE", str(keyfile))
        conf = self.dir / "opendkim.conf"
        conf.write_text(f"Socket local:{self.socket}\nSyslog no\nLogWhy yes\n"
                        f"PidFile {self.dir / 'pid'}\nRequireSafeKeys false\n{settings}")
        self.log = open(self.dir / "log", "wb")
        # As its own user: as root, OpenDKIM refuses files under a directory others
        # may write to (/tmp).
        shutil.chown(self.dir, "opendkim")
        self.process = subprocess.Popen([opendkim_binary(), "-f", "-x", str(conf)],
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        user="opendkim", group="opendkim")
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                said = self.output()
                self.stop()
                pytest.fail(f"opendkim did not start: {said}", pytrace=False)
            time.sleep(0.05)

    def output(self) -> str:
        return (self.dir / "log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_opendkim_signs_through_the_milter(tmp_path: Path, dns: DNSServer) -> None:
    """OpenDKIM as a signer (the client is on 127.0.0.1, one of its InternalHosts):
    its DKIM-Signature, added at EOB, is in the stored message and verifies."""
    pem, private = generate_key("rsa", 2048)
    key = signing_key("sender.example", "odkim", private)
    opendkim = OpenDKIMMilter("Mode s\nDomain sender.example\nSelector odkim\n"
                              "KeyFile KEYFILE\nCanonicalization relaxed/simple\n", pem)
    try:
        server = await lightmail(tmp_path, dns, ("opendkim", f"unix:{opendkim.socket}"))
        try:
            assert await send(server.ports["milt"]) == {}
            [message] = await server.delivered("bob@example.test", 1)
        finally:
            await server.stop()
    finally:
        opendkim.stop()
    assert b"DKIM-Signature:" in message, opendkim.output()
    record = dns_record(key).encode()
    assert dkim.verify(message, dnsfunc=lambda name, timeout=5: record)


@pytest_twisted.ensureDeferred
async def test_opendkim_verifies_through_the_milter(tmp_path: Path, dns: DNSServer) -> None:
    """OpenDKIM as a verifier (its DNS our test server, the client outside its
    InternalHosts): its Authentication-Results, with its own authserv-id, is kept
    beside ours; a changed body fails."""
    pem, private = generate_key("rsa", 2048)
    key = signing_key("sender.example", "mail", private)
    dns.set("mail._domainkey.sender.example.", "TXT", [dns_record(key)])
    signed = dkim.sign(BODY, b"mail", b"sender.example", pem,
                       include_headers=[b"from", b"subject", b"date"]) + BODY
    opendkim = OpenDKIMMilter(f"Mode v\nAuthservID odkim.test\nInternalHosts 192.0.2.1\n"
                              f"Nameservers 127.0.0.1@{dns.port}\n")
    try:
        server = await lightmail(tmp_path, dns, ("opendkim", f"unix:{opendkim.socket}"))
        try:
            assert await send(server.ports["milt"], message=signed) == {}
            assert await send(server.ports["milt"],
                              message=signed.replace(b"Hello.", b"Changed.")) == {}
            messages = await server.delivered("bob@example.test", 2)
        finally:
            await server.stop()
    finally:
        opendkim.stop()
    results = [[line for line in m.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
                .split(b"\r\n") if line.startswith(b"Authentication-Results: odkim.test")]
               for m in messages]
    assert len(results[0]) == 1 and b"dkim=pass" in results[0][0], opendkim.output()
    assert b"header.d=sender.example" in results[0][0]
    assert len(results[1]) == 1 and b"dkim=fail" in results[1][0], opendkim.output()
    assert all(m.count(b"Authentication-Results: mx.example.test;") == 1 for m in messages)


# --- rspamd's proxy in milter mode ----------------------------------------------------------

#: Modules of rspamd's packaged configuration that look things up on the network or
#: keep state in Redis: off, so that it scans with its local rules only.
RSPAMD_OFF = ("rbl", "surbl", "emails", "dkim", "dmarc", "spf", "arc", "asn",
              "fuzzy_check", "phishing", "url_redirector", "dcc", "hfilter", "neural",
              "ratelimit", "greylist", "replies", "reputation", "history_redis",
              "mx_check", "once_received", "whitelist", "rspamd_update", "dkim_signing",
              "elastic", "clickhouse", "metadata_exporter", "p0f", "antivirus",
              "external_services", "bimi", "classifier-bayes")
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class RspamdMilter:
    """Debian's rspamd, the packaged configuration with LOCAL_CONFDIR here: only the
    proxy worker, in milter mode, scanning itself (self_scan), on a Unix socket;
    its headers (X-Spamd-Result) added to every message."""

    def __init__(self) -> None:
        program = shutil.which("rspamd")
        if program is None:
            pytest.fail("rspamd is not installed: run scripts/test-peers.sh (it installs "
                        "Debian's rspamd)", pytrace=False)
        root = self.root = free_socket_dir()
        self.socket = root / "milter.sock"
        for folder in ("override.d", "local.d", "run", "db", "log"):
            (root / folder).mkdir()
        override, local = root / "override.d", root / "local.d"
        (override / "worker-proxy.inc").write_text(
            f'bind_socket = "{self.socket} mode=0600";\nmilter = yes;\ntimeout = 60s;\n'
            'count = 1;\nupstream "local" {\n  default = yes;\n  self_scan = yes;\n}\n')
        for worker in ("normal", "controller", "fuzzy"):
            (override / f"worker-{worker}.inc").write_text("enabled = false;\n")
        (override / "logging.inc").write_text(
            f'type = "file";\nfilename = "{root / "log" / "rspamd.log"}";\n'
            'level = "info";\n')
        (local / "options.inc").write_text(
            'dns { nameserver = ["127.0.0.1:9"]; timeout = 0.3s; retransmits = 1; }\n')
        (local / "milter_headers.conf").write_text(
            'use = ["x-spamd-result"];\nskip_local = false;\nskip_authenticated = false;\n')
        for module in RSPAMD_OFF:
            (local / f"{module}.conf").write_text("enabled = false;\n")
        self.process = subprocess.Popen(
            [program, "-f", "-u", "root", "-g", "root", "-i", "-c",
             "/etc/rspamd/rspamd.conf", "--var", f"LOCAL_CONFDIR={root}",
             "--var", f"RUNDIR={root / 'run'}", "--var", f"DBDIR={root / 'db'}",
             "--var", f"LOGDIR={root / 'log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 180        # it compiles its rules at start
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                said = self.log()[-3000:]
                self.stop()
                pytest.fail(f"rspamd did not start: {said}", pytrace=False)
            time.sleep(0.2)

    def log(self) -> str:
        path = self.root / "log" / "rspamd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            # Its workers are in its process group (start_new_session): the main
            # process stops them on SIGTERM; the group is killed if it does not.
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_rspamd_as_a_milter(tmp_path: Path, dns: DNSServer) -> None:
    """rspamd's milter: its X-Spamd-Result header reaches the stored message; GTUBE
    is refused with rspamd's own reply."""
    rspamd = RspamdMilter()
    try:
        server = await lightmail(tmp_path, dns, ("rspamd", f"unix:{rspamd.socket}"),
                                 options="command_timeout = 60s\neom_timeout = 60s\n")
        try:
            assert await send(server.ports["milt"]) == {}, rspamd.log()[-2000:]
            spam = BODY.replace(b"Hello.", b"Buy now.\r\n" + GTUBE)
            code, text = await send(server.ports["milt"], message=spam)
            [message] = await server.delivered("bob@example.test", 1)
        finally:
            await server.stop()
    finally:
        rspamd.stop()
    head = message.split(b"\r\n\r\n")[0]
    assert b"\r\nX-Spamd-Result: default: False" in head, head
    assert code == 554 and text.startswith("5.7.1"), (code, text)
