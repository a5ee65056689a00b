"""IMAP command streams (RFC 9051 and the extensions LightMail announces).

A stream is a prelude (nothing, LOGIN, AUTHENTICATE with or without SASL-IR, then
perhaps SELECT or EXAMINE) and a few commands with arguments built from the grammar:
atoms, quoted strings and the three literal forms ({n}, {n+}, ~{n}), sequence sets,
FETCH items, search keys, flags, dates, mailbox names, LIST and STATUS options,
APPEND of MIME messages, IDLE with its DONE, AUTHENTICATE continuations.  One stream
in six turns COMPRESS=DEFLATE on somewhere: the rest of it is sent deflated.
"""

from __future__ import annotations

from hypothesis import strategies as st

from fuzzing.grammar import b64, finish, message, sasl_exchange
from fuzzing.play import Input
from fuzzing.world import PASSWORD, USER

NAMES = [b"INBOX", b"inbox", b"lists", b"Sent", b"Trash", b"Drafts", b"Archive", b"Junk",
         b"new", b"new/sub", b"a/b/c", b"&AOk-t&AOk-", b"\xc3\xa9t\xc3\xa9", b"", b"%",
         b"*", b"a" * 300, b"INBOX/x", b"..", b"/", b"&", b"&-", b"&Jjo", b"x\x00y"]
SEQUENCES = [b"1", b"2", b"*", b"1:*", b"2:4", b"$", b"1,3", b"4294967295", b"0",
             b"1:0", b"99999999999999999999", b"3:2,*", b"1:4294967296", b"*:*", b",",
             b"1,", b"1:2:3", b"5:*"]
FETCH_ITEMS = [
    b"ALL", b"FAST", b"FULL", b"FLAGS", b"UID", b"INTERNALDATE", b"RFC822", b"RFC822.SIZE",
    b"RFC822.HEADER", b"RFC822.TEXT", b"ENVELOPE", b"BODY", b"BODYSTRUCTURE", b"BODY[]",
    b"BODY.PEEK[HEADER]", b"BODY[TEXT]<0.10>", b"BODY[1]", b"BODY[2.MIME]", b"BODY[3.1]",
    b"BODY[HEADER.FIELDS (From Subject)]", b"BODY[HEADER.FIELDS.NOT (To)]",
    b"BINARY[1]", b"BINARY.PEEK[2]<5.3>", b"BINARY.SIZE[2]", b"BINARY[]", b"MODSEQ",
    b"PREVIEW", b"SAVEDATE", b"EMAILID", b"BODY[1.2.3.4.5.6]", b"BODY[0]",
    b"BODY[]<4294967295.4294967295>", b"BODY[3.HEADER]", b"BODY[4.TEXT]", b"BODY[",
    b"BODY[HEADER.FIELDS ()]", b"BINARY[1.1]<0.0>", b"BODY[2.1.MIME]"]
SEARCH_SIMPLE = [b"ALL", b"ANSWERED", b"DELETED", b"DRAFT", b"FLAGGED", b"NEW", b"OLD",
                 b"RECENT", b"SEEN", b"UNANSWERED", b"UNDELETED", b"UNDRAFT", b"UNFLAGGED",
                 b"UNSEEN", b"$", b"1:*", b"2", b"SAVEDBEFORE 1-Jan-2020", b"UNKEYWORD x"]
SEARCH_ARG = [b"BCC", b"BODY", b"CC", b"FROM", b"SUBJECT", b"TEXT", b"TO", b"KEYWORD",
              b"BEFORE", b"ON", b"SINCE", b"SENTBEFORE", b"SENTON", b"SENTSINCE",
              b"LARGER", b"SMALLER", b"UID", b"MODSEQ", b"OLDER", b"YOUNGER"]
DATES = [b"1-Feb-1994", b"31-Feb-2020", b"07-Feb-1994", b"1-Xyz-2000", b"1-Jan-99999",
         b"\"17-Jul-1996 02:44:25 -0700\"", b"\" 1-Jan-1970 00:00:00 +0000\"",
         b"\"31-Dec-9999 23:59:60 -1259\"", b"\"1-Jan-2000 24:00:00 +2400\""]
FLAGS = [b"\\Seen", b"\\Answered", b"\\Flagged", b"\\Deleted", b"\\Draft", b"\\Recent",
         b"$Work", b"keyword", b"\\Foo", b"\\*", b"(", b"\xc3\xa9", b"$" * 100]
