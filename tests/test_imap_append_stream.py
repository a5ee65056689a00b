"""APPEND's message streams to the blob store (issue 17, point 9): after login a
session holds a few chunks of a message however large it is (the reader's buffer,
the blob writer's backlog), the message arrives whole, and a streamed message whose
command fails or never ends leaves no temporary file behind.

Over real sockets against the in-process server; the memory is that of the whole
process, measured with tracemalloc while the client (a thread of it) sends chunks of
one block it made beforehand."""

from __future__ import annotations

import base64
import hashlib
import random
import socket
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from inprocess import in_thread, start
from recordingreader import RecordingReader

from lightmail.imap import core

LISTENER = ("[directory]\nauth_over_plaintext = yes\n"
            "[listener:imap]\nprotocol = imap\nendpoint = tcp:0:interface=127.0.0.1\n"
            "[imap]\nmax_literal = 32M\n")
MIB = 2**20
PIECE = 64 * 1024
# What a session may hold of a 20 MiB message: the blob writer's backlog before the
# session stops reading (1 MiB), a copy of it on its way to the file, and a few
# socket reads.  Holding the message whole, as before, is 20 MiB and more.
BOUND = 4 * MIB


def _block() -> bytes:
    """1 MiB of base64 lines: text a server may take in any literal."""
    raw = random.Random(17).randbytes(57 * 18396)
    lines = [base64.b64encode(raw[i:i + 57]) for i in range(0, len(raw), 57)]
    return (b"\r\n".join(lines) + b"\r\n")[:MIB - 2] + b"\r\n"


BLOCK = _block()


def pieces(subject: str, mib: int) -> tuple[list[bytes], int, str]:
    """A message of about ``mib`` MiB as PIECE-sized pieces (views of BLOCK, so that
    sending them allocates nothing), its size and its SHA-256."""
    head = f"Subject: {subject}\r\nFrom: a@example.test\r\n\r\n".encode()
    view = memoryview(BLOCK)
    body = [view[i:i + PIECE] for i in range(0, MIB, PIECE)] * mib
    digest = hashlib.sha256(head)
    for piece in body:
        digest.update(piece)
    return [head, *body], len(head) + mib * MIB, digest.hexdigest()


class Session:
    """A bare IMAP connection: lines as they are, literals read in chunks."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()

    def send(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.file.readline()

    def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if not line or line.startswith(tag + b" "):
                return lines

    def login(self) -> None:
        self.send(b"l LOGIN bob@example.test bob-secret\r\n")
        assert self.until(b"l")[-1].startswith(b"l OK")

    def fetch_digest(self, uid: int) -> tuple[int, str]:
        """Size and SHA-256 of a message of INBOX fetched back, read a chunk at a
        time."""
        self.send(b"e EXAMINE INBOX\r\n")
        assert self.until(b"e")[-1].startswith(b"e OK")
        self.send(b"f UID FETCH %d BODY.PEEK[]\r\n" % uid)
        line = self.line()
        assert line.rstrip().endswith(b"}"), line
        size = int(line.rstrip()[:-1].rsplit(b"{", 1)[1])
        digest, left = hashlib.sha256(), size
        while left:
            chunk = self.file.read(min(left, MIB))
            assert chunk, "connection closed in the literal"
            digest.update(chunk)
            left -= len(chunk)
        assert self.until(b"f")[-1].startswith(b"f OK")
        return size, digest.hexdigest()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def uid_of(reply: bytes) -> int:
    """The UID of an APPEND's ``OK [APPENDUID v uid]``."""
    assert b"[APPENDUID " in reply, reply
    return int(reply.split(b"]")[0].split()[-1])


def measured(send: Callable[[], Any]) -> tuple[Any, int]:
    """What ``send`` returns, and the most memory the process held meanwhile above
    what it held before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = send()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def temporary_blobs(tmp: Path) -> list[Path]:
    """The blob store's temporary files that hold something: spares made ahead
    (blobs.py) are empty; a blob being written, or one left behind, is not."""
    found = []
    for path in (tmp / "state" / "blobs" / "tmp").iterdir():
        try:
            if path.stat().st_size:
                found.append(path)
        except FileNotFoundError:
            pass            # discarded between the listing and its stat: not left
    return found


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


@pytest_twisted.inlineCallbacks
def test_a_20_mib_append_is_held_a_chunk_at_a_time_and_arrives_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A synchronising APPEND of 20 MiB: the ``+`` go-ahead comes as before, the
    session never holds more than BOUND of it, and FETCH gives it back intact."""
    monkeypatch.setattr(core, "CommandReader", RecordingReader)
    server = yield start(tmp_path, LISTENER)
    message, size, digest = pieces("twenty", 20)
    try:
        def run() -> dict[str, Any]:
            imap = Session(server.ports["imap"])
            imap.login()
            RecordingReader.longest = 0

            def send() -> tuple[bytes, list[bytes]]:
                imap.send(b"a APPEND INBOX {%d}\r\n" % size)
                go_ahead = imap.line()
                for piece in message:
                    imap.send(piece)
                imap.send(b"\r\n")
                return go_ahead, imap.until(b"a")
            (go_ahead, appended), grew = measured(send)
            fetched = imap.fetch_digest(uid_of(appended[-1]))
            imap.close()
            return {"go": go_ahead, "appended": appended, "grew": grew,
                    "fetched": fetched, "longest": RecordingReader.longest}
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert out["go"].startswith(b"+ ")
    assert out["appended"][-1].startswith(b"a OK [APPENDUID"), out["appended"]
    assert out["fetched"] == (size, digest)
    assert out["longest"] <= 2 * PIECE, out["longest"]
    assert out["grew"] < BOUND, out["grew"]


