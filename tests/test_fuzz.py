"""Fuzzing, the short run of ``make test`` (the long one: ``make fuzz``).

Hypothesis generates command streams for SMTP (MX and submission), LMTP, POP3 and
IMAP; each is fed to the real protocol objects over an in-memory transport
(``tests/fuzzing``), and the session must raise nothing, log no failure, answer every
command, end cleanly or go on, keep its buffers within its limits, and hold the
reactor no longer than 50 ms of CPU per iteration (docs/fuzzing.rst).

After them, the defects the fuzzer found, each with its exact input.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from fuzzing.driver import WARM_UP, Harness, fuzz, reproduce
from fuzzing.imap_inputs import imap_input
from fuzzing.oracle import imap_output
from fuzzing.parser_target import one_input
from fuzzing.play import Input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess import in_thread
from twisted.internet import defer

from lightmail.imap.parser import CommandReader, parse_command

# Examples per protocol, each played twice (as generated, and a raw variant): about
# 10 s per protocol on a 2-core machine.
EXAMPLES = {"smtp": 120, "lmtp": 80, "pop3": 120, "imap": 150}


@pytest.fixture
def harness_in(tmp_path: Path) -> Iterator[Any]:
    """Runs a function with a started Harness in a thread (the reactor serves it);
    its state on tmpfs where there is one (every message filed is fsynced)."""
    shm = Path("/dev/shm")
    where = Path(tempfile.mkdtemp(prefix="lightmail-fuzz-", dir=shm)) if shm.is_dir() \
        else tmp_path

    def run(body: Any) -> Any:
        def in_a_thread() -> None:
            harness = Harness(where)
            try:
                harness.warm_up()
                body(harness)
            finally:
                harness.stop()
        return in_thread(in_a_thread)
    try:
        yield run
    finally:
        if where != tmp_path:
            shutil.rmtree(where, ignore_errors=True)


@pytest.mark.parametrize("protocol", sorted(EXAMPLES))
@pytest_twisted.inlineCallbacks
def test_generated_sessions(protocol: str, harness_in: Any) -> Any:
    played: list[int] = []

    def body(harness: Harness) -> None:
        fuzz(harness, protocol, EXAMPLES[protocol], variants=2,
             on_input=lambda: played.append(1))
    yield harness_in(body)
    # Not skipped, not cut short: every example was played.
    assert len(played) >= 2 * EXAMPLES[protocol]


@pytest_twisted.inlineCallbacks
def test_memory_stays_bounded_over_many_sessions(harness_in: Any) -> Any:
    """The same sessions, played again and again, hold no more memory for it: what
    tracemalloc sees after 10 more rounds of every protocol's warm-up input (logins,
    FETCH, SEARCH, APPEND, COMPRESS, RETR, DATA, BDAT, LMTP, AUTH) is within 2 MB."""
    growth: list[int] = []

    def body(harness: Harness) -> None:
        def rounds(count: int) -> int:
            for _ in range(count):
                for listener, data in WARM_UP:
                    harness.play(Input(listener, data))
            gc.collect()
            return tracemalloc.get_traced_memory()[0]
        tracemalloc.start()
        try:
            before = rounds(3)          # caches filled
            growth.append(rounds(10) - before)
        finally:
            tracemalloc.stop()
    yield harness_in(body)
    print(f"memory growth over 10 rounds: {growth[0]} octets")
    assert growth[0] < 2 * 1024 * 1024, growth


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=300), imap_input().map(lambda made: b"\x05" + made.plain)))
def test_imap_parsers_refuse_or_parse(data: bytes) -> None:
    """The target atheris fuzzes (tests/fuzzing/atheris_parsers.py), here on raw bytes
    and on generated command streams: refusals only, no other exception."""
    one_input(data)


# -- defects found, and their inputs ---------------------------------------------------

def test_zero_length_literal_keeps_its_place() -> None:
    """{0} was not kept among the command's parts: the text after it was taken for a
    literal, and tokenize() failed an assertion out of dataReceived."""
    reader = CommandReader(8192, 8192, 16384)
    reader.buffer = b"a LOGIN bob {0}\r\n\r\n"
    while (found := reader.next())[0] != "command":
        assert found[0] == "continue"
    command = parse_command(found[1])
    assert (command.name, command.args) == ("LOGIN", ["bob", b""])


def _ended(plain: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return packer.compress(plain) + packer.flush(zlib.Z_FINISH)


# Each: the input the fuzzer found (shrunk), and what the answer must now say.
FOUND = [
    (Input("imap/strict", b"t0 SEARCH RETURN () CHARSET UTF-8 HEADER {0}\r\n {1}\r\n\r\n"),
     b"t0 BAD"),
    # "\xc2\xb2" is "²", which str.isdigit() takes and int() refuses.
    (Input("pop3", b"USER bob@example.test\r\nPASS bob-secret\r\nSTAT\r\nSTAT\r\n"
                   b"LIST \xc2\xb2\r\nSTAT\r\nSTAT\r\n"), b"-ERR Need a message number"),
    (Input("pop3", b"USER bob@example.test\r\nPASS bob-secret\r\nTOP 1 \xc2\xb2\r\n"),
     b"-ERR TOP needs"),
    (Input("smtp", b"EHLO x\r\nBDAT \xc2\xb2\r\n"), b"501 5.5.4"),
    (Input("smtp", b"EHLO x\r\nMAIL FROM:<a@b.example> SIZE=\xc2\xb2\r\n"), b"555 5.5.4"),
    # COMPRESS, then a deflate stream that a final block ends, with octets after it:
    # once an inflate had been cut short by the room the reader had, zlib handed those
    # octets back unread at every call, and the session inflated in a loop for ever.
    (Input("imap", b"C COMPRESS DEFLATE\r\n" + _ended(b"a NOOP\r\n" * 1100) + b"more"),
     b"* BYE Compression error"),
    # The same with the end of the stream in its first block (a bit flipped by the
    # fuzzer): the octets after it were kept aside until more came, and the session
    # waited; now they end it at once.
    (Input("imap", b"C COMPRESS DEFLATE\r\n", b"L AUTHENTICATE LOGIN\r\n* FETCH * ALL",
           corrupt=0), b"* BYE Compression error"),
    # One read of pipelined commands answered at once held the reactor for 50 to 80 ms
    # of CPU (that the input above held it for 68 ms showed it); under COMPRESS a few
    # kilobytes inflate to any number of them.  Each session now hands the reactor
    # back every listeners.INPUT_SLICE.
    (Input("smtp", b"EHLO x\r\n" + b"NOOP\r\n" * 10000), b"250 2.0.0 Ok\r\n" * 10001),
    (Input("lmtp", b"LHLO x\r\n" + b"RSET\r\n" * 10000), b"250 2.0.0 Reset\r\n" * 10000),
    (Input("pop3", b"USER bob@example.test\r\nPASS bob-secret\r\n" + b"NOOP\r\n" * 10000),
     b"+OK\r\n" * 10001),
    (Input("imap", b"C COMPRESS DEFLATE\r\n", b"a NOOP\r\n" * 20000),
     b"a OK NOOP completed\r\n" * 10),
]


@pytest_twisted.inlineCallbacks
def test_found_defects_stay_fixed(harness_in: Any) -> Any:
    results: list[tuple[Input, bytes, list[str], bytes]] = []

    def body(harness: Harness) -> None:
        for found, expected in FOUND:
            played = harness.play(found)
            results.append((found, expected, reproduce(harness, found),
                            imap_output(played.output)))
    yield harness_in(body)
    for found, expected, problems, output in results:
        assert problems == [], (found, problems)
        assert expected in output, (found, output)


@pytest_twisted.inlineCallbacks
def test_oracle_splits_pop3_commands_as_the_session_does(harness_in: Any) -> Any:
    """"\x1eCAPA" is CAPA to the session (str.strip()), and its answer multi-line:
    the oracle once read it as another command and reported a defect that was not."""
    problems: list[list[str]] = []
    inputs = [Input("pop3/strict", b"\x1eCAPA\r\nSTAT\r\nSTA\xca\r\n"),
              # A line too long has its -ERR, though no command was taken.
              Input("pop3/strict", b"\x00" + b"a" * 600 + b"\r\nSTAT\r\nAUTH\r\nSTAT\r\n")]
    yield harness_in(lambda harness: problems.extend(reproduce(harness, i) for i in inputs))
    assert problems == [[], []]


@pytest_twisted.inlineCallbacks
def test_oracle_lets_idle_wait_when_compress_was_mangled(harness_in: Any) -> Any:
    """The client's COMPRESS went out mangled ("1DONECOMPRESS DEFLATE\\r`" inside an
    IDLE) and it then sent deflated what the server reads as text: the IDLE rightly
    waits for its DONE, which never comes as text.  The oracle reported the IDLE's
    missing answer as a defect (the long IMAP run, input 378,349)."""
    given = Input(
        "imap", b"L LOGIN bob@example.test bob-secret\r\nt0 ID (\"a\" NIL)\r\nt1 IDLE \r\n"
        b"1DONECOMPRESS DEFLATE\r`",
        b"t2 SELECT INBOX\r\nt3 DELETE INBOX\r\n* SELECT INBOX\r\n"
        b"t5 FETCH 1 ALL (CHANGEDSINCE 1)\r\n* COPY 1 INBOX\r\n"
        b"* APPEND INBOX 1-Feb-1994 UTF8 (~{96}\r\nFrom: Ann <ann@example.org>\r\n\t\r\n"
        b"\r\nplain text\r\n" + b"\n" * 50 + b")\r\n* GETQUOTA INBOX\r\n", cuts=(164,))
    problems: list[list[str]] = []
    yield harness_in(lambda harness: problems.append(reproduce(harness, given)))
    assert problems == [[]]


@pytest_twisted.inlineCallbacks
def test_nothing_buffered_runs_after_the_client_is_gone(harness_in: Any) -> Any:
    """Between two slices of pipelined commands the client can go: what it had sent
    after them (here a whole transaction) is not run, and no message is delivered."""
    from twisted.internet import reactor, task, threads
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    counts: list[int] = []

    async def gone_after_first_slice(harness: Harness) -> None:
        services = harness.world.services
        user = await services.directory.get_user("bob@example.test")
        inbox = await services.mailstore.get_mailbox(user.id, "INBOX")
        before = len(await services.mailstore.list_messages(inbox.id))
        proto = harness.world.factories["smtp"].buildProtocol(
            IPv4Address("TCP", "192.0.2.7", 40000))
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"EHLO x\r\n" + b"NOOP\r\n" * 20000
                           + b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.test>\r\n"
                           b"DATA\r\nSubject: late\r\n\r\nx\r\n.\r\n")
        assert proto.busy          # the rest waits for the next reactor turn
        proto.connectionLost(Failure(ConnectionError("gone")))
        for _ in range(400):       # until it has run what it was going to run
            await task.deferLater(reactor, 0.05, lambda: None)
            if not proto.busy:
                break
        counts.extend([before, len(await services.mailstore.list_messages(inbox.id))])

    def body(harness: Harness) -> None:
        threads.blockingCallFromThread(
            reactor, lambda: defer.ensureDeferred(gone_after_first_slice(harness)))
    yield harness_in(body)
    assert counts[0] == counts[1], counts


def test_oracle_reads_imap_output_as_a_client() -> None:
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    output = (b"* OK hi\r\nC OK DEFLATE active\r\n"
              + packer.compress(b"* 1 FETCH (BODY[] {12}\r\nt1 OK fake\r\n)\r\nt1 OK done\r\n")
              + packer.flush(zlib.Z_SYNC_FLUSH))
    from fuzzing.oracle import imap_statuses
    assert imap_statuses(imap_output(output)) == [b"C", b"t1"]