SIMPLE = [b"CAPABILITY", b"NOOP", b"NAMESPACE", b"CHECK", b"CLOSE", b"UNSELECT",
          b"EXPUNGE", b"LOGOUT", b"STARTTLS", b"LSUB \"\" *", b"ID NIL", b"UNKNOWN",
          b"UID", b"UID XYZZY 1", b"X" * 40]


@st.composite
def astring(draw: st.DrawFn, value: bytes) -> bytes:
    """``value`` as an atom, a quoted string or a literal of one of the three kinds."""
    kind = draw(st.integers(0, 5))
    if kind <= 1:
        return value
    if kind == 2:
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    form = draw(st.sampled_from([b"{%d}", b"{%d+}", b"~{%d}", b"{%d-}"]))
    size = len(value) + (draw(st.integers(-2, 2)) if draw(st.integers(0, 9)) == 0 else 0)
    return form % max(size, 0) + b"\r\n" + value


@st.composite
def mailbox(draw: st.DrawFn) -> bytes:
    return draw(astring(draw(st.sampled_from(NAMES))))


@st.composite
def sequence(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.sampled_from(SEQUENCES))
    numbers = draw(st.lists(st.integers(0, 8), min_size=1, max_size=4))
    return b",".join(b"%d" % n if n else b"*" for n in numbers)


def plist(items: list[bytes]) -> bytes:
    return b"(" + b" ".join(items) + b")"


@st.composite
def search_key(draw: st.DrawFn, depth: int = 0) -> bytes:
    kind = draw(st.integers(0, 6 if depth < 3 else 2))
    if kind <= 1:
        return draw(st.sampled_from(SEARCH_SIMPLE))
    if kind == 2:
        key = draw(st.sampled_from(SEARCH_ARG))
        value = draw(st.sampled_from(DATES + [b"5", b"x", b"99999999999999999999", b"1:*",
                                              b"-1", b"\xc3\xa9", b'""']))
        return key + b" " + draw(astring(value))
    if kind == 3:
        return b"HEADER " + draw(astring(draw(st.sampled_from([b"Subject", b"X", b""])))) \
            + b" " + draw(astring(draw(st.sampled_from([b"", b"parts", b"\xc3\xa9"]))))
    if kind == 4:
        return b"NOT " + draw(search_key(depth + 1))
    if kind == 5:
        return b"OR " + draw(search_key(depth + 1)) + b" " + draw(search_key(depth + 1))
    return plist(draw(st.lists(search_key(depth + 1), max_size=3)))


@st.composite
def search_program(draw: st.DrawFn) -> bytes:
    prefix = b""
    if draw(st.integers(0, 3)) == 0:
        options = draw(st.lists(st.sampled_from([b"MIN", b"MAX", b"ALL", b"COUNT", b"SAVE",
                                                 b"PARTIAL 1:10", b"X"]), max_size=3))
        prefix += b"RETURN " + plist(options) + b" "
    if draw(st.integers(0, 3)) == 0:
        prefix += b"CHARSET " + draw(st.sampled_from([b"UTF-8", b"US-ASCII", b"KOI8-R",
                                                      b"x"])) + b" "
    keys = draw(st.lists(search_key(), min_size=1, max_size=3))
    return prefix + b" ".join(keys)


@st.composite
def fetch_args(draw: st.DrawFn) -> bytes:
    items = draw(st.lists(st.sampled_from(FETCH_ITEMS), min_size=1, max_size=4))
    out = draw(sequence()) + b" " + (items[0] if len(items) == 1 else plist(items))
    if draw(st.integers(0, 5)) == 0:
        out += b" " + draw(st.sampled_from([b"(CHANGEDSINCE 1)", b"(CHANGEDSINCE 1 VANISHED)",
                                            b"(VANISHED)", b"(CHANGEDSINCE 0)", b"()"]))
    return out


@st.composite
def store_args(draw: st.DrawFn) -> bytes:
    out = draw(sequence()) + b" "
    if draw(st.integers(0, 5)) == 0:
        out += b"(UNCHANGEDSINCE " + draw(st.sampled_from([b"0", b"1", b"99"])) + b") "
    out += draw(st.sampled_from([b"", b"+", b"-"])) + b"FLAGS" + draw(
        st.sampled_from([b"", b".SILENT", b".X"]))
    flags = draw(st.lists(st.sampled_from(FLAGS), max_size=3))
    return out + b" " + (plist(flags) if draw(st.booleans()) else b" ".join(flags))