@pytest_twisted.inlineCallbacks
def test_pipelined_non_synchronising_appends_stream_too(tmp_path: Path) -> None:
    """Two LITERAL+ APPENDs of 12 MiB sent back to back without waiting: no ``+``,
    the second waits in the socket (not in the session) while the first is filed,
    and both arrive whole."""
    server = yield start(tmp_path, LISTENER)
    first, size, digest = pieces("first", 12)
    second, size2, digest2 = pieces("second", 12)
    try:
        def run() -> dict[str, Any]:
            imap = Session(server.ports["imap"])
            imap.login()

            def send() -> list[bytes]:
                for tag, message, length in ((b"a", first, size), (b"b", second, size2)):
                    imap.send(b"%s APPEND INBOX {%d+}\r\n" % (tag, length))
                    for piece in message:
                        imap.send(piece)
                    imap.send(b"\r\n")
                return imap.until(b"a") + imap.until(b"b")
            replies, grew = measured(send)
            uids = [uid_of(line) for line in replies if line.startswith((b"a ", b"b "))]
            fetched = [imap.fetch_digest(uid) for uid in uids]
            imap.close()
            return {"replies": replies, "grew": grew, "fetched": fetched}
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert not any(line.startswith(b"+") for line in out["replies"]), out["replies"]
    assert out["fetched"] == [(size, digest), (size2, digest2)]
    assert out["grew"] < BOUND, out["grew"]


