"""Sequence sets (RFC 9051 §9 ``sequence-set``): ``1,3:5,7:*`` and ``$`` (RFC 5182).

A set is parsed once and resolved against the mailbox at hand: ``*`` is the largest
message number (or UID) in use, and ``n:m`` is the same as ``m:n``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass

from lightmail.imap.tokens import ParseError

STAR = -1
_RANGE = re.compile(r"^(\d+|\*)(?::(\d+|\*))?$", re.ASCII)
MAX_NUMBER = 0xFFFFFFFF


@dataclass(frozen=True)
class SequenceSet:
    """Ranges of numbers; STAR stands for "the largest in use"."""

    ranges: tuple[tuple[int, int], ...]
    saved: bool = False          # "$": the result saved by SEARCHRES

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """The ranges with ``*`` replaced by ``largest``, each (low, high)."""
        out = []
        for low, high in self.ranges:
            low = largest if low == STAR else low
            high = largest if high == STAR else high
            out.append((min(low, high), max(low, high)))
        return out

    def contains(self, number: int, largest: int) -> bool:
        return any(low <= number <= high for low, high in self.resolve(largest))

    def select_sorted(self, numbers: Sequence[int], largest: int) -> list[int]:
        """The members of ``numbers`` (a sorted list, no repeats) that are in the set,
        ascending: each range is found by bisection, not by testing every member (a
        UID FETCH of a few messages in a mailbox of 100,000)."""
        out: list[int] = []
        taken = 0           # numbers[:taken] are decided
        for low, high in sorted(self.resolve(largest)):
            start = max(bisect.bisect_left(numbers, low, taken), taken)
            end = bisect.bisect_right(numbers, high, start)
            if end > start:
                out.extend(numbers[start:end])
                taken = end
        return out

    def select(self, numbers: Iterable[int], largest: int) -> Iterator[int]:
        """The members of ``numbers`` (sorted ascending) that are in the set."""
        ranges = self.resolve(largest)
        for number in numbers:
            if any(low <= number <= high for low, high in ranges):
                yield number


def parse_sequence_set(text: str) -> SequenceSet:
    """Parse ``text``; raises ParseError for anything that is not a sequence set."""
    if text == "$":
        return SequenceSet((), saved=True)
    ranges = []
    for part in text.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise ParseError(f"invalid sequence set {str(text)[:40]!r}")
        low = _number(match.group(1), text)
        high = _number(match.group(2), text) if match.group(2) else low
        ranges.append((low, high))
    return SequenceSet(tuple(ranges))


def _number(text: str, whole: str) -> int:
    if text == "*":
        return STAR
    # (int() of thousands of digits would raise ValueError, not ParseError.)
    value = int(text) if len(text.lstrip("0")) <= 10 else MAX_NUMBER + 1
    if value == 0 or value > MAX_NUMBER:
        raise ParseError(f"invalid number in sequence set {str(whole)[:40]!r}")
    return value


def format_sequence(numbers: Iterable[int]) -> str:
    """Compact numbers into ``1:3,5`` form, ascending (UIDPLUS, ESEARCH, VANISHED,
    MODIFIED).  One pass over numbers that are ascending already (the usual case:
    a mailbox's UIDs), about 25 ns a number: 300,000 UIDs in a few milliseconds."""
    return format_ranges(number_ranges(numbers))


def number_ranges(numbers: Iterable[int]) -> list[tuple[int, int]]:
    """The runs of consecutive numbers in ``numbers``, ascending, each (low, high)."""
    if not isinstance(numbers, (list, tuple)):
        numbers = list(numbers)
    out: list[tuple[int, int]] = []
    if not numbers:
        return out
    iterator = iter(numbers)
    start = prev = next(iterator)
    for number in iterator:
        if number == prev + 1:
            prev = number
        elif number > prev:
            out.append((start, prev))
            start = prev = number
        else:           # not ascending (or a repeat): sort them once, then again
            return number_ranges(sorted(set(numbers)))
    out.append((start, prev))
    return out


def format_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    """``[(1, 3), (5, 5)]`` as ``1:3,5``."""
    return ",".join([f"{low}" if low == high else f"{low}:{high}" for low, high in ranges])


def format_copyuid(source: Sequence[tuple[int, int]],
                   target: Sequence[tuple[int, int]]) -> str:
    """COPYUID's two uid-sets (RFC 4315 §3), source then destination: the n-th UID of
    the first was copied to the n-th UID of the second.  Both sets are ascending, so
    each compressed on its own keeps that pairing (``1:3,7 10:13``, as Dovecot
    says it), where a list of every UID took megabytes for a big COPY."""
    return f"{format_ranges(source)} {format_ranges(target)}"


def formatting_sequence(numbers: Sequence[int], step: int) -> Generator[None, None, str]:
    """:func:`format_sequence` in steps of ``step`` numbers (a generator whose value
    is the text), for the reactor: VANISHED or ESEARCH ALL of 300,000 UIDs.  Made for
    ascending numbers; others give a set that is right but less compact."""
    ranges: list[tuple[int, int]] = []
    for start in range(0, len(numbers), step):
        part = number_ranges(numbers[start:start + step])
        if ranges and part and part[0][0] == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], part.pop(0)[1])
        ranges += part
        yield
    return format_ranges(ranges)
