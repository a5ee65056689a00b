"""The mail that carries a DMARC aggregate report (RFC 7489 §7.2.1.1), and the error
report sent instead when a report is larger than a destination accepts (§7.2.2).

A report message is multipart/mixed: a short text/plain part for a person, and the
gzip'ed XML as an application/gzip attachment named as §7.2.1.1 says; its Subject
is "Report Domain: <policy domain> Submitter: <receiver> Report-ID: <id>".  Both
kinds are marked ``Auto-Submitted: auto-generated`` (RFC 3834), so that
autoresponders keep quiet.
"""

from __future__ import annotations

import email.policy
import email.utils
from email.message import EmailMessage

_POLICY = email.policy.SMTP.clone(max_line_length=78)


def report_message(*, sender: str, to: str, receiver: str, policy_domain: str,
                   report_id: str, begin: int, end: int, filename: str,
                   report: bytes, now: float) -> bytes:
    """The message of one aggregate report (``report``: the gzip'ed XML)."""
    message = _headers(sender, to, receiver, now,
                       f"Report Domain: {policy_domain} Submitter: {receiver} "
                       f"Report-ID: <{report_id}>")
    message.set_content(
        f"This is a DMARC aggregate report (RFC 7489) from {receiver} for "
        f"{policy_domain},\ncovering {_when(begin)} to {_when(end)}.\n"
        f"The report is the attached {filename}.\n")
    message.add_attachment(report, maintype="application", subtype="gzip",
                           filename=filename)
    return message.as_bytes(policy=_POLICY)


def error_report_message(*, sender: str, to: str, receiver: str, policy_domain: str,
                         report_id: str, size: int, uri: str, now: float) -> bytes:
    """§7.2.2: the report for ``uri`` was not sent, being larger than its limit."""
    message = _headers(sender, to, receiver, now,
                       f"Error Report Domain: {policy_domain} Submitter: {receiver} "
                       f"Report-ID: <{report_id}>")
    message.set_content(
        f"Report-Date: {email.utils.formatdate(now)}\n"
        f"Report-Domain: {policy_domain}\n"
        f"Report-ID: {report_id}\n"
        f"Report-Size: {size}\n"
        f"Submitter: {receiver}\n"
        f"Submitting-URI: {uri}\n"
        "\nThe DMARC aggregate report was not sent: it is larger than this URI's "
        "size limit.\n")
    return message.as_bytes(policy=_POLICY)


def _headers(sender: str, to: str, receiver: str, now: float,
             subject: str) -> EmailMessage:
    message = EmailMessage(policy=_POLICY)
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(now)
    message["Message-ID"] = email.utils.make_msgid("dmarc", domain=receiver)
    message["Auto-Submitted"] = "auto-generated"
    return message


def _when(timestamp: int) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)
