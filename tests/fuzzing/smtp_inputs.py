"""SMTP (MX and submission) and LMTP command streams (RFC 5321, 2033, 3030, 4954...).

A stream greets (EHLO, HELO or LHLO, or not), on submission perhaps authenticates
(AUTH PLAIN with an initial response, or an exchange that may be wrong or cancelled),
then runs commands: whole transactions (MAIL, RCPTs, then DATA with a dot-stuffed
MIME message or BDAT chunks whose counts are right, or not), single commands with
odd arguments and parameters, and unknown verbs.
"""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from fuzzing.grammar import b64, dot_stuffed, finish, message, sasl_exchange
from fuzzing.play import Input
from fuzzing.world import PASSWORD, USER

ADDRESSES = [b"bob@example.test", b"postmaster@example.test", b"postmaster",
             b"outside@example.test", b"nobody@example.test", b"bob+tag@example.test",
             b"friend@remote.example", b"", b"\"quoted local\"@example.test",
             b"j\xc3\xb6rg@example.test", b"@a,@b:bob@example.test", b"bob@[192.0.2.1]",
             b"bob@example.test." , b"a" * 70 + b"@example.test", b"b@" + b"x" * 260,
             b"<bob@example.test>", b"bob@@example.test", b"\\@example.test", b"x@\xff"]
MAIL_PARAMS = [b"SIZE=100", b"SIZE=99999999999", b"SIZE=x", b"BODY=8BITMIME",
               b"BODY=BINARYMIME", b"BODY=7BIT", b"BODY=X", b"SMTPUTF8", b"RET=FULL",
               b"RET=HDRS", b"RET=X", b"ENVID=abc+2Bdef", b"ENVID=+ZZ", b"AUTH=<>",
               b"AUTH=bob@example.test", b"X=1", b"SIZE=", b"=", b"SIZE=1 SIZE=2"]
RCPT_PARAMS = [b"NOTIFY=NEVER", b"NOTIFY=SUCCESS,FAILURE,DELAY", b"NOTIFY=NEVER,SUCCESS",
               b"NOTIFY=X", b"ORCPT=rfc822;bob@example.test", b"ORCPT=x", b"ORCPT=rfc822;+ZZ",
               b"X=1"]
HELLO = [b"client.example", b"[192.0.2.1]", b"[IPv6:2001:db8::1]", b"", b"a b", b"\xc3\xa9",
         b"x" * 300]
SIMPLE = [b"RSET", b"NOOP", b"NOOP x", b"QUIT", b"HELP", b"HELP MAIL", b"VRFY bob",
          b"EXPN list", b"STARTTLS", b"AUTH", b"DATA", b"BDAT", b"BDAT x", b"BDAT 0 LAST",
          b"BDAT 99999999999999999999", b"MAIL", b"RCPT", b"MAIL FROM:", b"RCPT TO:<>",
          b"X" * 20, b"", b" ", b"MAIL FROM:<bob@example.test", b"TURN", b"ETRN x"]


@st.composite
def path(draw: st.DrawFn, keyword: bytes, params: list[bytes]) -> bytes:
    address = draw(st.sampled_from(ADDRESSES))
    chosen = draw(st.lists(st.sampled_from(params), max_size=3))
    return keyword + b":<" + address + b">" + b"".join(b" " + p for p in chosen)


@st.composite
def content(draw: st.DrawFn) -> bytes:
    """DATA and its content: dot-stuffed as it should be, or raw (bare LFs, lone dots,
    no terminator: the mutations do the rest)."""
    body = draw(message())
    if draw(st.integers(0, 4)):
        return b"DATA\r\n" + dot_stuffed(body)
    return b"DATA\r\n" + body + draw(st.sampled_from([b"\r\n.\r\n", b"\n.\n", b".\r\n", b""]))


