"""One pass over a block of DATA lines: what SMTP needs to know of them.

A 100 KB message is about 1,300 lines, and SMTP must look at every one of them: does it
end with CR LF (RFC 5321 §2.3.8: a bare CR or LF is refused, which also closes the SMTP
smuggling hole), is it longer than allowed (§4.5.3.1.6), does it start with a dot (the
transparency of §4.5.2, and the end of the data).  Python's bytes methods do each of
these in a C loop, but a loop of its own per question, and the questions about pairs of
bytes ("\\r\\n", "\\n.") run at a third of a byte per step: together they were the
largest cost of receiving a big message (260 us per 100 KB).  numpy answers all of them
from one comparison per byte and a few on the line ends (about 40 us).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# numpy's BLAS (OpenBLAS), which nothing here calls, would otherwise start a thread per
# core in every process as numpy is imported, and the main process must have no
# thread when it forks its workers (lightmail.workers.prefork).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np

_LF, _CR, _DOT = 10, 13, 46


@dataclass(frozen=True)
class LineScan:
    """What :func:`scan_lines` found in a block of complete lines."""

    bare_newline: bool     # a CR or an LF that is not part of a CR LF
    too_long: bool         # a line longer than the limit, its CR LF included
    dots: list[int]        # where the lines that start with a dot start


def scan_lines(block: bytes, limit: int) -> LineScan:
    """Scan ``block``: whole lines, the first starting at offset 0, the last ending
    with an LF (so a CR LF is never split between two blocks)."""
    # Array methods rather than numpy's functions: each function call costs a few
    # microseconds of Python around the C, as much as the scan of a 4 KB block.
    octets = np.frombuffer(block, dtype=np.uint8)
    ends = (octets == _LF).nonzero()[0]        # never empty: the block ends with LF
    bare = bool(ends[0] == 0 or np.count_nonzero(octets == _CR) != len(ends)
                or not (octets[ends - 1] == _CR).all())
    too_long = int(ends[0]) + 1 > limit or (
        len(ends) > 1 and int((ends[1:] - ends[:-1]).max()) > limit)
    starts = ends[:-1] + 1
    dots: list[int] = starts[octets[starts] == _DOT].tolist()
    if block[:1] == b".":
        dots.insert(0, 0)
    return LineScan(bare, bool(too_long), dots)


def undot(block: bytes, dots: list[int]) -> bytes:
    """``block`` without the leading dot of the lines at ``dots`` (RFC 5321 §4.5.2)."""
    if not dots:
        return block
    pieces = []
    start = 0
    for dot in dots:
        pieces.append(block[start:dot])
        start = dot + 1
    pieces.append(block[start:])
    return b"".join(pieces)


def bare_line_ends(data: bytes, cr_before: bool) -> tuple[bool, bool]:
    """For a chunk of BDAT content (RFC 3030: no dot-stuffing, any octets): whether it
    holds a CR or LF that is not part of a CR LF, and whether it ends with a CR whose
    LF may start the next chunk.  ``cr_before``: the previous chunk ended so.  Bare
    line ends are refused in BDAT as in DATA (RFC 5321 §2.3.8): relayed onward, they
    could end a receiver's DATA early (SMTP smuggling)."""
    if cr_before:
        data = b"\r" + data
    pairs = data.count(b"\r\n")
    ends_with_cr = data.endswith(b"\r")
    bare = (data.count(b"\n") != pairs
            or data.count(b"\r") != pairs + ends_with_cr)
    return bare, ends_with_cr
