"""Organizational domains (RFC 7489 §3.2) from the Public Suffix List, with the
``publicsuffixlist`` package.

The list changes every week or so, and LightMail should not need a release for it:
``[dmarc] public_suffix_list`` names a copy of publicsuffix.org's file that the
administrator keeps fresh (docs/operations.rst: a cron job and ``lightmail
reload``), read at start-up and by each reload; without it, the list shipped with
the package serves.  Parsing the list takes some 70 ms, so a reload reads it in a
thread (lightmail/reload/parts.py).

The whole list counts, its private section too (``github.io``, ``blogspot.com``: each
of their subdomains is an organization of its own), as the list's own guidance and
most DMARC implementations have it.  A name under a suffix the list does not know is
treated as under a one-label suffix (the list's implicit ``*`` rule); a name that is
itself a public suffix is its own organizational domain.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

from publicsuffixlist import PublicSuffixList


class SuffixListError(Exception):
    """The Public Suffix List file cannot be used; the message says why."""


class PublicSuffixes:
    """One reading of the Public Suffix List.  Thread-safe once made."""

    def __init__(self, suffixes: PublicSuffixList, source: str) -> None:
        self._suffixes = suffixes
        #: Where the list came from (a path, or "the publicsuffixlist package").
        self.source = source

    def organizational_domain(self, domain: str) -> str:
        """The organizational domain of ``domain`` (lower case, without a final dot;
        the domain itself when it is a public suffix)."""
        domain = domain.lower().rstrip(".")
        if not domain:
            return domain
        return self._suffixes.privatesuffix(domain) or domain

    def aligned(self, one: str, other: str, strict: bool) -> bool:
        """§3.1 identifier alignment: strict, the same name; relaxed, the same
        organizational domain."""
        one, other = one.lower().rstrip("."), other.lower().rstrip(".")
        if not one or not other:
            return False
        if strict or one == other:
            return one == other
        return self.organizational_domain(one) == self.organizational_domain(other)


def read_suffix_list(path: Path) -> list[str]:
    """The lines of the list file at ``path``, checked: raises
    :class:`SuffixListError` when it cannot be read or holds no rule (a few
    milliseconds: the configuration's validation calls it)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SuffixListError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise SuffixListError(f"{path} is not UTF-8 text: not a Public Suffix List "
                              "file") from None
    if not any(line.strip() and not line.lstrip().startswith("//") for line in lines):
        raise SuffixListError(f"{path} holds no rule: not a Public Suffix List file "
                              "(an empty download?)")
    return lines


def load_suffixes(path: Optional[Path] = None) -> PublicSuffixes:
    """The list in ``path`` (None: the package's own), parsed (some 70 ms).  Raises
    :class:`SuffixListError` as :func:`read_suffix_list`."""
    if path is None:
        return _package_list()
    return PublicSuffixes(PublicSuffixList(read_suffix_list(path)), str(path))


@functools.cache
def _package_list() -> PublicSuffixes:
    """The package's list, parsed once per process (it never changes while LightMail
    runs): some 2 MB, and the worker processes forked from the main one share its
    copy (lightmail.workers.prefork)."""
    return PublicSuffixes(PublicSuffixList(), "the publicsuffixlist package")
