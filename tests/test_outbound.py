"""The outbound MTA against a real receiving MTA (Postfix) and a DNS server of the test's.

Mail submitted to LightMail for other domains is routed by MX records served by
``tests/dnsserver.py``, delivered over SMTP to a private Postfix with virtual
mailboxes, retried when the failure is temporary and bounced when it is permanent.
"""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from dnsserver import DNSServer
from harness import free_port
from inprocess import in_thread, start
from postfix import PostfixInstance
from twisted.internet import defer, reactor, task


class ReceivingMX:
    """A Postfix that accepts mail for the test domains into Maildirs."""

    def __init__(self, port: int, mailboxes: list[str],
                 main: dict[str, str] | None = None,
                 services: tuple[str, ...] = ()) -> None:
        nobody = pwd.getpwnam("nobody")
        self.maildirs = Path(tempfile.mkdtemp(prefix="lightmail-mx-"))
        os.chmod(self.maildirs, 0o755)
        os.chown(self.maildirs, nobody.pw_uid, nobody.pw_gid)
        domains = sorted({address.split("@")[1] for address in mailboxes})
        maps = ", ".join(f"{address}={address}/" for address in mailboxes)
        self.postfix = PostfixInstance(None, port, main={
            "myhostname": "mx.remote.test",
            "virtual_mailbox_domains": ", ".join(domains),
            "virtual_mailbox_base": str(self.maildirs),
            "virtual_mailbox_maps": f"inline:{{ {maps} }}",
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "virtual_transport": "virtual",
            **(main or {}),
        }, services=services)
        self.postfix.start()

    def messages(self, address: str) -> list[bytes]:
        box = self.maildirs / address
        return [path.read_bytes() for sub in ("new", "cur") if (box / sub).is_dir()
                for path in sorted((box / sub).iterdir())]

    def stop(self) -> None:
        self.postfix.stop()
        shutil.rmtree(self.maildirs, ignore_errors=True)


