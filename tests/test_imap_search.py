"""SEARCH, SORT and THREAD without a server: ``lightmail/imap/search.py`` and ``sort.py``.

Covers the SEARCH grammar (RFC 9051 §6.4.4, RFC 3501's extra keys, CONDSTORE MODSEQ,
SEARCHRES ``$``, WITHIN), malformed keys and charsets, matching semantics, the base
subject rules of RFC 5256 §2.1, SORT (with REVERSE and the sequence-number tie-break)
and both THREAD algorithms, including the THREAD response example of RFC 5256 §4.
Messages are a small fake with the ``ParsedMessage`` methods matching uses.
"""

from __future__ import annotations

import calendar
import email.utils
import time
from datetime import date, timedelta, timezone
from typing import Any, Optional

import pytest

from lightmail.imap import search, sort
from lightmail.imap.message import ParsedMessage
from lightmail.imap.search import (
    Address,
    Age,
    All,
    And,
    Arrival,
    BadCharset,
    Body,
    Flag,
    Header,
    Keyword,
    MessageView,
    ModSeq,
    Not,
    Numbers,
    Or,
    SearchContext,
    Sent,
    Size,
    matches,
    needs_content,
    parse_search,
    uses_modseq,
)
from lightmail.imap.sequence import parse_sequence_set
from lightmail.imap.sort import (
    base_subject,
    format_threads,
    parse_sort_criteria,
    sort_messages,
    thread_messages,
)
from lightmail.imap.tokens import Atom, ParseError


class FakeMessage:
    """The parts of ParsedMessage that searching, sorting and threading use."""

    def __init__(self, headers: Optional[dict[str, Any]] = None, body: str = "") -> None:
        self.headers = [(name, value) for name, values in (headers or {}).items()
                        for value in (values if isinstance(values, list) else [values])]
        self.body = body
        self.raw = (self.header_text() + "\r\n" + body).encode()
        self.size = len(self.raw)

    def head_octets(self) -> bytes:
        return self.header_text().encode()

    def header(self, name: str) -> list[str]:
        return [value for field, value in self.headers if field.lower() == name.lower()]

    def addresses(self, name: str) -> list[tuple[str, str, str]]:
        return ParsedMessage(self.raw).addresses(name)

    def header_text(self) -> str:
        return "".join(f"{field}: {value}\r\n" for field, value in self.headers)

    def body_text(self) -> str:
        return self.body

    def date(self) -> Optional[float]:
        values = self.header("Date")
        parsed = email.utils.parsedate_tz(values[0]) if values else None
        return None if parsed is None else float(email.utils.mktime_tz(parsed))


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return calendar.timegm((year, month, day, hour, minute, 0)) * 1000


def view(seq: int, uid: Optional[int] = None, flags: tuple[str, ...] = (),
         internal_date: int = 0, size: int = 100, modseq: int = 1) -> MessageView:
    return MessageView(seq, uid if uid is not None else seq * 10, frozenset(flags),
                       internal_date, size, modseq)


def ctx(largest_seq: int = 10, largest_uid: int = 100, **kw: Any) -> SearchContext:
    return SearchContext(largest_seq=largest_seq, largest_uid=largest_uid, **kw)


def A(*words: str) -> list[Any]:
    """Atoms, as the command parser gives them."""
    return [Atom(word) for word in words]


def key_of(args: list[Any], utf8: bool = False) -> search.Key:
    return parse_search(args, utf8=utf8)[0]


def hit(args: list[Any], msg: MessageView, content: Any = None,
        context: Optional[SearchContext] = None) -> bool:
    return matches(key_of(args), msg, context or ctx(), content)


# -- SEARCH grammar ------------------------------------------------------------------

SIMPLE = {
    "ALL": All(),
    "ANSWERED": Flag("\\Answered"), "UNANSWERED": Not(Flag("\\Answered")),
    "DELETED": Flag("\\Deleted"), "UNDELETED": Not(Flag("\\Deleted")),
    "DRAFT": Flag("\\Draft"), "UNDRAFT": Not(Flag("\\Draft")),
    "FLAGGED": Flag("\\Flagged"), "UNFLAGGED": Not(Flag("\\Flagged")),
    "SEEN": Flag("\\Seen"), "UNSEEN": Not(Flag("\\Seen")),
    "RECENT": Flag("\\Recent"), "OLD": Not(Flag("\\Recent")),
    "NEW": And((Flag("\\Recent"), Not(Flag("\\Seen")))),
}


@pytest.mark.parametrize("word", sorted(SIMPLE))
def test_keys_without_arguments(word: str) -> None:
    assert key_of(A(word)) == SIMPLE[word]
    assert key_of(A(word.lower())) == SIMPLE[word]


