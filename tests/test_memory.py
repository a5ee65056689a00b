"""Self-defence under memory pressure (lightmail/resources.py, ``[server]
memory_limit``): what is measured and where the ceiling comes from (cgroup v1 and v2,
MemTotal, on made-up /proc and /sys trees), the watchdog's hysteresis, and a running
LightMail refusing new SMTP, IMAP and POP3 clients (smtplib, imaplib, poplib) above
its ceiling while the sessions open go on, then taking them again: with a made-up
reading, with memory really allocated, and with worker processes."""

from __future__ import annotations

import imaplib
import os
import poplib
import signal
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from inprocess import in_thread, start
from twisted.internet import task
from twisted.logger import globalLogPublisher

from lightmail.config import parse_config
from lightmail.metrics.registry import Metrics
from lightmail.resources import (
    MB,
    MemoryWatchdog,
    ceiling_of,
    cgroup_limit,
    memory_info,
    resident_size,
)
from tests.harness import ServerProcess

LISTENERS = ("[directory]\nauth_over_plaintext = yes\n"
             "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
             "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n")


@pytest.fixture
def memory_events() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "lightmail.resources":
            seen.append(event)
    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


# --- what is measured ----------------------------------------------------------------------

def fake_proc(tmp_path: Path, cgroup: str, meminfo: str = "") -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "meminfo").write_text(meminfo or "MemTotal:  1000000 kB\n"
                                  "MemFree:  10 kB\nMemAvailable:  500000 kB\n")
    return proc


