"""POP3 command streams (RFC 1939, 2449, 5034): log in (USER/PASS, AUTH with or
without an initial response, APOP, or not at all), then the TRANSACTION commands
with message numbers in and out of range, and the odd verb."""

from __future__ import annotations

from hypothesis import strategies as st

from fuzzing.grammar import finish, sasl_exchange
from fuzzing.play import Input
from fuzzing.world import PASSWORD, USER

NUMBERS = [b"1", b"2", b"3", b"4", b"0", b"-1", b"99999999999999999999", b"1 2", b"a", b"",
           b" 1", b"+1", b"\xd9\xa1", b"1\x00", b"\xc2\xb2"]
VERBS = [b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"RSET", b"NOOP", b"CAPA",
         b"QUIT", b"STLS", b"AUTH", b"USER", b"PASS", b"APOP", b"LAST", b"XTND", b"list"]


@st.composite
def login(draw: st.DrawFn) -> list[bytes]:
    kind = draw(st.sampled_from([0, 1, 2, 2, 2, 3, 4]))
    if kind == 0:
        return []
    if kind <= 2:
        secret = PASSWORD.encode() if draw(st.integers(0, 29)) else b"wrong"
        return [b"USER " + USER.encode(), b"PASS " + secret]
    if kind == 3:
        mechanism, initial, lines = draw(sasl_exchange())
        first = b"AUTH " + mechanism + (b" " + (initial or b"=") if initial is not None
                                        else b"")
        return [first, *lines]
    return [b"APOP " + USER.encode() + b" 0123456789abcdef0123456789abcdef"]


@st.composite
def pop3_input(draw: st.DrawFn) -> Input:
    listener = "pop3/strict" if draw(st.integers(0, 6)) == 0 else "pop3"
    lines = draw(login())
    for _ in range(draw(st.integers(1, 10))):
        if draw(st.booleans()):
            # Well-formed TRANSACTION commands on the messages there are.
            lines.append(draw(st.sampled_from([
                b"STAT", b"LIST", b"UIDL", b"LIST 2", b"UIDL 3", b"RETR 1", b"RETR 2",
                b"RETR 3", b"TOP 2 0", b"TOP 3 5", b"DELE 1", b"RSET", b"NOOP"])))
            continue
        verb = draw(st.sampled_from(VERBS))
        args = draw(st.lists(st.sampled_from(NUMBERS), max_size=2))
        lines.append(b" ".join([verb, *args]))
    plain = b"".join(line + b"\r\n" for line in lines)
    return draw(finish(listener, plain))