@st.composite
def append_args(draw: st.DrawFn) -> bytes:
    """Into an existing mailbox, with a literal of the right size, three times in
    four: other forms are refused before the message is looked at."""
    if draw(st.integers(0, 3)):
        content = draw(message())
        form = draw(st.sampled_from([b"{%d}", b"{%d+}", b"~{%d}"]))
        flags = draw(st.sampled_from([b"", b" (\\Seen)", b" () \"1-Feb-1994 10:00:00 +0000\""]))
        return (draw(st.sampled_from([b"INBOX", b"lists", b"Sent"])) + flags + b" "
                + form % len(content) + b"\r\n" + content)
    out = draw(mailbox())
    if draw(st.booleans()):
        out += b" " + plist(draw(st.lists(st.sampled_from(FLAGS), max_size=3)))
    if draw(st.integers(0, 3)) == 0:
        out += b" " + draw(st.sampled_from(DATES))
    content = draw(message())
    literal = draw(astring(content))
    if draw(st.integers(0, 5)) == 0:
        literal = b"UTF8 (~{%d}\r\n" % len(content) + content + b")"
    return out + b" " + literal


@st.composite
def list_args(draw: st.DrawFn) -> bytes:
    out = b""
    if draw(st.integers(0, 2)) == 0:
        options = draw(st.lists(st.sampled_from([b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH",
                                                 b"SPECIAL-USE", b"X"]), max_size=3))
        out += plist(options) + b" "
    out += draw(astring(draw(st.sampled_from([b"", b"INBOX", b"a/"])))) + b" "
    patterns = [draw(astring(draw(st.sampled_from(NAMES)))) for _ in range(
        draw(st.integers(1, 2)))]
    out += patterns[0] if len(patterns) == 1 else plist(patterns)
    if draw(st.integers(0, 2)) == 0:
        returns = draw(st.lists(st.sampled_from([
            b"CHILDREN", b"SUBSCRIBED", b"SPECIAL-USE", b"STATUS (MESSAGES UNSEEN SIZE)",
            b"STATUS ()", b"MYRIGHTS"]), max_size=3))
        out += b" RETURN " + plist(returns)
    return out


STATUS_ITEMS = [b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN",
                b"HIGHESTMODSEQ", b"SIZE", b"DELETED", b"APPENDLIMIT", b"MAILBOXID", b"X"]