@pytest.mark.parametrize("args, expected", [
    (A("BCC") + ["x"], Address("Bcc", "x")),
    (A("CC", "x"), Address("Cc", "x")),
    (A("FROM") + [b"bob"], Address("From", "bob")),
    (A("SUBJECT") + ["hello world"], Header("Subject", "hello world")),
    (A("TO") + [""], Address("To", "")),
    (A("HEADER", "X-Spam") + ["yes"], Header("X-Spam", "yes")),
    (A("BODY") + ["text"], Body("text")),
    (A("TEXT") + ["text"], Body("text", with_header=True)),
    (A("KEYWORD", "$Junk"), Keyword("$Junk")),
    (A("UNKEYWORD", "$Junk"), Not(Keyword("$Junk"))),
    (A("LARGER", "1000"), Size(True, 1000)),
    (A("SMALLER", "0"), Size(False, 0)),
    (A("BEFORE", "1-Feb-2024"), Arrival("BEFORE", date(2024, 2, 1))),
    (A("ON") + ["29-feb-2024"], Arrival("ON", date(2024, 2, 29))),
    (A("SINCE", "01-Dec-1999"), Arrival("SINCE", date(1999, 12, 1))),
    (A("SENTBEFORE", "1-Jan-2020"), Sent("BEFORE", date(2020, 1, 1))),
    (A("SENTON", "1-Jan-2020"), Sent("ON", date(2020, 1, 1))),
    (A("SENTSINCE", "1-Jan-2020"), Sent("SINCE", date(2020, 1, 1))),
    (A("UID", "1:5,7"), Numbers(parse_sequence_set("1:5,7"), uid=True)),
    (A("UID", "$"), Numbers(parse_sequence_set("$"), uid=True)),
    (A("2:*"), Numbers(parse_sequence_set("2:*"))),
    (A("$"), Numbers(parse_sequence_set("$"))),
    (A("MODSEQ", "620162338"), ModSeq(620162338)),
    (A("MODSEQ") + ["/flags/\\draft"] + A("all", "620162338"),
     ModSeq(620162338, "/flags/\\draft", "all")),
    (A("OLDER", "3600"), Age(True, 3600)),
    (A("YOUNGER", "60"), Age(False, 60)),
    (A("NOT", "SEEN"), Not(Flag("\\Seen"))),
    (A("OR", "SEEN", "FLAGGED"), Or(Flag("\\Seen"), Flag("\\Flagged"))),
])
def test_keys_with_arguments(args: list[Any], expected: search.Key) -> None:
    assert key_of(args) == expected


def test_several_keys_are_anded() -> None:
    assert key_of(A("SEEN", "LARGER", "5", "1:3")) == And(
        (Flag("\\Seen"), Size(True, 5), Numbers(parse_sequence_set("1:3"))))


def test_nested_or_not_and_parentheses() -> None:
    # OR (SEEN FLAGGED) NOT OR DELETED (DRAFT NOT UID 5)
    args = A("OR") + [A("SEEN", "FLAGGED")] + A("NOT", "OR", "DELETED") + [
        A("DRAFT", "NOT", "UID", "5")]
    assert key_of(args) == Or(
        And((Flag("\\Seen"), Flag("\\Flagged"))),
        Not(Or(Flag("\\Deleted"),
               And((Flag("\\Draft"), Not(Numbers(parse_sequence_set("5"), uid=True)))))))
    assert key_of([A("SEEN")]) == Flag("\\Seen")
    assert key_of([[A("ALL")]]) == All()


def test_charset() -> None:
    assert parse_search(A("CHARSET", "UTF-8", "ALL"), utf8=False) == (All(), "UTF-8")
    assert parse_search(A("CHARSET") + ["us-ascii"] + A("ALL"), utf8=False)[1] == "US-ASCII"
    assert parse_search(A("ALL"), utf8=False)[1] == "US-ASCII"
    assert parse_search(A("ALL"), utf8=True)[1] == "UTF-8"
    # UTF8=ACCEPT: SORT and THREAD always carry a charset; UTF-8 stays fine.
    assert parse_search(A("CHARSET", "UTF-8", "SEEN"), utf8=True)[0] == Flag("\\Seen")
    with pytest.raises(BadCharset):
        parse_search(A("CHARSET", "ISO-8859-1", "ALL"), utf8=False)
    with pytest.raises(BadCharset):
        parse_search(A("CHARSET") + [b"KOI8-R"] + A("ALL"), utf8=False)
    with pytest.raises(ParseError):     # RFC 6855 §3: conflicting charset labels
        parse_search(A("CHARSET", "ISO-8859-1", "ALL"), utf8=True)


def test_literal_strings_are_utf8() -> None:
    assert key_of(A("SUBJECT") + ["café".encode()]) == Header("Subject", "café")
    with pytest.raises(ParseError, match="UTF-8"):
        key_of(A("SUBJECT") + [b"caf\xe9"])