@st.composite
def chunks(draw: st.DrawFn) -> bytes:
    """BDAT (RFC 3030): the message in chunks, the last one LAST; the counts are right
    four times in five."""
    body = draw(message())
    pieces = draw(st.lists(st.integers(0, len(body)), max_size=3))
    points = sorted({0, len(body), *pieces})
    out = b""
    for start, end in itertools.pairwise(points):
        size = end - start
        if draw(st.integers(0, 4)) == 0:
            size = max(0, size + draw(st.integers(-3, 3)))
        last = b" LAST" if end == len(body) else b""
        out += b"BDAT %d%s\r\n" % (size, last) + body[start:end]
    return out or b"BDAT 0 LAST\r\n"


@st.composite
def transaction(draw: st.DrawFn) -> list[bytes]:
    """MAIL, RCPTs, then DATA or BDAT.  Three in four start with a sender and a
    recipient that are accepted, or the content would never be reached: random
    addresses and parameters pass MAIL and RCPT together a few times in a hundred."""
    lines = []
    if draw(st.integers(0, 3)):
        sender = draw(st.sampled_from([b"bob@example.test", b"", b"friend@remote.example"]))
        param = draw(st.sampled_from([b"", b"", b" BODY=8BITMIME", b" SIZE=5000",
                                      b" SMTPUTF8", b" RET=HDRS ENVID=x"]))
        lines.append(b"MAIL FROM:<" + sender + b">" + param)
        lines.append(b"RCPT TO:<" + draw(st.sampled_from(
            [b"bob@example.test", b"postmaster@example.test", b"bob+x@example.test",
             b"outside@example.test"])) + b">")
    else:
        lines.append(draw(path(b"MAIL FROM", MAIL_PARAMS)))
    for _ in range(draw(st.integers(0, 2))):
        lines.append(draw(path(b"RCPT TO", RCPT_PARAMS)))
    end = draw(st.integers(0, 4))
    if end <= 2:
        lines.append(draw(content()).removesuffix(b"\r\n"))
    elif end == 3:
        lines.append(draw(chunks()).removesuffix(b"\r\n"))
    return lines


def auth(exchange: tuple[bytes, bytes | None, list[bytes]]) -> list[bytes]:
    mechanism, initial, lines = exchange
    first = b"AUTH " + mechanism + (b" " + (initial or b"=") if initial is not None else b"")
    return [first, *lines]


@st.composite
def smtp_input(draw: st.DrawFn, lmtp: bool = False) -> Input:
    if lmtp:
        listener = "lmtp"
    else:
        listener = draw(st.sampled_from(["smtp", "submission", "submission/strict"]))
    lines = []
    greeting = draw(st.integers(0, 5))
    if greeting:
        verb = b"LHLO" if lmtp else b"EHLO"
        if greeting == 1:
            verb = draw(st.sampled_from([b"HELO", b"EHLO", b"LHLO", b"ehlo"]))
        lines.append(verb + b" " + draw(st.sampled_from(HELLO[:1] * 4 + HELLO)))
    if listener.startswith("submission") and draw(st.integers(0, 3)):
        if draw(st.booleans()):     # the right credentials, or nothing is submitted
            lines.append(b"AUTH PLAIN " + b64(b"\0" + USER.encode() + b"\0"
                                              + PASSWORD.encode()))
        else:
            lines += auth(draw(sasl_exchange()))
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.integers(0, 5))
        if kind <= 2:
            lines += draw(transaction())
        elif kind == 3:
            lines.append(draw(st.sampled_from(SIMPLE)))
        elif kind == 4:
            lines.append(draw(path(draw(st.sampled_from([b"MAIL FROM", b"RCPT TO"])),
                                   MAIL_PARAMS + RCPT_PARAMS)))
        else:
            lines += auth(draw(sasl_exchange()))
    plain = b"".join(line + b"\r\n" for line in lines)
    return draw(finish(listener, plain))


def lmtp_input() -> st.SearchStrategy[Input]:
    return smtp_input(lmtp=True)