@st.composite
def command(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A command name and its arguments (one of them may be a whole extra line)."""
    name = draw(st.sampled_from([
        b"FETCH", b"UID FETCH", b"STORE", b"UID STORE", b"SEARCH", b"UID SEARCH", b"SORT",
        b"UID SORT", b"THREAD", b"COPY", b"UID COPY", b"MOVE", b"UID MOVE", b"UID EXPUNGE",
        b"APPEND", b"SELECT", b"EXAMINE", b"CREATE", b"DELETE", b"RENAME", b"SUBSCRIBE",
        b"UNSUBSCRIBE", b"LIST", b"STATUS", b"ENABLE", b"ID", b"IDLE", b"GETQUOTA",
        b"GETQUOTAROOT", b"SETQUOTA", b"LOGIN", b"AUTHENTICATE", b"SIMPLE", b"RANDOM"]))
    if name in (b"FETCH", b"UID FETCH"):
        return name, draw(fetch_args())
    if name in (b"STORE", b"UID STORE"):
        return name, draw(store_args())
    if name in (b"SEARCH", b"UID SEARCH"):
        return name, draw(search_program())
    if name in (b"SORT", b"UID SORT"):
        criteria = draw(st.lists(st.sampled_from([b"ARRIVAL", b"CC", b"DATE", b"FROM",
                                                  b"SIZE", b"SUBJECT", b"TO", b"REVERSE",
                                                  b"DISPLAYFROM", b"X"]), max_size=3))
        return name, plist(criteria) + b" UTF-8 " + draw(search_program())
    if name == b"THREAD":
        algorithm = draw(st.sampled_from([b"REFERENCES", b"ORDEREDSUBJECT", b"X"]))
        return name, algorithm + b" UTF-8 " + draw(search_program())
    if name in (b"COPY", b"UID COPY", b"MOVE", b"UID MOVE"):
        return name, draw(sequence()) + b" " + draw(mailbox())
    if name == b"UID EXPUNGE":
        return name, draw(sequence())
    if name == b"APPEND":
        return name, draw(append_args())
    if name in (b"SELECT", b"EXAMINE"):
        extra = draw(st.sampled_from([b"", b"", b" (CONDSTORE)", b" (QRESYNC (1 1))",
                                      b" (QRESYNC (1 1 1:* (1,3 1,3)))", b" (X)", b" ()"]))
        return name, draw(mailbox()) + extra
    if name == b"CREATE":
        use = draw(st.sampled_from([b"", b" (USE (\\Sent))", b" (USE (\\X))", b" (USE ())"]))
        return name, draw(mailbox()) + use
    if name == b"RENAME":
        return name, draw(mailbox()) + b" " + draw(mailbox())
    if name == b"LIST":
        return name, draw(list_args())
    if name == b"STATUS":
        items = draw(st.lists(st.sampled_from(STATUS_ITEMS), max_size=4))
        return name, draw(mailbox()) + b" " + plist(items)
    if name == b"ENABLE":
        caps = draw(st.lists(st.sampled_from([b"CONDSTORE", b"QRESYNC", b"UTF8=ACCEPT",
                                              b"IMAP4rev2", b"X"]), max_size=3))
        return name, b" ".join(caps)
    if name == b"ID":
        pairs = draw(st.lists(st.sampled_from([b'"name" "x"', b'"a" NIL', b"NIL", b'"x"']),
                              max_size=3))
        return name, plist(pairs)
    if name == b"IDLE":
        return name, b"\r\n" + draw(st.sampled_from([b"DONE", b"done", b"x", b"DONE x"]))
    if name in (b"GETQUOTA", b"GETQUOTAROOT", b"SETQUOTA", b"DELETE", b"SUBSCRIBE",
                b"UNSUBSCRIBE"):
        tail = b" (STORAGE 10)" if name == b"SETQUOTA" else b""
        return name, draw(mailbox()) + tail
    if name == b"LOGIN":
        secret = PASSWORD.encode() if draw(st.integers(0, 29)) else b"wrong"
        return name, draw(astring(USER.encode())) + b" " + draw(astring(secret))
    if name == b"AUTHENTICATE":
        return name, authenticate(draw(sasl_exchange()))
    if name == b"SIMPLE":
        return draw(st.sampled_from(SIMPLE)), b""
    tokens = draw(st.lists(st.sampled_from([b"x", b"(", b")", b'"q"', b"NIL", b"{3}\r\nabc",
                                            b"1:*", b"[", b"]", b"\\Seen"]), max_size=6))
    return draw(st.sampled_from([b"FETCH", b"STATUS", b"LIST", b"X", b"SELECT"])), \
        b" ".join(tokens)


def authenticate(exchange: tuple[bytes, bytes | None, list[bytes]]) -> bytes:
    mechanism, initial, lines = exchange
    out = mechanism + (b" " + (initial or b"=") if initial is not None else b"")
    return out + b"".join(b"\r\n" + line for line in lines)


@st.composite
def prelude(draw: st.DrawFn) -> list[bytes]:
    """Half the streams run in the selected state, a quarter in the authenticated."""
    kind = draw(st.sampled_from([0, 1, 2, 3, 4, 4, 4, 4]))
    lines = []
    if kind == 1:
        lines.append(b"L LOGIN " + USER.encode() + b" " + PASSWORD.encode())
    elif kind == 2:
        lines.append(b"L AUTHENTICATE PLAIN " + b64(b"\0" + USER.encode() + b"\0"
                                                     + PASSWORD.encode()))
    elif kind == 3:
        lines.append(b"L AUTHENTICATE " + authenticate(draw(sasl_exchange())))
    elif kind == 4:
        lines.append(b"L LOGIN " + USER.encode() + b" " + PASSWORD.encode())
        lines.append(b"S " + draw(st.sampled_from([b"SELECT", b"EXAMINE"])) + b" INBOX"
                     + draw(st.sampled_from([b"", b" (CONDSTORE)"])))
    return lines


@st.composite
def tag(draw: st.DrawFn, number: int) -> bytes:
    if draw(st.integers(0, 19)):
        return b"t%d" % number
    return draw(st.sampled_from([b"*", b"+", b"", b"a{", b"x" * 200, b"\xc3\xa9", b"a)"]))


@st.composite
def imap_input(draw: st.DrawFn) -> Input:
    listener = "imap/strict" if draw(st.integers(0, 6)) == 0 else "imap"
    lines = draw(prelude())
    for number in range(draw(st.integers(1, 10))):
        name, args = draw(command())
        lines.append(draw(tag(number)) + b" " + name + (b" " + args if args else b""))
    deflated = b""
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(lines)))
        lines.insert(at, b"C COMPRESS DEFLATE")
        deflated = b"".join(line + b"\r\n" for line in lines[at + 1:])
        lines = lines[:at + 1]
    plain = b"".join(line + b"\r\n" for line in lines)
    return draw(finish(listener, plain, deflated))