@pytest.mark.parametrize("args, message", [
    ([], "at least one"),
    (A("CHARSET"), "charset"),
    (A("CHARSET", "UTF-8"), "at least one"),
    (A("BOGUS"), "unknown search key"),
    (["SEEN"], "atom"),
    ([b"SEEN"], "atom"),
    ([[]], "at least one"),
    (A("NOT"), "missing"),
    (A("OR", "SEEN"), "missing"),
    (A("SUBJECT"), "missing"),
    (A("SUBJECT") + [[Atom("x")]], "string"),
    (A("HEADER") + ["X-A"], "missing"),
    (A("HEADER") + ["bad field:"] + ["x"], "field name"),
    (A("HEADER") + [""] + ["x"], "field name"),
    (A("LARGER"), "missing"),
    (A("LARGER", "ten"), "number"),
    (A("LARGER") + ["10"], "number"),
    (A("LARGER", "-1"), "number"),
    (A("LARGER", "99999999999999999999"), "range"),
    (A("OLDER", "0"), "range"),
    (A("YOUNGER", "x"), "number"),
    (A("BEFORE", "2024-01-01"), "date"),
    (A("BEFORE", "1-Foo-2024"), "date"),
    (A("BEFORE", "32-Jan-2024"), "date"),
    (A("SENTON", "29-Feb-2023"), "date"),
    (A("SINCE", "1-Jan-24"), "date"),
    (A("UID"), "missing"),
    (A("UID", "1:x"), "sequence set"),
    (A("UID") + ["1:5"], "sequence set"),
    (A("0"), "sequence set"),
    (A("1,,2"), "sequence set"),
    (A("$,1"), "sequence set"),
    (A("KEYWORD") + ["quoted"], "keyword"),
    (A("KEYWORD"), "missing"),
    (A("MODSEQ"), "missing"),
    (A("MODSEQ") + ["/flags/\\Seen"] + A("mine", "5"), "entry type"),
    (A("MODSEQ") + ["/other/x"] + A("all", "5"), "entry name"),
    (A("MODSEQ") + ["/flags/\\Seen"] + A("all"), "missing"),
    (A("MODSEQ", "x"), "number"),
])
def test_malformed_keys(args: list[Any], message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_search(args, utf8=False)


def test_nesting_is_bounded() -> None:
    deep: list[Any] = A("ALL")
    for _ in range(search.MAX_NESTING + 5):
        deep = [deep]
    with pytest.raises(ParseError, match="nested"):
        parse_search(deep, utf8=False)
    with pytest.raises(ParseError, match="nested"):
        parse_search(A(*(["NOT"] * 1000), "ALL"), utf8=False)


def test_needs_content_and_uses_modseq() -> None:
    assert not needs_content(key_of(A("SEEN", "UID", "1:*", "LARGER", "5", "BEFORE",
                                      "1-Jan-2020", "OLDER", "5")))
    for args in (A("SUBJECT", "x"), A("HEADER", "X", "y"), A("BODY", "x"), A("TEXT", "x"),
                 A("SENTON", "1-Jan-2020"), A("NOT", "OR", "SEEN", "FROM", "x")):
        assert needs_content(key_of(args))
    assert uses_modseq(key_of(A("OR", "SEEN") + [A("MODSEQ", "5")]))
    assert not uses_modseq(key_of(A("SEEN")))


# -- matching -----------------------------------------------------------------------

def test_flag_keys() -> None:
    seen_recent = view(1, flags=("\\Seen", "\\Recent"))
    recent = view(2, flags=("\\Recent",))
    old_flagged = view(3, flags=("\\Flagged", "\\Answered", "\\Deleted", "\\Draft"))
    assert hit(A("SEEN"), seen_recent) and not hit(A("UNSEEN"), seen_recent)
    assert hit(A("NEW"), recent) and not hit(A("NEW"), seen_recent)
    assert hit(A("RECENT"), seen_recent) and not hit(A("OLD"), recent)
    assert hit(A("OLD"), old_flagged) and not hit(A("RECENT"), old_flagged)
    for word in ("FLAGGED", "ANSWERED", "DELETED", "DRAFT"):
        assert hit(A(word), old_flagged) and not hit(A(word), recent)
        assert hit(A("UN" + word), recent) and not hit(A("UN" + word), old_flagged)


def test_keyword_is_case_insensitive() -> None:
    msg = view(1, flags=("$Forwarded", "Work"))
    assert hit(A("KEYWORD", "$forwarded"), msg)
    assert hit(A("KEYWORD", "WORK"), msg)
    assert not hit(A("KEYWORD", "Home"), msg)
    assert hit(A("UNKEYWORD", "Home"), msg) and not hit(A("UNKEYWORD", "work"), msg)


def test_sequence_sets_and_uids() -> None:
    context = ctx(largest_seq=5, largest_uid=50)
    assert hit(A("*"), view(5), context=context)
    assert not hit(A("*"), view(4), context=context)
    assert hit(A("4:*"), view(4), context=context)
    assert hit(A("2,4:3"), view(3), context=context)
    assert not hit(A("2,4:3"), view(1), context=context)
    assert hit(A("UID", "*"), view(5, uid=50), context=context)
    # n:* with n above the largest UID still covers the largest (RFC 9051 §6.4.8).
    assert hit(A("UID", "90:*"), view(5, uid=50), context=context)
    assert not hit(A("UID", "90:*"), view(4, uid=40), context=context)
    assert hit(A("UID", "10:20,40"), view(4, uid=40), context=context)


def test_saved_result_dollar() -> None:
    # $ holds UIDs (SEARCHRES), both as a sequence set and after UID (RFC 5182).
    context = ctx(saved=[30, 70])
    assert hit(A("$"), view(3, uid=30), context=context)
    assert hit(A("UID", "$"), view(7, uid=70), context=context)
    assert not hit(A("$"), view(7, uid=31), context=context)
    assert not hit(A("$"), view(3, uid=30), context=ctx(saved=None))
    assert hit(A("NOT", "$"), view(3, uid=30), context=ctx(saved=None))


def test_size_and_modseq() -> None:
    msg = view(1, size=1000, modseq=42)
    assert hit(A("LARGER", "999"), msg) and not hit(A("LARGER", "1000"), msg)
    assert hit(A("SMALLER", "1001"), msg) and not hit(A("SMALLER", "1000"), msg)
    assert hit(A("MODSEQ", "42"), msg) and not hit(A("MODSEQ", "43"), msg)
    assert hit(A("MODSEQ") + ["/flags/\\Seen"] + A("priv", "0"), msg)


def test_internal_date_keys_use_the_date_only() -> None:
    first, last = view(1, internal_date=ms(2024, 3, 5)), \
        view(2, internal_date=ms(2024, 3, 5, 23, 59))
    for msg in (first, last):
        assert hit(A("ON", "5-Mar-2024"), msg)
        assert hit(A("SINCE", "5-Mar-2024"), msg)
        assert hit(A("BEFORE", "6-Mar-2024"), msg)
        assert not hit(A("BEFORE", "5-Mar-2024"), msg)
        assert not hit(A("SINCE", "6-Mar-2024"), msg)
        assert not hit(A("ON", "4-Mar-2024"), msg)
    # The calendar is the context's zone: 23:59 UTC is the 6th in UTC+2.
    plus_two = ctx(tz=timezone(timedelta(hours=2)))
    assert hit(A("ON", "6-Mar-2024"), last, context=plus_two)
    assert hit(A("ON", "5-Mar-2024"), first, context=plus_two)


def test_sent_date_keys_use_the_header_zone() -> None:
    # 23:30 -0800 on the 7th is the 8th in UTC; SENTON goes by the header's own date.
    late = FakeMessage({"Date": "Mon, 7 Feb 1994 23:30:00 -0800"})
    msg = view(1, internal_date=ms(2024, 1, 1))
    assert hit(A("SENTON", "7-Feb-1994"), msg, late)
    assert not hit(A("SENTON", "8-Feb-1994"), msg, late)
    assert hit(A("SENTBEFORE", "8-Feb-1994"), msg, late)
    assert hit(A("SENTSINCE", "7-Feb-1994"), msg, late)
    assert not hit(A("SENTSINCE", "8-Feb-1994"), msg, late)
    undated = FakeMessage({"Subject": "no date"})
    for word in ("SENTON", "SENTBEFORE", "SENTSINCE"):
        assert not hit(A(word, "1-Jan-2024"), msg, undated)


def test_older_and_younger() -> None:
    now = time.time()
    context = ctx(now=now)
    hour_old = view(1, internal_date=int((now - 3600) * 1000))
    assert hit(A("OLDER", "60"), hour_old, context=context)
    assert not hit(A("YOUNGER", "60"), hour_old, context=context)
    assert hit(A("YOUNGER", "7200"), hour_old, context=context)
    assert not hit(A("OLDER", "7200"), hour_old, context=context)


MAIL = FakeMessage({
    "From": "Ann Example <ann@example.org>", "To": ["bob@example.test", "cy@example.test"],
    "Cc": "Dee <dee@example.net>", "Bcc": "secret@example.net",
    "Subject": "Straße und Weiß", "X-Priority": "",
}, body="Hello Bob,\r\nthe quarterly\r\n   report is attached.\r\n")


@pytest.mark.parametrize("args, expected", [
    (A("FROM", "ANN@EXAMPLE"), True),
    (A("FROM", "bob"), False),
    (A("TO", "cy@"), True),             # the second To: field counts too
    (A("CC", "dee"), True),
    (A("BCC", "SECRET"), True),
    (A("SUBJECT") + ["STRASSE"], True),  # casefold: ß is ss
    (A("SUBJECT") + ["weiss"], True),
    (A("SUBJECT") + ["weis "], False),
    (A("HEADER", "x-priority") + [""], True),    # empty string: the field exists
    (A("HEADER", "X-Other") + [""], False),
    (A("HEADER", "subject") + ["und"], True),
    (A("BODY") + ["QUARTERLY REPORT"], True),    # white space runs count as one
    (A("BODY") + ["example.org"], False),
    (A("TEXT") + ["example.org"], True),
    (A("TEXT") + ["attached"], True),
    (A("TEXT") + ["missing"], False),
    (A("NOT", "BODY", "hello", "SEEN"), False),
])
def test_string_keys(args: list[Any], expected: bool) -> None:
    assert hit(args, view(1, flags=("\\Seen",)), MAIL) is expected


def test_content_key_without_content_is_an_error() -> None:
    with pytest.raises(TypeError):
        hit(A("BODY", "x"), view(1))


def test_or_not_and_combinations() -> None:
    msg = view(3, uid=30, flags=("\\Seen",), size=500)
    assert hit(A("OR", "FLAGGED", "SEEN"), msg)
    assert not hit(A("OR", "FLAGGED", "DELETED"), msg)
    assert hit(A("NOT", "NOT", "SEEN"), msg)
    assert hit([A("SEEN", "SMALLER", "501")] + A("UID", "30"), msg)
    assert not hit(A("SEEN") + [A("LARGER", "501")], msg)
    assert hit(A("OR") + [A("FLAGGED", "SEEN")] + A("NOT", "OR", "DELETED", "DRAFT"), msg)


def test_one_context_serves_several_keys() -> None:
    context = ctx(largest_seq=3)
    seen, star = key_of(A("SEEN")), key_of(A("*"))
    msg = view(3, flags=("\\Seen",))
    assert matches(seen, msg, context) and matches(star, msg, context)
    assert not matches(star, view(2), context)


def test_flag_and_uid_search_of_100000_messages_is_fast() -> None:
    messages = [view(n, uid=n * 2, flags=("\\Seen",) if n % 3 else ())
                for n in range(1, 100_001)]
    key = key_of(A("UNSEEN", "UID", "1:100000,150000:*", "NOT", "DELETED", "OR",
                   "KEYWORD", "x", "1:*"))
    context = ctx(largest_seq=100_000, largest_uid=200_000)
    start = time.perf_counter()
    found = [m.seq for m in messages if matches(key, m, context)]
    elapsed = time.perf_counter() - start
    assert found == [n for n in range(1, 100_001) if n % 3 == 0 and (n <= 50_000 or n >= 75_000)]
    assert elapsed < 2.0, f"{elapsed:.2f}s for 100,000 messages"


# -- base subject (RFC 5256 §2.1) ------------------------------------------------------

@pytest.mark.parametrize("subject, base", [
    ("Hello", "Hello"),
    ("Re: Hello", "Hello"),
    ("RE: re: Re:Hello", "Hello"),
    ("Fw: Hello", "Hello"),
    ("FWD: Hello", "Hello"),
    ("Re [list]: Hello", "Hello"),           # subj-refwd with a blob before ":"
    ("Re  : Hello", "Hello"),
    ("[list] Re: Hello", "Hello"),            # subj-blob before subj-refwd
    ("[list] Hello", "Hello"),                # a leading blob goes ...
    ("[list]", "[list]"),                     # ... unless nothing would be left
    ("[a] [b]", "[b]"),
    ("[a][b] Re: [c] Hello", "Hello"),
    ("Hello (fwd)", "Hello"),
    ("Hello (FWD) (fwd)  ", "Hello"),
    ("[Fwd: Hello]", "Hello"),                # step (6)
    ("Re: [Fwd: Re: Hello] (fwd)", "Hello"),
    ("[fwd: [fwd: Hello]]", "Hello"),
    ("  Hello \t  World  ", "Hello World"),   # step (1) white space
    ("Hello\r\n World", "Hello World"),
    ("Reply: Hello", "Reply: Hello"),         # "re" must be followed by ":" or a blob
    ("Fwdx: Hello", "Fwdx: Hello"),
    ("Re:", ""),
    ("", ""),
    ("Re: Hello (fwd) world", "Hello (fwd) world"),
    ("Re: Ünïcödé", "Ünïcödé"),
])
def test_base_subject(subject: str, base: str) -> None:
    assert base_subject(subject) == base


def test_reply_detection() -> None:
    assert sort._extract_subject("Re: x") == ("x", True)
    assert sort._extract_subject("x (fwd)") == ("x", True)
    assert sort._extract_subject("[Fwd: x]") == ("x", True)
    assert sort._extract_subject("[list] x ") == ("x", False)


# -- SORT (RFC 5256 §3, RFC 5957) ---------------------------------------------------

def test_parse_sort_criteria() -> None:
    assert parse_sort_criteria(A("REVERSE", "date", "SUBJECT")) == [
        (True, "DATE"), (False, "SUBJECT")]
    assert parse_sort_criteria(A(*sort.SORT_KEYS)) == [(False, k) for k in sort.SORT_KEYS]
    for bad in ([], A("REVERSE"), A("DATE", "REVERSE"), A("REVERSE", "REVERSE", "DATE"),
                A("BOGUS"), ["DATE"], Atom("DATE"), [A("DATE")]):
        with pytest.raises(ParseError):
            parse_sort_criteria(bad)


def item(seq: int, internal: int = 0, size: int = 100, **headers: Any
         ) -> tuple[MessageView, FakeMessage]:
    names = {"message_id": "Message-ID", "in_reply_to": "In-Reply-To"}
    fields = {names.get(name, name.capitalize()): value for name, value in headers.items()}
    return view(seq, internal_date=internal, size=size), FakeMessage(fields)


def seqs(views: list[MessageView]) -> list[int]:
    return [v.seq for v in views]


def test_sort_by_each_key() -> None:
    items = [
        item(1, internal=ms(2024, 1, 3), size=300, subject="Re: beta",
             date="Mon, 1 Jan 2024 10:00:00 +0000",
             **{"from": "Zed <zed@x>", "to": "al@x", "cc": "Mo <mo@x>"}),
        item(2, internal=ms(2024, 1, 1), size=100, subject="alpha",
             date="Mon, 1 Jan 2024 12:00:00 +0200",
             **{"from": "amy@x", "to": "Zoe <bo@x>", "cc": ""}),
        item(3, internal=ms(2024, 1, 2), size=200, subject="[list] Gamma",
             **{"from": "Bea <Bea@x>", "to": "", "cc": "al@x"}),
    ]
    # DATE: 2 is 10:00 UTC like 1, so they stay in sequence order both ways; 3 has
    # no Date: its internal date (2 January) is later.
    expect = {
        "ARRIVAL": ([2, 3, 1], [1, 3, 2]), "SIZE": ([2, 3, 1], [1, 3, 2]),
        "DATE": ([1, 2, 3], [3, 1, 2]), "SUBJECT": ([2, 1, 3], [3, 1, 2]),
        "FROM": ([2, 3, 1], [1, 3, 2]), "TO": ([3, 1, 2], [2, 1, 3]),
        "CC": ([2, 3, 1], [1, 3, 2]),
        "DISPLAYFROM": ([2, 3, 1], [1, 3, 2]),     # "amy@x" < "Bea" < "Zed"
        "DISPLAYTO": ([3, 1, 2], [2, 1, 3]),       # "" < "al@x" < "Zoe"
    }
    for name, (forward, backward) in expect.items():
        assert seqs(sort_messages(items, [(False, name)])) == forward, name
        assert seqs(sort_messages(items, [(True, name)])) == backward, name


def test_sort_reverse_keeps_sequence_tie_break_ascending() -> None:
    items = [item(n, size=100 if n % 2 else 200) for n in (4, 1, 3, 2, 5)]
    assert seqs(sort_messages(items, [(False, "SIZE")])) == [1, 3, 5, 2, 4]
    assert seqs(sort_messages(items, [(True, "SIZE")])) == [2, 4, 1, 3, 5]
    # DATE ties (no Date header, same internal date) stay in sequence order reversed too.
    assert seqs(sort_messages(items, [(True, "DATE")])) == [1, 2, 3, 4, 5]


def test_sort_several_criteria() -> None:
    items = [item(1, size=1, subject="b"), item(2, size=2, subject="a"),
             item(3, size=3, subject="Re: B"), item(4, size=4, subject="A")]
    assert seqs(sort_messages(items, [(False, "SUBJECT"), (True, "SIZE")])) == [4, 2, 3, 1]
    assert seqs(sort_messages(items, [(True, "SUBJECT"), (False, "SIZE")])) == [1, 3, 2, 4]
    assert seqs(sort_messages(items, [])) == [1, 2, 3, 4]


def test_collation_is_unicode_casemap() -> None:
    # RFC 5051: titlecased and decomposed, so é sorts as E plus an accent.
    items = [item(1, subject="fig"), item(2, subject="éclair"), item(3, subject="Eclair"),
             item(4, subject="DOG")]
    assert seqs(sort_messages(items, [(False, "SUBJECT")])) == [4, 3, 2, 1]
    assert sort.collation_key("Straße") == sort.collation_key("STRASSE")
    assert sort.collation_key("ǆ") == sort.collation_key("Ǆ")


# -- THREAD (RFC 5256 §4) -----------------------------------------------------------

def mail(seq: int, minute: int, message_id: str, refs: str = "", subject: str = "x",
         in_reply_to: str = "") -> tuple[MessageView, FakeMessage]:
    headers: dict[str, Any] = {
        "Message-ID": f"<{message_id}@x>" if message_id else "", "Subject": subject,
        "Date": f"Mon, 1 Jan 2024 10:{minute:02d}:00 +0000"}
    if refs:
        headers["References"] = refs if refs.startswith("<") else \
            " ".join(f"<{r}@x>" for r in refs.split())
    if in_reply_to:
        headers["In-Reply-To"] = in_reply_to
    return view(seq, uid=seq + 1000), FakeMessage(headers)


def threads(algorithm: str, items: list[Any], use_uid: bool = False) -> bytes:
    return format_threads(thread_messages(algorithm, items), use_uid)


def test_rfc5256_thread_response_example() -> None:
    # RFC 5256 §4: "(2)(3 6 (4 23)(44 7 96))" -- 6 replies to 3; 4 and 44 to 6;
    # 23 to 4; 7 to 44; 96 to 7.  Subjects differ so no merging by subject.
    items = [
        mail(2, 1, "m2", subject="first"),
        mail(3, 2, "m3", subject="second"),
        mail(6, 3, "m6", "m3", subject="Re: second"),
        mail(4, 4, "m4", "m3 m6", subject="Re: second"),
        mail(23, 5, "m23", "m3 m6 m4", subject="Re: second"),
        mail(44, 6, "m44", "m3 m6", subject="Re: second"),
        mail(7, 7, "m7", "m3 m6 m44", subject="Re: second"),
        mail(96, 8, "m96", "m3 m6 m44 m7", subject="Re: second"),
    ]
    assert threads("REFERENCES", items) == b"(2)(3 6 (4 23)(44 7 96))"
    assert threads("references", items[::-1]) == b"(2)(3 6 (4 23)(44 7 96))"
    assert threads("REFERENCES", items, use_uid=True) == \
        b"(1002)(1003 1006 (1004 1023)(1044 1007 1096))"


def test_references_missing_parent_and_in_reply_to() -> None:
    # 1 and 2 reply to a message not searched: a dummy keeps them together at the
    # top, "((1)(2))"; 3 answers 1 by In-Reply-To only.
    items = [
        mail(1, 1, "a", "gone", subject="one"),
        mail(2, 2, "b", "gone", subject="two"),
        mail(3, 3, "c", subject="three", in_reply_to="<a@x> (comment) <zz@x>"),
        mail(4, 4, "d", "gone2", subject="four"),     # lone child of a dummy: promoted
    ]
    assert threads("REFERENCES", items) == b"((1 3)(2))(4)"


def test_references_broken_chain_dummies_are_pruned() -> None:
    # 2 refers to 1 through a missing middle message: the dummy is spliced out.
    items = [mail(1, 1, "a", subject="p"), mail(2, 2, "b", "a missing", subject="q")]
    assert threads("REFERENCES", items) == b"(1 2)"


def test_references_subject_grouping() -> None:
    items = [
        mail(1, 1, "a", subject="Lunch"),
        mail(2, 2, "b", subject="Re: lunch"),    # a reply by subject only: child of 1
        mail(3, 3, "c", subject="Party"),
        mail(4, 4, "d", subject="party"),        # neither a reply: a dummy holds both
        mail(5, 5, "e", subject=""),             # empty subjects are never merged
        mail(6, 6, "f", subject="Re:"),
    ]
    assert threads("REFERENCES", items) == b"(1 2)((3)(4))(5)(6)"


def test_references_duplicate_and_missing_message_ids() -> None:
    items = [
        mail(1, 1, "same", subject="s1"),
        mail(2, 2, "same", subject="s2"),        # duplicate ID: gets a unique one
        mail(3, 3, "same-child", "same", subject="s3"),
        mail(4, 4, "", subject="s4"),            # no Message-ID at all
        mail(5, 5, "quoted", subject="s5"),
        mail(6, 6, "r", subject="s6", refs='<"quo\\ted" @ x>'),  # quoting is normalised
        mail(7, 7, "t", subject="s7", refs="<no-at-sign>"),   # not a valid message ID
    ]
    assert threads("REFERENCES", items) == b"(1 3)(2)(4)(5 6)(7)"


def test_references_loops_are_not_made() -> None:
    items = [mail(1, 1, "a", "b", subject="p"), mail(2, 2, "b", "a", subject="q"),
             mail(3, 3, "c", "c", subject="r")]
    # 1 makes a dummy for "b" its parent; 2 fills it and would be 1's child, but 1
    # already descends from it, so the link is not made; 3 cannot parent itself.
    assert threads("REFERENCES", items) == b"(2 1)(3)"


def test_references_long_chain_does_not_recurse() -> None:
    count = 5000
    items = [mail(n, 0, f"m{n}", f"m{n - 1}" if n > 1 else "", subject="chain")
             for n in range(1, count + 1)]
    expected = "(" + " ".join(str(n) for n in range(1, count + 1)) + ")"
    assert threads("REFERENCES", items).decode() == expected


def test_ordered_subject() -> None:
    items = [
        mail(1, 5, "a", subject="b thread"),
        mail(2, 1, "b", subject="a thread"),
        mail(3, 2, "c", subject="Re: b thread"),
        mail(4, 3, "d", subject="Re: B THREAD"),
        mail(5, 4, "e", subject="Re: a thread"),
        mail(6, 0, "f", subject="lonely"),
    ]
    # Threads by their first message's date: lonely (10:00), a (10:01), b (10:02 via
    # its earliest message 3); later messages are children of the first, no deeper.
    assert threads("ORDEREDSUBJECT", items) == b"(6)(2 5)(3 (4)(1))"


def test_format_threads_of_nothing() -> None:
    assert threads("REFERENCES", []) == b""
    assert threads("ORDEREDSUBJECT", []) == b""
    with pytest.raises(ParseError):
        thread_messages("BOGUS", [])


def real_hit(raw: bytes, *keys: Any) -> tuple[bool, bool]:
    """Whether a stored message matches, and whether its header had to be parsed."""
    from lightmail.imap.message import ParsedMessage
    key, _ = parse_search([Atom(k) if isinstance(k, str) and k.isupper() else k
                           for k in keys], utf8=True)
    view = MessageView(1, 1, frozenset(), 0, len(raw), 1)
    parsed = ParsedMessage(raw)
    found = matches(key, view, SearchContext(1, 1), parsed)
    return found, "_head" in parsed.__dict__ or "_root" in parsed.__dict__


def test_header_keys_skip_the_parse_only_when_the_raw_header_cannot_match() -> None:
    """Header keys look at the raw header block first and parse only those that may
    hold the needle, and still find it across folded lines, in encoded words, in
    8-bit header text and in other case."""
    plain = b"From: a@b.test\r\nSubject: Quarterly\r\n report due\r\n\r\nbody invoice\r\n"
    assert real_hit(plain, "SUBJECT", "QUARTERLY") == (True, True)      # any case
    assert real_hit(plain, "SUBJECT", "quarterly report") == (True, True)  # across the fold
    assert real_hit(plain, "SUBJECT", "quarterly  REPORT\tdue") == (True, True)
    assert real_hit(plain, "SUBJECT", "invoice") == (False, False)   # in the body only
    assert real_hit(plain, "SUBJECT", "report  quarterly") == (False, False)
    assert real_hit(plain, "FROM", "a@b.test") == (True, True)
    assert real_hit(plain, "TO", "nobody") == (False, False)
    assert real_hit(plain, "HEADER", "X-Nothing", "due") == (False, True)  # wrong field
    assert real_hit(plain, "SUBJECT", "grüße") == (False, False)     # not in ASCII text
    assert real_hit(plain, "SUBJECT", "") == (True, True)            # has the field
    assert real_hit(plain, "CC", "") == (False, True)

    encoded = b"From: a@b.test\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=\r\n\r\nx\r\n"
    assert real_hit(encoded, "SUBJECT", "köln") == (True, True)
    assert real_hit(encoded, "SUBJECT", "GRÜSSE aus") == (True, True)
    assert real_hit(encoded, "SUBJECT", "paris")[0] is False       # parsed: may decode to it
    b64 = b"From: a@b.test\r\nSubject: =?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\n\r\nx\r\n"
    assert real_hit(b64, "SUBJECT", "aus") == (True, True)          # only there once decoded
    split = b"Subject: =?utf-8?q?Quar?=\r\n =?utf-8?q?terly?=\r\n\r\n"
    assert real_hit(split, "SUBJECT", "quarterly") == (True, True)  # adjacent words join

    # RFC 6532 UTF-8 and stray Latin-1: casefolding can turn non-ASCII into ASCII.
    utf8 = "Subject: Straße \u212aelvin\u00a0Grad\r\nX-Other: caf\u00e9\r\n\r\n".encode()
    assert real_hit(utf8, "SUBJECT", "STRASSE") == (True, True)     # ß casefolds to ss
    assert real_hit(utf8, "SUBJECT", "kelvin grad") == (True, True)  # Kelvin sign, NBSP
    assert real_hit(utf8, "SUBJECT", "Café") == (False, True)       # another field
    assert real_hit(utf8, "SUBJECT", "celsius") == (False, False)
    latin1 = b"Subject: Gr\xfc\xdfe\r\nX-Utf8: Gr\xc3\xbc\xc3\x9fe Bob\r\n\r\n"
    assert real_hit(latin1, "SUBJECT", "GRÜSSE") == (True, True)
    assert real_hit(latin1, "HEADER", "X-Utf8", "grüsse bob") == (True, True)
    assert real_hit(latin1, "SUBJECT", "bob") == (False, True)
    assert real_hit(latin1, "SUBJECT", "alice") == (False, False)
    # White space that str.isspace() knows but bytes do not: \x1c between words.
    assert real_hit(b"Subject: one\x1ctwo\r\n\r\n", "SUBJECT", "one two") == (True, True)


def test_header_may_hold_never_rules_out_a_match() -> None:
    """On random header blocks of folds, encoded words, 8-bit text, odd white space
    and case: whenever the parsed header matches, the raw test said it might."""
    import random

    from lightmail.imap.message import ParsedMessage
    from lightmail.imap.search import fold, header_may_hold

    rng = random.Random(2047)
    pieces = ["ab", "Cd", " ", "\t", "\r\n ", "\r\n\t", "\n ", "\x1c", "é", "ß", "SS",
              "\u212a", "k", "\u00a0", "\u3000", ":", "=?utf-8?q?x=C3=9F?=", "=?", "?=",
              "=?iso-8859-1?q?K=F6?= ", "\xff", "Ab:Cd"]
    names = ["Subject", "X-A", "subject", "Subject "]
    checked = 0
    for _ in range(3000):
        lines = []
        for _ in range(rng.randrange(1, 4)):
            value = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 7)))
            lines.append(f"{rng.choice(names)}:{value}\r\n")
        text = "".join(lines) + "\r\n"
        raw = text.encode("latin-1", "replace") if rng.random() < 0.3 and \
            all(ord(ch) < 256 for ch in text) else text.encode()
        parsed = ParsedMessage(raw)
        head = parsed.head_octets()
        values = parsed.header("Subject")
        texts = [fold(v) for v in values] + [fold(parsed.header_text())]
        for folded in texts:
            if not folded:
                continue
            start = rng.randrange(len(folded))
            needle = folded[start:start + rng.randrange(1, 6)]
            if folded is texts[-1] and (" " in needle or ":" in needle):
                continue                    # TEXT tests the header this way only then
            assert header_may_hold(needle)(head), (raw, needle)
            checked += 1
    assert checked > 3000


