"""DMARC (RFC 7489, with RFC 9091's np=) for incoming mail: the verdict on a message
from its From: domain's policy and its SPF and DKIM results, and the aggregate
reports sent to the domains that ask for them.

One module per task:

* ``record.py``: the policy record (§6.3, §6.4), read leniently (§6.6.3);
* ``orgdomain.py``: organizational domains from the Public Suffix List (§3.2), the
  list file reloadable (``[dmarc] public_suffix_list``);
* ``headerfrom.py``: the RFC5322.From domain of a message (§6.6.1);
* ``discovery.py``: finding the record (§6.6.3) through lightmail.dns;
* ``check.py``: alignment (§3.1), the verdict, pct= sampling (§6.6.4) and local
  enforcement (``[dmarc] enforce``, ``domain_actions``): :class:`DMARCChecker`;
* ``store.py``, ``xmlreport.py``, ``reportmail.py``, ``destinations.py``,
  ``reports.py``: aggregate reports (§7.1, §7.2, Appendix C): :class:`DMARCReports`
  (:class:`IDMARCReports`) and the :class:`ReportService` that sends them.

The policy chain (lightmail/smtp/policy.py) calls ``services.dmarc.header_from()``,
``services.dmarc.check()`` and ``services.dmarc_reports.record()``.
"""

from lightmail.policy.dmarc.check import (
    CHECK_TIME_LIMIT,
    DISPOSITIONS,
    OVERRIDE_TYPES,
    RESULTS,
    DKIMOutcome,
    DMARCChecker,
    DMARCResult,
    Enforcement,
    OverrideReason,
)
from lightmail.policy.dmarc.headerfrom import HeaderFrom, header_from
from lightmail.policy.dmarc.interfaces import IDMARCReports
from lightmail.policy.dmarc.orgdomain import (
    PublicSuffixes,
    SuffixListError,
    load_suffixes,
    read_suffix_list,
)
from lightmail.policy.dmarc.record import (
    DMARCRecord,
    DMARCSyntaxError,
    ReportURI,
    parse_record,
)
from lightmail.policy.dmarc.reports import (
    DMARCReports,
    ReportRun,
    ReportService,
    ReportSettings,
    SentReport,
)

__all__ = [
    "CHECK_TIME_LIMIT",
    "DISPOSITIONS",
    "OVERRIDE_TYPES",
    "RESULTS",
    "DKIMOutcome",
    "DMARCChecker",
    "DMARCRecord",
    "DMARCReports",
    "DMARCResult",
    "DMARCSyntaxError",
    "Enforcement",
    "HeaderFrom",
    "IDMARCReports",
    "OverrideReason",
    "PublicSuffixes",
    "ReportRun",
    "ReportService",
    "ReportSettings",
    "ReportURI",
    "SentReport",
    "SuffixListError",
    "header_from",
    "load_suffixes",
    "parse_record",
    "read_suffix_list",
]