@pytest_twisted.inlineCallbacks
def test_compressed_append_streams_a_chunk_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under COMPRESS=DEFLATE the inflater hands the reader a chunk of the message at
    a time (its room while streaming), and the message arrives whole."""
    monkeypatch.setattr(core, "CommandReader", RecordingReader)
    server = yield start(tmp_path, LISTENER)
    message, size, digest = pieces("deflated", 8)
    try:
        def run() -> dict[str, Any]:
            imap = Session(server.ports["imap"])
            imap.login()
            imap.send(b"z COMPRESS DEFLATE\r\n")
            assert imap.until(b"z")[-1].startswith(b"z OK")
            deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
            inflate = zlib.decompressobj(-15)
            RecordingReader.longest = 0
            imap.send(deflate.compress(b"a APPEND INBOX {%d+}\r\n" % size))
            for piece in message:
                imap.send(deflate.compress(piece))
            imap.send(deflate.compress(b"\r\n") + deflate.flush(zlib.Z_SYNC_FLUSH))
            answer = b""
            while b"a " not in answer:
                chunk = imap.sock.recv(65536)
                assert chunk, answer
                answer += inflate.decompress(chunk)
            imap.close()
            return {"answer": answer, "longest": RecordingReader.longest}
        out = yield in_thread(run)
        blobs = yield server.inbox("bob@example.test")
    finally:
        yield server.stop()
    assert b"a OK [APPENDUID" in out["answer"], out["answer"]
    assert out["longest"] <= 2 * PIECE, out["longest"]
    assert [(len(blob), hashlib.sha256(blob).hexdigest()) for blob in blobs] == [
        (size, digest)]


@pytest_twisted.inlineCallbacks
def test_refused_appends_leave_no_temporary_file(tmp_path: Path) -> None:
    """A streamed message whose APPEND is answered NO [TRYCREATE], BAD (a flag that
    is not one; a literal too many) or NO [TOOBIG] (a second literal over the limit)
    is dropped with its temporary file; the session goes on."""
    server = yield start(tmp_path, LISTENER)
    message, size, _ = pieces("refused", 3)
    try:
        def run() -> dict[str, Any]:
            imap = Session(server.ports["imap"])
            imap.login()
            out: dict[str, Any] = {}
            for tag, before, after in (
                    (b"t", b"Nowhere", b""),
                    (b"f", b"INBOX (\\Bogus)", b""),
                    (b"x", b"INBOX", b" {3+}\r\nabc"),
                    (b"g", b"INBOX", b" {999999999}")):
                imap.send(b"%s APPEND %s {%d}\r\n" % (tag, before, size))
                go = imap.line()
                for piece in message:
                    imap.send(piece)
                # The literal is whole; its command is not: the message is in a
                # temporary file (it streamed), not in the session.
                out[tag + b" streamed"] = eventually(lambda: bool(temporary_blobs(tmp_path)))
                imap.send(after + b"\r\n")
                out[tag] = (go, imap.until(tag)[-1])
                out[tag + b" left"] = eventually(lambda: not temporary_blobs(tmp_path))
            imap.send(b"n NOOP\r\n")
            out["noop"] = imap.until(b"n")[-1]
            imap.close()
            return out
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert out[b"t"][0].startswith(b"+ ")
    assert out[b"t"][1].startswith(b"t NO [TRYCREATE]")
    assert out[b"f"][1].startswith(b"f BAD")
    assert out[b"x"][1].startswith(b"x BAD")
    assert out[b"g"][1].startswith(b"g NO [TOOBIG]")
    assert all(out[tag + b" streamed"] for tag in (b"t", b"f", b"x", b"g"))
    assert all(out[tag + b" left"] for tag in (b"t", b"f", b"x", b"g"))
    assert out["noop"].startswith(b"n OK")


@pytest_twisted.inlineCallbacks
def test_a_connection_dropped_in_the_message_leaves_no_temporary_file(
        tmp_path: Path) -> None:
    """Half of an 8 MiB message is in the blob store's temporary file (it streams),
    then the client goes: the file goes too."""
    server = yield start(tmp_path, LISTENER)
    message, size, _ = pieces("dropped", 8)
    try:
        def run() -> dict[str, Any]:
            imap = Session(server.ports["imap"])
            imap.login()
            imap.send(b"a APPEND INBOX {%d+}\r\n" % size)
            for piece in message[:len(message) // 2]:
                imap.send(piece)
            streaming = eventually(lambda: bool(temporary_blobs(tmp_path)))
            imap.close()
            gone = eventually(lambda: not temporary_blobs(tmp_path))
            return {"streaming": streaming, "gone": gone}
        out = yield in_thread(run)
        inbox = yield server.inbox("bob@example.test")
    finally:
        yield server.stop()
    assert out["streaming"], "nothing of the message reached the blob store"
    assert out["gone"], "the temporary file of the message is still there"
    assert inbox == []


@pytest_twisted.inlineCallbacks
def test_logout_after_a_refused_append_leaves_no_temporary_file(tmp_path: Path) -> None:
    """APPEND to no mailbox pipelined with LOGOUT: NO, BYE, and nothing left."""
    server = yield start(tmp_path, LISTENER)
    message, size, _ = pieces("logout", 2)
    try:
        def run() -> dict[str, Any]:
            imap = Session(server.ports["imap"])
            imap.login()
            imap.send(b"a APPEND Nowhere {%d+}\r\n" % size)
            for piece in message:
                imap.send(piece)
            imap.send(b"\r\nb LOGOUT\r\n")
            replies = imap.until(b"a") + imap.until(b"b")
            imap.close()
            return {"replies": replies,
                    "gone": eventually(lambda: not temporary_blobs(tmp_path))}
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert out["replies"][0].startswith(b"a NO [TRYCREATE]"), out["replies"]
    assert out["replies"][-1].startswith(b"b OK"), out["replies"]
    assert out["gone"]


@pytest_twisted.inlineCallbacks
def test_an_append_over_quota_is_refused_and_leaves_no_temporary_file(
        tmp_path: Path) -> None:
    """The quota is checked against the streamed message's size, as against one in
    memory: NO [OVERQUOTA], and its temporary file goes."""
    server = yield start(tmp_path, LISTENER)
    yield server.parts.directory.add_user("carol@example.test", "carol-secret",
                                          quota_bytes=MIB)
    message, size, _ = pieces("too much", 2)
    try:
        def run() -> dict[str, Any]:
            imap = Session(server.ports["imap"])
            imap.send(b"l LOGIN carol@example.test carol-secret\r\n")
            assert imap.until(b"l")[-1].startswith(b"l OK")
            imap.send(b"a APPEND INBOX {%d+}\r\n" % size)
            for piece in message:
                imap.send(piece)
            imap.send(b"\r\n")
            reply = imap.until(b"a")[-1]
            imap.close()
            return {"reply": reply,
                    "gone": eventually(lambda: not temporary_blobs(tmp_path))}
        out = yield in_thread(run)
    finally:
        yield server.stop()
    assert out["reply"].startswith(b"a NO [OVERQUOTA]"), out["reply"]
    assert out["gone"]
