"""A module for tests/test_prefork.py to run in a forked child as lightmail.workers.prefork
runs a worker: its ``main(argv)`` writes, to each descriptor number in ``argv``, that
number, the size of its standard input and that input's SHA-256."""

from __future__ import annotations

import hashlib
import os
import sys


def main(argv: list[str]) -> int:
    data = sys.stdin.buffer.read()
    digest = hashlib.sha256(data).hexdigest()
    for fd in map(int, argv):
        os.write(fd, f"{fd} {len(data)} {digest}".encode())
    return 3        # as the child's exit status