def test_cgroup_v2_limit_is_the_lowest_on_the_way_up(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/system.slice/lightmail.service\n")
    cgroups = tmp_path / "cgroup"
    (cgroups / "system.slice" / "lightmail.service").mkdir(parents=True)
    (cgroups / "system.slice" / "lightmail.service" / "memory.max").write_text("max\n")
    assert cgroup_limit(proc, cgroups) is None
    (cgroups / "system.slice" / "memory.max").write_text("536870912\n")
    assert cgroup_limit(proc, cgroups) == 512 * MB
    (cgroups / "system.slice" / "lightmail.service" / "memory.max").write_text(
        "268435456\n")
    assert cgroup_limit(proc, cgroups) == 256 * MB


def test_cgroup_v1_limit_and_its_no_limit(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    cgroups = tmp_path / "cgroup"
    # Inside a container the host's path is not there: the root of the mount is.
    (cgroups / "memory").mkdir(parents=True)
    (cgroups / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_limit(proc, cgroups) is None
    (cgroups / "memory" / "memory.limit_in_bytes").write_text("1073741824\n")
    assert cgroup_limit(proc, cgroups) == 1024 * MB


def test_the_ceiling_from_the_config_the_cgroup_or_memtotal(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/\n")
    cgroups = tmp_path / "cgroup"
    cgroups.mkdir()
    assert memory_info(proc) == {"MemTotal": 1_024_000_000, "MemAvailable": 512_000_000}
    server = parse_config("").server
    assert ceiling_of(server, proc, cgroups) == (819_200_000, "80% of MemTotal")
    (cgroups / "memory.max").write_text("1000000000\n")
    assert ceiling_of(server, proc, cgroups) == (800_000_000, "80% of the cgroup's limit")
    server = parse_config("[server]\nmemory_limit = 700M\n").server
    assert ceiling_of(server, proc, cgroups) == (700 * MB, "memory_limit")
    assert ceiling_of(parse_config("[server]\nmemory_limit = 0\n").server, proc,
                      cgroups) == (None, "none")
    assert ceiling_of(parse_config("[server]\nmemory_limit = 50%\n").server, proc,
                      cgroups)[0] == 500_000_000


def test_this_process_is_measured() -> None:
    assert resident_size() and resident_size() > 10 * MB       # a Python with Twisted
    assert resident_size(os.getpid()) == pytest.approx(resident_size(), rel=0.1)
    assert resident_size(2 ** 22 + 1) is None                  # no such process


def test_hysteresis_logs_and_metrics(memory_events: list[dict[str, Any]]) -> None:
    config = parse_config("[server]\nmemory_limit = 700M\nmemory_log_interval = 60s\n")
    clock = task.Clock()
    metrics = Metrics()
    watchdog = MemoryWatchdog(lambda: config.server, metrics, clock)
    used = {"main": 400 * MB}
    watchdog.sample = lambda: dict(used)
    assert watchdog.check().used == 400 * MB and watchdog.refusal() is None
    used["worker 0"] = 320 * MB                               # 720 MB: over
    watchdog.check()
    assert watchdog.refusal() == "System resources low, try again later"
    used["worker 0"] = 250 * MB                               # 650 MB: over 90%
    watchdog.check()
    assert watchdog.refusing
    used["worker 0"] = 200 * MB                               # 600 MB
    watchdog.check()
    assert not watchdog.refusing
    lines = [event["log_format"].format(**event) for event in memory_events]
    assert lines == [
        "memory: 400 MB of 700 MB ceiling (memory_limit)",
        "memory: 720 MB (main 400 MB, worker 0 320 MB) of 700 MB ceiling (memory_limit):"
        " refusing new connections",
        "memory: 600 MB (main 400 MB, worker 0 200 MB) of 700 MB ceiling (memory_limit):"
        " accepting new connections again"]
    assert [e.get("state") for e in memory_events] == [None, "refusing", "accepting"]
    clock.advance(61)
    watchdog.check()                                          # periodic
    assert len(memory_events) == 4
    assert metrics.memory_used._value.get() == 600 * MB       # (prometheus_client's)
    assert metrics.memory_ceiling._value.get() == 700 * MB


# --- on a running LightMail ------------------------------------------------------------------

def answers(ports: dict[str, int]) -> dict[str, str]:
    """What a new client of each protocol gets: its greeting, or its refusal."""
    out = {}
    try:
        with smtplib.SMTP("127.0.0.1", ports["mx"], timeout=20) as smtp:
            out["smtp"] = f"{smtp.noop()[0]}"
    except smtplib.SMTPConnectError as exc:
        out["smtp"] = f"{exc.smtp_code} {exc.smtp_error.decode()}"
    try:
        imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=20)
        out["imap"] = imap.welcome.decode()
        imap.logout()
    except imaplib.IMAP4.error as exc:
        out["imap"] = str(exc)
    try:
        pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=20)
        out["pop3"] = pop.getwelcome().decode()
        pop.quit()
    except poplib.error_proto as exc:
        out["pop3"] = exc.args[0].decode()
    return out


REFUSED = {
    "smtp": "421 4.3.2 mx.example.test System resources low, try again later",
    # imaplib takes the BYE for a greeting it does not know, and says so.
    "imap": "b'* BYE [UNAVAILABLE] System resources low, try again later'",
    "pop3": "-ERR [SYS/TEMP] System resources low, try again later"}


def check_refused(got: dict[str, str]) -> None:
    assert got == REFUSED


def check_accepted(got: dict[str, str]) -> None:
    assert got["smtp"] == "250"
    assert got["imap"].startswith("* OK [CAPABILITY ")
    assert got["pop3"].startswith("+OK mx.example.test POP3 LightMail ready")


@pytest_twisted.inlineCallbacks
def test_refused_above_the_ceiling_then_accepted_again(tmp_path: Path) -> Any:
    server = yield start(tmp_path, extra=LISTENERS,
                         server="memory_limit = 700M\nmemory_check_interval = 1h\n")
    watchdog = server.parts.memory
    try:
        assert isinstance(watchdog, MemoryWatchdog) and not watchdog.refusing
        # A session opened before the pressure goes on through it.
        imap = yield in_thread(imaplib.IMAP4, "127.0.0.1", server.ports["imap"], timeout=20)
        yield in_thread(imap.login, "bob@example.test", "bob-secret")

        # Readings made up (a test's stand-in for the /proc measurement).
        watchdog.sample = lambda: {"main": 800 * MB}
        watchdog.check()
        check_refused((yield in_thread(answers, server.ports)))
        assert (yield in_thread(imap.select, "INBOX"))[0] == "OK"
        watchdog.sample = lambda: {"main": 650 * MB}         # over 90 % of 700 MB
        watchdog.check()
        check_refused((yield in_thread(answers, server.ports)))
        text = (yield server.parts.metrics.exposition()).decode()
        assert "lightmail_memory_refusing 1.0" in text
        assert 'lightmail_connections_refused_total{protocol="pop3",reason="memory"} 2.0' \
            in text

        watchdog.sample = lambda: {"main": 600 * MB}
        watchdog.check()
        check_accepted((yield in_thread(answers, server.ports)))
        assert (yield in_thread(imap.noop))[0] == "OK"
        yield in_thread(imap.logout)
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_memory_really_allocated_crosses_the_ceiling(tmp_path: Path) -> Any:
    server = yield start(tmp_path, extra=LISTENERS, server="memory_check_interval = 1h\n")
    watchdog = server.parts.memory
    try:
        now = watchdog.check().used
        # The ceiling 100 MB above what the process holds now (a reload's way of
        # changing it), then 200 MB more held, really written.
        watchdog.settings = lambda: parse_config(
            f"[server]\nmemory_limit = {now // MB + 100}M\n").server
        assert not watchdog.check().used > now + 100 * MB
        assert not watchdog.refusing
        ballast = b"x" * (200 * MB)
        watchdog.check()
        assert watchdog.refusing, watchdog.last
        check_refused((yield in_thread(answers, server.ports)))
        del ballast
        watchdog.check()
        assert not watchdog.refusing, watchdog.last
        check_accepted((yield in_thread(answers, server.ports)))
    finally:
        yield server.stop()


def test_with_workers_the_main_process_measures_and_refuses(write_config: Any) -> None:
    text = ("[server]\nstate_dir = state\nhostname = mx.example.test\nworkers = 2\n"
            "memory_limit = {limit}\nmemory_check_interval = 0.2s\n"
            "memory_log_interval = 1s\n[logging]\nlevel = info\n"
            "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
            "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
            "[listener:pop3]\nprotocol = pop3\nendpoint = tcp:0:interface=127.0.0.1\n")
    config = write_config(text.format(limit="1M"))
    server = ServerProcess(config)
    try:
        ports = server.ports(expected=3)
        # Every process is measured: the main one, both workers, the writer.
        server.wait_for(r"memory: \d+ MB \(main \d+ MB, writer \d+ MB, worker \d \d+ MB, "
                        r"worker \d \d+ MB\) of 1 MB ceiling \(memory_limit\)")
        check_refused(answers(ports))
        # A reload lifts the ceiling: accepted again at the next measurement.
        config.write_text(text.format(limit="0"))
        os.kill(server.proc.pid, signal.SIGHUP)
        server.wait_for(r"accepting new connections again")
        check_accepted(answers(ports))
    finally:
        server.kill()


def test_proportional_size_counts_pages_shared_with_a_child_once() -> None:
    """The watchdog's measure: a forked child shares its parent's pages, and Pss
    splits them between the two, where resident sizes count them in both."""
    from lightmail.resources import proportional_size
    ballast = bytearray(64 * MB)            # touched: resident in the parent
    ballast[::4096] = b"x" * len(ballast[::4096])
    read, write = os.pipe()
    child = os.fork()
    if child == 0:                          # holds the shared pages until told
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        alone = resident_size() or 0
        both = (proportional_size() or 0) + (proportional_size(child) or 0)
        rss_both = alone + (resident_size(child) or 0)
        # The 64 MB are counted once in the Pss sum and twice in the RSS sum.
        assert rss_both - both > 48 * MB
        assert proportional_size(2 ** 22 + 1) is None              # no such process
    finally:
        os.write(write, b"x")
        os.close(write)
        os.waitpid(child, 0)
    del ballast