def test_fold_and_matcher_agree_with_the_regular_expression() -> None:
    """fold() joins str.split() pieces and matcher() skips folding for needles
    without white space: both exactly as casefolding after \\s+ -> " " would be."""
    import random
    import re

    from lightmail.imap.search import _ASCII_WHITE_SPACE, fold, matcher

    def slow(text: str) -> str:
        return re.sub(r"\s+", " ", text).casefold()

    rng = random.Random(9051)
    alphabet = [" ", "\t", "\r\n", "\x1c", "\x85", "\xa0", "\u2003", "a", "B", "ß", "\u212a",
                "x", "\u0130", "Σ"]
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 9)))
        assert fold(text) == slow(text), repr(text)
        needle = slow("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 3))))
        assert matcher(needle)(text) == (needle in slow(text)), (needle, text)
    ascii_space = {chr(c) for c in range(128) if chr(c).isspace()}
    assert {chr(c) for c in range(128) if _ASCII_WHITE_SPACE.fullmatch(bytes([c]))} \
        == ascii_space


def test_text_and_body_keys_on_real_messages() -> None:
    """TEXT: the header (its raw test for a needle without space or colon) or the
    decoded body; BODY: the decoded body only."""
    raw = (b"From: a@b.test\r\nSubject : Quarterly\r\nContent-Type: text/plain; "
           b"charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"SW52b2ljZSBkdWU=\r\n")                  # "Invoice due"
    assert real_hit(raw, "TEXT", "quarterly")[0]
    assert real_hit(raw, "TEXT", "subject: quarterly")[0]   # as header_text() writes it
    assert real_hit(raw, "TEXT", "invoice DUE")[0]
    assert not real_hit(raw, "TEXT", "refund")[0]
    assert real_hit(raw, "BODY", "invoice")[0]
    assert not real_hit(raw, "BODY", "quarterly")[0]


def test_a_number_of_thousands_of_digits_is_out_of_range() -> None:
    with pytest.raises(ParseError, match="out of range"):
        key_of(A("LARGER", "9" * 5000))