class DroppingMX(threading.Thread):
    """Says 354 to DATA, reads a little of the content, then hangs up."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server((host, port))
        self.sessions = 0

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.sessions += 1
            with conn, conn.makefile("rb") as f:
                conn.sendall(b"220 dropper ESMTP\r\n")
                while line := f.readline():
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        conn.sendall(b"250-dropper\r\n250 8BITMIME\r\n")
                    elif verb == b"DATA":
                        conn.sendall(b"354 go ahead\r\n")
                        f.read(100)
                        break
                    else:
                        conn.sendall(b"250 ok\r\n")

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def world() -> Iterator[dict[str, Any]]:
    port = free_port()
    dns = DNSServer({
        "remote.test.": {"MX": [(10, "down.remote.test."), (20, "mx.remote.test.")]},
        "down.remote.test.": {"A": ["127.0.0.2"]},
        "mx.remote.test.": {"A": ["127.0.0.1"]},
        "nullmx.test.": {"MX": [(0, ".")]},
        "implicit.test.": {"A": ["127.0.0.1"]},
        "later.test.": {"MX": [(10, "mx.remote.test.")]},
        "drop.test.": {"MX": [(10, "mx.drop.test.")]},
        "mx.drop.test.": {"A": ["127.0.0.3"]},
    }, ttl=1)
    dns.start()
    mx = ReceivingMX(port, ["alice@remote.test", "ivy@implicit.test", "carol@later.test",
                            "dan@drop.test"])
    dropper = DroppingMX("127.0.0.3", port)
    dropper.start()
    try:
        yield {"dns": dns, "mx": mx, "port": port, "dropper": dropper}
    finally:
        dropper.stop()
        mx.stop()
        dns.stop()


def submit(port: int, *messages: tuple[str, str]) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=30) as smtp:
        smtp.login("bob@example.test", "bob-secret")
        for rcpt, subject in messages:
            smtp.sendmail("bob@example.test", [rcpt],
                          f"From: bob@example.test\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
                          f"\r\n.Dotted first line\r\nBody of {subject}\r\n".encode())


@defer.inlineCallbacks
def until(predicate: Any, timeout: float = 60.0) -> Any:
    for _ in range(int(timeout / 0.1)):
        value = yield defer.maybeDeferred(predicate)
        if value:
            return value
        yield task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"not within {timeout}s: {predicate}")


@defer.inlineCallbacks
def queue_state(server: Any) -> Any:
    rows = yield server.parts.queue.list_recipients()
    return {row["recipient"]: (row["state"], row["last_error"] or "") for row in rows}


@pytest_twisted.inlineCallbacks
def test_mx_delivery_bounces_and_retries(tmp_path: Path, world: dict[str, Any]) -> None:
    dns, mx = world["dns"], world["mx"]
    dns.fail("later.test.", "SERVFAIL")
    server = yield start(tmp_path, f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n"
                         f"port = {world['port']}\nmin_backoff = 1s\nmax_backoff = 2s\n"
                         "tls = may\n")
    server.parts.queue_runner.poll_interval = 0.5
    try:
        yield in_thread(submit, server.ports["submissions"],
                        ("alice@remote.test", "to-alice"), ("nobody@remote.test", "unknown"),
                        ("x@nullmx.test", "nullmx"), ("y@nxdomain.test", "nxdomain"),
                        ("ivy@implicit.test", "implicit"), ("carol@later.test", "later"),
                        ("dan@drop.test", "dropped"))
        # Delivered through the second MX (the first refuses connections).
        [message] = yield until(lambda: mx.messages("alice@remote.test"))
        assert b"Subject: to-alice" in message
        assert b"\n.Dotted first line\n" in message           # dot-stuffing undone
        assert b"by mx.example.test (LightMail) with ESMTPSA" in message
        # Implicit MX: the domain's own A record.
        yield until(lambda: mx.messages("ivy@implicit.test"))
        # Permanent failures bounce at once, with a DSN to the (local) sender.
        notices = yield until(lambda: _notices(server, 3))
        by_rcpt = {rcpt: n for n in notices for rcpt in ("nobody@remote.test",
                                                         "x@nullmx.test", "y@nxdomain.test")
                   if f"Final-Recipient: rfc822; {rcpt}".encode() in n}
        assert sorted(by_rcpt) == ["nobody@remote.test", "x@nullmx.test", "y@nxdomain.test"]
        assert b"Status: 5.1.1" in by_rcpt["nobody@remote.test"]
        assert b"Remote-MTA: dns; mx.remote.test" in by_rcpt["nobody@remote.test"]
        assert b"Diagnostic-Code: smtp; 550 5.1.1" in by_rcpt["nobody@remote.test"]
        assert b"Status: 5.1.10" in by_rcpt["x@nullmx.test"]
        assert b"Status: 5.1.2" in by_rcpt["y@nxdomain.test"]
        for notice in notices:
            assert b"From: Mail Delivery System <MAILER-DAEMON@mx.example.test>" in notice
            assert b"multipart/report; report-type=delivery-status" in notice
        assert b"Subject: unknown" in by_rcpt["nobody@remote.test"]   # the original
        # Temporary failures wait and retry: DNS SERVFAIL, a receiver that hangs up.
        state = yield queue_state(server)
        assert state["carol@later.test"][0] in ("deferred", "active", "queued")
        yield until(lambda: world["dropper"].sessions >= 1)
        dns.fail("later.test.", None)
        dns.set("mx.drop.test.", "A", ["127.0.0.1"])
        yield until(lambda: mx.messages("carol@later.test"), timeout=30)
        [dropped] = yield until(lambda: mx.messages("dan@drop.test"), timeout=30)
        assert dropped.count(b"Subject: dropped") == 1
        # One after the other, messages to one server reuse its session (RSET, not a
        # new connection, greeting and EHLO).
        connects = mx.postfix.logtext().count("]: connect from")
        for number in range(3):
            yield in_thread(submit, server.ports["submissions"],
                            ("alice@remote.test", f"again-{number}"))
            yield until(lambda n=number: len(mx.messages("alice@remote.test")) == n + 2)
        assert mx.postfix.logtext().count("]: connect from") <= connects + 1
    finally:
        yield server.root.stopService()


@defer.inlineCallbacks
def _notices(server: Any, count: int) -> Any:
    found = yield server.inbox("bob@example.test")
    notices = [m for m in found if b"report-type=delivery-status" in m]
    return notices if len(notices) >= count else None


@pytest_twisted.inlineCallbacks
def test_transport_override_hands_mail_to_dovecot_over_lmtp(tmp_path: Path) -> None:
    """[transport:DOMAIN] protocol = lmtp: LightMail as the MTA in front of a Dovecot."""
    from dovecot import DovecotInstance
    dovecot = DovecotInstance()
    dovecot.add_user("dora@dovecot.test", "secret")
    dovecot.start()
    server = yield start(tmp_path, "[outbound]\nmin_backoff = 1s\ndns_servers = 127.0.0.1:9\n"
                         "[transport:dovecot.test]\nprotocol = lmtp\n"
                         f"relay = [127.0.0.1]:{dovecot.lmtp_port}\n")
    server.parts.queue_runner.poll_interval = 0.5
    try:
        yield in_thread(submit, server.ports["submissions"],
                        ("dora@dovecot.test", "via-lmtp"), ("nobody@dovecot.test", "lost"))
        yield until(lambda: dovecot.count("dora@dovecot.test") == 1)
        [notice] = yield until(lambda: _notices(server, 1))
        assert b"Final-Recipient: rfc822; nobody@dovecot.test" in notice
        assert b"Action: failed" in notice and b"Status: 5.1.1" in notice
    finally:
        yield server.root.stopService()
        dovecot.stop()


def test_transport_for_matches_domains_then_parent_domains() -> None:
    from lightmail.delivery.smtp import SMTPDeliveryAgent, Transport
    from lightmail.outbound.routing import Router
    agent = SMTPDeliveryAgent(Router(None), None, "h")  # type: ignore[arg-type]
    exact, sub = Transport(Router(None), "encrypt"), Transport(Router(None), lmtp=True)
    agent.transports = {"example.com": exact, ".example.com": sub}
    assert agent.transport_for("Example.COM") is exact
    assert agent.transport_for("a.b.example.com") is sub
    assert agent.transport_for("example.org") is agent.default
    agent.close()


class TempFailMX:
    """An MX that takes every session and answers each RCPT ``451 4.3.2``."""

    def __init__(self, host: str, port: int) -> None:
        import socketserver

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(b"220 busy.remote.test ESMTP\r\n")
                while line := self.rfile.readline():
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        reply = b"250-busy.remote.test\r\n250 8BITMIME\r\n"
                    elif verb == b"RCPT":
                        reply = b"451 4.3.2 System busy, try again later\r\n"
                    elif verb == b"QUIT":
                        self.wfile.write(b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        reply = b"250 2.0.0 Ok\r\n"
                    self.wfile.write(reply)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer((host, port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest_twisted.inlineCallbacks
def test_delay_notice_once_honouring_notify_and_never_to_the_null_sender(
        tmp_path: Path) -> None:
    """[outbound] delay_warning_time: recipients still deferred that long after
    arrival get their (local) sender one delay DSN, listing those whose NOTIFY
    allows it; retries after it send no more, and mail from <> gets none."""
    port = free_port()
    dns = DNSServer({"slow.test.": {"MX": [(10, "mx.slow.test.")]},
                     "remote.example.": {"MX": [(10, "mx.slow.test.")]},
                     "mx.slow.test.": {"A": ["127.0.0.1"]}}, ttl=1)
    dns.start()
    mx = TempFailMX("127.0.0.1", port)
    # One delivery at a time: when a deferral triggers the warning, every other
    # recipient of the message has had its attempt recorded, so one notice lists them.
    server = yield start(tmp_path, f"[outbound]\ndns_servers = 127.0.0.1:{dns.port}\n"
                         f"port = {port}\nmin_backoff = 1s\nmax_backoff = 1s\n"
                         "concurrency = 1\ndelay_warning_time = 3s\nmax_lifetime = 1h\n")
    rcpts = {"carol@slow.test": [], "dave@slow.test": ["NOTIFY=DELAY"],
             "never@slow.test": ["NOTIFY=NEVER"], "erin@slow.test": ["NOTIFY=FAILURE"]}

    def send() -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=ctx,
                              timeout=30) as smtp:
            smtp.login("bob@example.test", "bob-secret")
            smtp.ehlo()
            smtp.mail("bob@example.test")
            for rcpt, options in rcpts.items():
                assert smtp.rcpt(rcpt, options)[0] == 250
            assert smtp.data(b"From: bob@example.test\r\nTo: carol@slow.test\r\n"
                             b"Subject: slow one\r\n\r\nWaiting.\r\n")[0] == 250
        # From <> (a bounce, say) through an alias to a remote address.
        with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as smtp:
            smtp.sendmail("", ["outside@example.test"],
                          b"From: MAILER-DAEMON@elsewhere.test\r\nSubject: a bounce\r\n"
                          b"\r\nReturned.\r\n")

    def delay_notices(found: list[bytes]) -> list[bytes]:
        return [m for m in found if b"Action: delayed" in m]

    try:
        yield in_thread(send)
        waiting = set(rcpts) | {"friend@remote.example"}

        @defer.inlineCallbacks
        def retried(times: int) -> Any:
            server.parts.queue_runner.kick()     # retries when due, not at the next poll
            rows = yield server.parts.queue.list_recipients()
            attempts = {r["recipient"]: r["attempts"] for r in rows
                        if r["recipient"] in waiting}
            return set(attempts) == waiting and min(attempts.values()) >= times

        # Past the warning time, and retried a few more times after it.
        yield until(lambda: retried(6), timeout=60)
        inbox = yield server.inbox("bob@example.test")
        [notice] = delay_notices(inbox)
        assert b"Subject: Delayed Mail (still being retried)" in notice
        assert b"To: <bob@example.test>" in notice
        assert b"Subject: slow one" in notice                # the original's header
        assert b"Waiting." not in notice                     # ... and only that
        blocks = notice.split(b"Final-Recipient: ")[1:]
        assert sorted(block.split(b"\r\n")[0] for block in blocks) == [
            b"rfc822; carol@slow.test", b"rfc822; dave@slow.test"]
        for block in blocks:
            assert b"Status: 4.3.2" in block and b"Will-Retry-Until: " in block
        assert b"451 4.3.2 System busy" in notice
        # Nothing for anyone else, nothing more for them, and nothing in the queue
        # but the recipients still waiting (a notice to <> would be there).
        yield until(lambda: retried(8), timeout=60)
        inbox = yield server.inbox("bob@example.test")
        assert len(delay_notices(inbox)) == 1 and len(inbox) == 1
        rows = yield server.parts.queue.list_recipients()
        assert {r["recipient"] for r in rows} == waiting
        assert {r["mail_from"] for r in rows if r["recipient"] == "friend@remote.example"} \
            == {""}
    finally:
        yield server.root.stopService()
        mx.stop()
        dns.stop()


class AcceptingMX:
    """An MX that accepts every message and keeps it (a thread per session)."""

    def __init__(self, host: str, port: int) -> None:
        import socketserver
        self.messages: list[bytes] = []
        messages = self.messages

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(b"220 sink.remote.test ESMTP\r\n")
                while line := self.rfile.readline():
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        self.wfile.write(b"250-sink.remote.test\r\n250 PIPELINING\r\n")
                    elif verb == b"DATA":
                        self.wfile.write(b"354 go ahead\r\n")
                        content = b""
                        while (data := self.rfile.readline()) not in (b".\r\n", b""):
                            content += data
                        messages.append(content)
                        self.wfile.write(b"250 2.0.0 Ok: kept\r\n")
                    elif verb == b"QUIT":
                        self.wfile.write(b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        self.wfile.write(b"250 2.0.0 Ok\r\n")

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer((host, port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest_twisted.inlineCallbacks
def test_cli_requeue_wakes_the_running_queue_runner(tmp_path: Path) -> None:
    """``lightmail queue requeue`` (another process) writes to the server's FIFO,
    state_dir/queue.wake (mode 0600), and the runner retries at once: here it does
    not poll at all, so the message goes out only if the wake-up works."""
    import stat
    import time

    from harness import run_cli
    port = free_port()
    server = yield start(tmp_path, f"[outbound]\nrelay_host = [127.0.0.1]:{port}\n"
                         "min_backoff = 1h\nconnect_timeout = 5s\n")
    runner = server.parts.queue_runner
    mx = None
    try:
        fifo = tmp_path / "state" / "queue.wake"
        assert stat.S_ISFIFO(fifo.stat().st_mode)
        assert stat.S_IMODE(fifo.stat().st_mode) == 0o600
        runner._poll.stop()          # from now on only a kick or a wake-up claims

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as smtp:
                smtp.sendmail("someone@client.test", ["outside@example.test"],
                              b"Subject: woken\r\n\r\nAfter the outage.\r\n")
        yield in_thread(send)
        # Tried once (at the enqueue's kick), refused, deferred for an hour.
        yield until(lambda: queue_state(server).addCallback(
            lambda state: state.get("friend@remote.example", ("", ""))[0] == "deferred"
            and "connect" in state["friend@remote.example"][1]))
        mx = AcceptingMX("127.0.0.1", port)
        config = tmp_path / "cli.conf"
        config.write_text(f"[server]\nstate_dir = {tmp_path / 'state'}\n"
                          "hostname = mx.example.test\n")
        yield in_thread(run_cli, config, "queue", "requeue", "--all")
        requeued = time.monotonic()
        yield until(lambda: mx.messages, timeout=30)
        assert time.monotonic() - requeued < 3.0
        assert b"Subject: woken" in mx.messages[0]
        yield until(lambda: queue_state(server).addCallback(lambda state: not state))
        # Holding needs no wake-up, and a wake-up with nothing due is harmless.
        from lightmail.queue.wake import wake
        assert wake(fifo)
    finally:
        yield server.root.stopService()
        if mx is not None:
            mx.stop()
    # Nobody listens once the server has stopped: the CLI's nudge just finds no one.
    assert not wake(fifo)


def test_wake_fifo_replaces_what_is_not_its_own(tmp_path: Path) -> None:
    import stat

    from lightmail.queue.wake import WakeFIFO, wake
    path = tmp_path / "state" / "queue.wake"
    assert not wake(path)                          # no server ever ran
    path.parent.mkdir()
    path.write_text("not a FIFO")
    assert not wake(path)                          # a regular file is left alone
    woken: list[int] = []

    class Reactor:
        def addReader(self, reader: Any) -> None:
            self.reader = reader

        def removeReader(self, reader: Any) -> None:
            self.reader = None

    fake = Reactor()
    fifo = WakeFIFO(path, lambda: woken.append(1), fake)
    assert fifo.start()
    try:
        assert stat.S_ISFIFO(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert wake(path) and wake(path)
        fake.reader.doRead()                       # both bytes read, one wake-up
        assert woken == [1]
        fake.reader.doRead()                       # nothing pending: still no error
    finally:
        fifo.stop()
    # A FIFO that others may write to is made anew.
    os.chmod(path, 0o622)
    fifo = WakeFIFO(path, lambda: None, fake)
    assert fifo.start()
    fifo.stop()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
