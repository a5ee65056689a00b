"""SPF (RFC 7208): whether a client's IP address may send mail for a domain, as the
domain's SPF record says.

:class:`SPFChecker` is made once, with LightMail's resolver, and its methods return
Deferreds that never fail:

* ``check_host(ip, domain, sender, helo)`` is RFC 7208's check_host(): one of
  ``none``, ``neutral``, ``pass``, ``fail``, ``softfail``, ``temperror``,
  ``permerror``, in an :class:`SPFResult` with the mechanism that matched, the
  explanation of a fail and a short reason;
* ``check_identities(ip, helo, mail_from)`` checks the two identities of an SMTP
  session (§2.3, §2.4): HELO first, then MAIL FROM (postmaster@HELO for the null
  sender), in an :class:`IdentityResults`.

The whole grammar is read (``record.py``: every mechanism with its qualifier and dual
CIDR lengths, redirect, exp, unknown modifiers checked then ignored; ``macros.py``:
macros with transformers, delimiters and URL escaping) and the limits of §4.6.4 are
kept (10 DNS-querying terms, 2 void lookups, 10 MX or PTR names), with an overall
time limit (``CHECK_TIME_LIMIT``).  The RFC 7208 test suite of the openspf project is
its judge (tests/test_spf_suite.py).
"""

from lightmail.policy.spf.check import (
    CHECK_TIME_LIMIT,
    DEFAULT_EXPLANATION,
    RESULTS,
    IdentityResults,
    SPFChecker,
    SPFResult,
)

__all__ = [
    "CHECK_TIME_LIMIT",
    "DEFAULT_EXPLANATION",
    "RESULTS",
    "IdentityResults",
    "SPFChecker",
    "SPFResult",
]
