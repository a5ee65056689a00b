"""Syslog output (``[logging] syslog``): a real `twistd -n lightmail` sends RFC 5424
messages to receivers in the test (UDP, a Unix datagram socket, TCP with octet
counting), each parsed strictly (tests/syslogwire.py); and a receiver that is absent
or does not read never holds the server up."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import threading
import time
from pathlib import Path

from harness import ServerProcess
from syslogwire import Message, octet_counted, parse
from twisted.logger import LogLevel

from lightmail.syslog5424 import DATAGRAM_MAX, Formatter

MAIL, LOCAL3 = 2, 19


def _config(syslog: str, extra: str = "") -> str:
    return ("[server]\nstate_dir = state\nhostname = mx.example.test\nshutdown_timeout = 5s\n"
            f"[logging]\nsyslog = {syslog}\n{extra}"
            "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
            "max_connections_per_ip = 3\n")


def _session(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        assert client.ehlo("client.test")[0] == 250


class DatagramReceiver:
    """Reads datagrams in a thread; ``read`` keeps each one, parsed."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(0.2)
        self.messages: list[Message] = []
        self.stop = threading.Event()
        self.reading = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.reading.wait(0.2):
                continue
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self.messages.append(parse(data))
            except BaseException as exc:        # reported by wait_for
                self.error = exc

    def wait_for(self, pattern: str, timeout: float = 30.0) -> Message:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            assert self.error is None, self.error
            for message in list(self.messages):
                if regex.search(message.text):
                    return message
            assert time.monotonic() < deadline, (
                f"no {pattern!r} within {timeout}s: {[m.text for m in self.messages]}")
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _check_session(server: ServerProcess, receiver: DatagramReceiver, port: int,
                   facility: int, app: str) -> None:
    _session(port)
    connect = receiver.wait_for(r"^connect from 127\.0\.0\.1 to mx$")
    assert (connect.facility, connect.severity) == (facility, 6)      # info
    assert connect.app == app and connect.procid == str(server.proc.pid)
    assert connect.msgid == "smtp"
    assert connect.hostname == socket.gethostname()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", connect.timestamp)
    # The connection id is structured data, the same as the file log's conn=.
    conn = connect.data["lightmail@32473"]["conn"]
    server.wait_for(rf"conn={conn}\] connect from 127\.0\.0\.1 to mx")
    # A warning: a connection over max_connections_per_ip (3; the last session's
    # may not be let go of yet).
    held = []
    try:
        for _ in range(5):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(conn)
            if conn.recv(100).startswith(b"421 "):
                break
        else:
            raise AssertionError("no connection was refused")
    finally:
        for conn in held:
            conn.close()
    refused = receiver.wait_for(r"^refused 127\.0\.0\.1: 3 connections from one address")
    assert (refused.facility, refused.severity) == (facility, 4)      # warning
    assert refused.data == {}


def test_udp_messages_are_rfc5424_with_facility_app_name_and_ids(write_config) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    receiver = DatagramReceiver(sock)
    receiver.reading.set()
    port = sock.getsockname()[1]
    server = ServerProcess(write_config(_config(
        f"udp:127.0.0.1:{port}", "syslog_facility = local3\nsyslog_app_name = lm-test\n")))
    try:
        smtp = server.ports(expected=1, timeout=120)["mx"]
        ready = receiver.wait_for(r"^LightMail ready: 1 listeners$")
        assert ready.msgid == "service.LightMailService"
        _check_session(server, receiver, smtp, LOCAL3, "lm-test")
        # The file log (standard output here) still gets every line too.
        server.wait_for(r"LightMail ready")
        assert server.terminate() in (0, -15)
    finally:
        server.kill()
        receiver.close()


def test_an_absent_or_full_unix_receiver_never_holds_the_server_up(
        tmp_path: Path, write_config) -> None:
    path = tmp_path / "dev-log"
    server = ServerProcess(write_config(_config(f"unix:{path}")))
    receiver = None
    try:
        smtp = server.ports(expected=1, timeout=120)["mx"]
        for _ in range(3):                          # nobody listens: lost, no error
            _session(smtp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        receiver = DatagramReceiver(sock)           # bound, not reading: fills up
        started = time.monotonic()
        for _ in range(40):
            _session(smtp)
        # 40 sessions against a full receiver (ten datagrams fill a Unix datagram
        # socket's queue) take what sessions take; nothing waits for syslog.
        assert time.monotonic() - started < 60
        receiver.reading.set()
        _session(smtp)
        note = receiver.wait_for(r"^\d+ log messages were dropped: the syslog receiver "
                                 r"was absent or full$")
        assert note.severity == 4 and note.msgid == "syslog"
        _check_session(server, receiver, smtp, MAIL, "lightmail")
        assert "syslog" not in server.output.lower()   # nothing for the admin to fix
        assert server.terminate() in (0, -15)
    finally:
        server.kill()
        if receiver is not None:
            receiver.close()


def test_tcp_frames_are_octet_counted_and_the_connection_comes_back(
        write_config) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(60)
    port = listener.getsockname()[1]
    server = ServerProcess(write_config(_config(f"tcp:127.0.0.1:{port}")))
    try:
        smtp = server.ports(expected=1, timeout=120)["mx"]

        def frames_until(conn: socket.socket, pattern: str) -> list[Message]:
            buffer = bytearray()
            messages: list[Message] = []
            conn.settimeout(30)
            while not any(re.search(pattern, m.text) for m in messages):
                data = conn.recv(65536)
                assert data, f"closed before {pattern!r}: {[m.text for m in messages]}"
                buffer += data
                messages += [parse(frame) for frame in octet_counted(buffer)]
            return messages

        conn, _ = listener.accept()
        # What was logged before the connection was made waited for it.
        first = frames_until(conn, r"^LightMail ready")
        assert any(m.text.startswith("LightMail ") and "starting" in m.text for m in first)
        _session(smtp)
        frames_until(conn, r"^connect from 127\.0\.0\.1 to mx$")
        conn.close()                                # the receiver restarts
        _session(smtp)
        again, _ = listener.accept()                # LightMail connects again
        _session(smtp)
        later = frames_until(again, r"^disconnect from 127\.0\.0\.1")
        assert all(m.procid == str(server.proc.pid) for m in later)
        again.close()
        assert server.terminate() in (0, -15)
    finally:
        server.kill()
        listener.close()


def test_the_formatter_escapes_structured_data_and_keeps_utf8_whole() -> None:
    format = Formatter("mail", "lightmail", lambda event: event["log_format"],
                       hostname="mx1.example.test")
    event = {"log_level": LogLevel.error, "log_time": 1_800_000_000.25,
             "log_namespace": "lightmail.imap", "conn_id": "K4TQ9ZBX",
             "user": 'odd"user]\\@example.test', "log_format": "é" * 10_000}
    raw = format(event, DATAGRAM_MAX)
    assert len(raw) <= DATAGRAM_MAX
    message = parse(raw)                            # strict: valid UTF-8 once cut
    assert (message.facility, message.severity) == (MAIL, 3)
    assert message.timestamp == "2027-01-15T08:00:00.250000Z"
    assert message.hostname == "mx1.example.test" and message.procid == str(os.getpid())
    assert message.data == {"lightmail@32473": {"conn": "K4TQ9ZBX",
                                                "user": 'odd"user]\\@example.test'}}
    assert set(message.text) == {"é"}
