"""Delivery status notifications (RFC 3464, RFC 3461, RFC 6533): pure functions, no I/O.

``build_dsn`` writes the whole notification as bytes with CRLF line endings:

* the outer header, from ``MAILER-DAEMON@<reporting_mta>`` to the original sender,
  ``Auto-Submitted: auto-replied`` (RFC 3834), subjects as Postfix words them;
* a ``multipart/report`` (RFC 6522) of three parts: a human explanation in the manner
  of Postfix's bounce text, the ``message/delivery-status`` fields, and the returned
  message, embedded byte for byte (see ``build_dsn`` for what is returned when);
* with SMTPUTF8 and a non-ASCII address or header, the internationalized types of
  RFC 6533: ``message/global-delivery-status``, ``message/global`` and
  ``message/global-headers``, with ``utf-8`` addresses in UTF-8.

``should_notify`` applies a recipient's NOTIFY parameter (RFC 3461 §4.1) and
``is_bounce_loop`` says that mail from the null sender is never answered with a DSN.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import Optional

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded"})

# When the sender gave no RET (RFC 3461 §4.3 leaves the choice to the MTA), a failure
# notice returns the whole message up to this size and only its header beyond.
FULL_RETURN_LIMIT = 100 * 1024

_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_CRLF = b"\r\n"


@dataclass(frozen=True)
class RecipientStatus:
    """What happened to one recipient, for its per-recipient block."""

    address: str                        # final recipient (as queued)
    action: str                         # failed, delayed, delivered, relayed, expanded
    status: str                         # enhanced status code (RFC 3463), e.g. "5.1.1"
    diagnostic: Optional[str]           # e.g. "smtp; 550 5.1.1 <x@y>: user unknown"
    orcpt: Optional[str] = None         # RFC 3461 ORCPT as queued, e.g. "rfc822;x@y"
    remote_mta: Optional[str] = None    # e.g. "mx.example.org"
    last_attempt: Optional[float] = None  # Unix time
    # For a "delayed" recipient: when the MTA will give up (Unix time, RFC 3464 §2.3.9).
    will_retry_until: Optional[float] = None


def is_bounce_loop(mail_from: str) -> bool:
    """Whether a notification about this message must not be sent: the null reverse
    path ("" or "<>") is never sent a DSN (RFC 5321 §4.5.5 and §6.1, RFC 3464 §2)."""
    return mail_from.strip() in ("", "<>")


def should_notify(notify: Optional[str], action: str, *, delay_by_default: bool = True) -> bool:
    """Whether a recipient's NOTIFY parameter (RFC 3461 §4.1) asks for a DSN on ``action``.

    ``None`` (no NOTIFY) means FAILURE, plus DELAY when ``delay_by_default`` (the RFC
    leaves that to the MTA); ``NEVER`` means none; otherwise the listed kinds, any
    case: SUCCESS covers delivered, relayed and expanded, FAILURE failed, DELAY delayed.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")
    if notify is None:
        kinds = {"FAILURE", "DELAY"} if delay_by_default else {"FAILURE"}
    else:
        kinds = {item.strip().upper() for item in notify.split(",")}
        unknown = kinds - {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
        if unknown or not notify.strip():
            raise ValueError(f"bad NOTIFY value {notify!r}")
        if "NEVER" in kinds:
            return False
    if action in SUCCESS_ACTIONS:
        return "SUCCESS" in kinds
    return ("FAILURE" if action == "failed" else "DELAY") in kinds


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    queue_id: str,
    arrival: float,
    recipients: list[RecipientStatus],
    original: bytes,
    ret: Optional[str],
    envid: Optional[str],
    smtputf8: bool = False,
    now: Optional[float] = None,
) -> bytes:
    """The complete notification (RFC 5322 message, CRLF line endings) for ``recipients``.

    What of the original comes back in the third part:

    * a notice with at least one failed recipient: the whole message as
      ``message/rfc822`` with RET=FULL, its header block as ``text/rfc822-headers``
      with RET=HDRS; without RET the whole message when it is at most
      ``FULL_RETURN_LIMIT`` (100 KiB) and only its header block when larger (RFC 3461
      §4.3 leaves it to the MTA; Postfix too limits what it returns, with
      ``bounce_size_limit``; a message is never truncated here, so what comes back is
      always exact);
    * a notice of delays or successes only: the header block, whatever RET says
      (RFC 3461 §4.3: RET applies to failures).

    The original goes in byte for byte (a message stored with bare LF line endings
    gets CRLF: the wire form).  A part with 8-bit octets is labelled
    ``Content-Transfer-Encoding: 8bit`` (the notice then needs 8BITMIME to travel, as
    Postfix's do), one with a line over 998 octets ``binary``.

    ENVID and ORCPT are taken as queued (xtext, RFC 3461 §4) and decoded for the
    Original-Envelope-Id and Original-Recipient fields.  Raises ValueError for the null
    sender (see ``is_bounce_loop``), no recipients, an unknown action or a malformed
    status code.
    """
    if is_bounce_loop(original_sender):
        raise ValueError("no DSN is sent to the null reverse path")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    for rcpt in recipients:
        if rcpt.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {rcpt.action!r} for {rcpt.address}")
        if not _STATUS.match(rcpt.status):
            raise ValueError(f"bad enhanced status code {rcpt.status!r} for {rcpt.address}")
    if ret is not None and ret.upper() not in ("FULL", "HDRS"):
        raise ValueError(f"bad RET value {ret!r}")
    now = time.time() if now is None else now
    original = _crlf(original)
    headers = _header_block(original)
    envid = _xtext_decode(envid) if envid is not None else None
    orcpts = [_orcpt(r.orcpt) for r in recipients]

    addresses = [original_sender] + [r.address for r in recipients]
    addresses += [value for _, value in filter(None, orcpts)]
    utf8 = smtputf8 and (
        not all(a.isascii() for a in addresses)
        or not headers.isascii()
        or (envid is not None and not envid.isascii())
    )

    actions = {r.action for r in recipients}
    failed = "failed" in actions
    if failed:
        subject = "Undelivered Mail Returned to Sender"
    elif "delayed" in actions:
        subject = "Delayed Mail (still being retried)"
    else:
        subject = "Successful Mail Delivery Report"
    ret = ret.upper() if ret else None
    full = failed and (ret == "FULL" or (ret is None and len(original) <= FULL_RETURN_LIMIT))

    tag = re.sub(r"[^A-Za-z0-9]", "", queue_id)[:40] or "dsn"
    boundary = _boundary(tag, original)
    report_type = "global-delivery-status" if utf8 else "delivery-status"

    # Part 1: the explanation for people.
    text = _human_text(reporting_mta, recipients, failed, actions)
    text_bytes = text.encode("utf-8")
    text_header = [f"Content-Description: {_description(failed, actions)}",
                   "Content-Type: text/plain; charset="
                   + ("us-ascii" if text.isascii() else "utf-8")]
    if not text.isascii():
        text_header.append("Content-Transfer-Encoding: 8bit")

    # Part 2: the machine-readable status.
    status = _status_fields(reporting_mta, queue_id, original_sender, arrival, envid,
                            recipients, orcpts, utf8)
    status_header = ["Content-Description: Delivery report",
                     f"Content-Type: message/{report_type}"]
    if not status.isascii():
        status_header.append("Content-Transfer-Encoding: 8bit")

    # Part 3: the returned message or its header block.
    if full:
        returned = original
        returned_header = ["Content-Description: Undelivered Message",
                           "Content-Type: message/" + ("global" if utf8 else "rfc822")]
    else:
        returned = headers
        description = ("Undelivered Message Headers" if failed
                       else "Message Headers")
        returned_header = [f"Content-Description: {description}",
                           "Content-Type: " + ("message/global-headers" if utf8
                                               else "text/rfc822-headers")]
    returned_cte = _transfer_encoding(returned)
    if returned_cte != "7bit":
        returned_header.append(f"Content-Transfer-Encoding: {returned_cte}")

    outer_cte = _widest([returned_cte, "7bit" if text.isascii() else "8bit",
                         "7bit" if status.isascii() else "8bit"])
    message_id = f"<{_stamp(now)}.{tag}.{secrets.token_hex(4)}@{reporting_mta}>"
    outer = [
        f"Date: {_date(now)}",
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{_clean(original_sender, utf8)}>",
        f"Subject: {subject}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type={report_type};",
        f'\tboundary="{boundary}"',
    ]
    if outer_cte != "7bit":
        outer.append(f"Content-Transfer-Encoding: {outer_cte}")

    delimiter = b"--" + boundary.encode("ascii")
    out = [_lines(outer), _CRLF,
           b"This is a MIME-encapsulated message.\r\n", _CRLF,
           delimiter, _CRLF, _lines(text_header), _CRLF, _crlf(text_bytes), _CRLF,
           delimiter, _CRLF, _lines(status_header), _CRLF, status.encode("utf-8"), _CRLF,
           delimiter, _CRLF, _lines(returned_header), _CRLF, returned, _CRLF,
           delimiter, b"--", _CRLF]
    return b"".join(out)


# -- the parts ---------------------------------------------------------------------------

def _description(failed: bool, actions: set[str]) -> str:
    if failed:
        return "Notification"
    if "delayed" in actions:
        return "Delay notification"
    return "Delivery report"


def _human_text(reporting_mta: str, recipients: Sequence[RecipientStatus], failed: bool,
                actions: set[str]) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if failed:
        lines += ["I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients. It's attached below.", "",
                  "For further assistance, please send mail to postmaster.", "",
                  "If you do so, please include this problem report. You can",
                  "delete your own text from the attached returned message."]
    elif "delayed" in actions:
        lines += ["####################################################################",
                  "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
                  "####################################################################",
                  "",
                  "Your message could not be delivered yet to the recipients below."]
        until = [r.will_retry_until for r in recipients
                 if r.action == "delayed" and r.will_retry_until is not None]
        if until:
            lines += ["The mail system will keep trying until",
                      f"{_date(max(until))} and tell you if it gives up."]
        else:
            lines += ["The mail system will keep trying and tell you if it gives up."]
    else:
        lines += ["Your message was successfully delivered to the destination(s)",
                  "listed below. If the message was delivered to mailbox you will",
                  "receive no further notifications. Otherwise you may still receive",
                  "notifications of mail delivery errors from other systems."]
    lines += ["", "                   The mail system", ""]
    for rcpt in recipients:
        lines.append(f"<{rcpt.address}>: {_explain(rcpt)}")
        lines.append("")
    return "\r\n".join(lines)


def _explain(rcpt: RecipientStatus) -> str:
    said = _one_line(_diagnostic(rcpt.diagnostic)[1]) if rcpt.diagnostic else ""
    if rcpt.action in SUCCESS_ACTIONS:
        what = {"delivered": "delivered", "relayed": "relayed to a system without DSN",
                "expanded": "expanded"}[rcpt.action]
        via = f" via {rcpt.remote_mta}" if rcpt.remote_mta else ""
        return f"{what}{via}" + (f": {said}" if said else f" ({rcpt.status})")
    if rcpt.remote_mta and said:
        return f"host {rcpt.remote_mta} said: {said}"
    if said:
        return said
    kind = "delivery failed" if rcpt.action == "failed" else "delivery delayed"
    return f"{kind}, status {rcpt.status}"


def _status_fields(reporting_mta: str, queue_id: str, sender: str, arrival: float,
                   envid: Optional[str], recipients: Sequence[RecipientStatus],
                   orcpts: Sequence[Optional[tuple[str, str]]], utf8: bool) -> str:
    per_message = [f"Reporting-MTA: dns; {reporting_mta}",
                   f"X-LightMail-Queue-ID: {queue_id}",
                   f"X-LightMail-Sender: {_address_field(sender, utf8)}"]
    if envid is not None:
        per_message.append(f"Original-Envelope-Id: {_clean(envid, utf8)}")
    per_message.append(f"Arrival-Date: {_date(arrival)}")
    blocks = [per_message]
    for rcpt, orcpt in zip(recipients, orcpts, strict=True):
        block = [f"Final-Recipient: {_address_field(rcpt.address, utf8)}"]
        if orcpt is not None:
            kind, value = orcpt
            if kind.lower() == "rfc822" and not value.isascii():
                kind = "utf-8"
            block.append(f"Original-Recipient: {kind}; {_clean(value, utf8)}")
        block += [f"Action: {rcpt.action}", f"Status: {rcpt.status}"]
        if rcpt.remote_mta:
            block.append(f"Remote-MTA: dns; {_clean(rcpt.remote_mta, utf8)}")
        if rcpt.diagnostic:
            kind, value = _diagnostic(rcpt.diagnostic)
            block.append(_fold(f"Diagnostic-Code: {kind}; {_clean(value, utf8)}"))
        if rcpt.last_attempt is not None:
            block.append(f"Last-Attempt-Date: {_date(rcpt.last_attempt)}")
        if rcpt.will_retry_until is not None and rcpt.action == "delayed":
            block.append(f"Will-Retry-Until: {_date(rcpt.will_retry_until)}")
        blocks.append(block)
    return "".join("\r\n".join(block) + "\r\n\r\n" for block in blocks)[:-2]


def _address_field(address: str, utf8: bool) -> str:
    """An address-type and address for Final-Recipient and the like: ``rfc822`` for
    ASCII, ``utf-8`` for the rest (RFC 6533 §3), as UTF-8 in a global DSN and as
    ``utf-8-addr-xtext`` (``\\x{HEX}``) in a plain one."""
    if address.isascii():
        return f"rfc822; {_clean(address, utf8)}"
    return f"utf-8; {_clean(address, utf8)}"


# -- helpers -------------------------------------------------------------------------------

def _orcpt(orcpt: Optional[str]) -> Optional[tuple[str, str]]:
    if not orcpt:
        return None
    kind, semicolon, value = orcpt.partition(";")
    if not semicolon:
        return ("rfc822", _xtext_decode(kind.strip()))
    return (kind.strip(), _xtext_decode(value.strip()))


def _xtext_decode(value: str) -> str:
    """Undo xtext (RFC 3461 §4): "+HH" (upper-case hex) is the octet HH; the octets are
    UTF-8.  A value made locally, never encoded, has no such sequences and stays."""
    if "+" not in value:
        return value
    parts = _XTEXT_HEX.split(value)
    raw = b"".join(bytes([int(part, 16)]) if index % 2 else part.encode("utf-8")
                   for index, part in enumerate(parts))
    return raw.decode("utf-8", "replace")


def _diagnostic(diagnostic: str) -> tuple[str, str]:
    """(diagnostic-type, text) of a Diagnostic-Code; untyped text is X-LightMail's."""
    kind, semicolon, text = diagnostic.partition(";")
    if semicolon and re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", kind.strip()):
        return kind.strip(), text.strip()
    return "X-LightMail", diagnostic.strip()


def _clean(value: str, utf8: bool) -> str:
    """One line of header text: no control characters; non-ASCII kept in a global DSN
    and written as ``\\x{HEX}`` (RFC 6533 §3, utf-8-addr-xtext) in a plain one."""
    value = _one_line(value)
    if utf8 or value.isascii():
        return value
    return "".join(ch if ch.isascii() else f"\\x{{{ord(ch):X}}}" for ch in value)


def _one_line(value: str) -> str:
    return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", value).split())


def _fold(line: str, width: int = 78) -> str:
    """Fold a long field at spaces (unfolding gives the same text back)."""
    if len(line) <= width:
        return line
    out, current = [], ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > width:
            out.append(current)
            current = " " + word
        else:
            current = f"{current} {word}" if current else word
    out.append(current)
    return "\r\n".join(out)


def _crlf(data: bytes) -> bytes:
    """``data`` with every bare LF made CRLF (a no-op for wire-format messages)."""
    if b"\n" not in data.replace(_CRLF, b""):
        return data
    return re.sub(rb"(?<!\r)\n", _CRLF, data)


def _header_block(message: bytes) -> bytes:
    """The header fields of a CRLF message, each with its CRLF, without the blank line."""
    if not message or message.startswith(_CRLF):
        return b""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message if message.endswith(_CRLF) else message + _CRLF
    return message[:end + 2]


def _transfer_encoding(data: bytes) -> str:
    if any(len(line) > 998 for line in data.split(_CRLF)) or b"\0" in data:
        return "binary"
    return "7bit" if data.isascii() else "8bit"


def _widest(encodings: Iterable[str]) -> str:
    order = ["7bit", "8bit", "binary"]
    return max(encodings, key=order.index)


def _boundary(tag: str, original: bytes) -> str:
    while True:
        boundary = f"{tag}.{secrets.token_hex(12)}/LightMail"
        if boundary.encode() not in original:
            return boundary


def _date(timestamp: float) -> str:
    """RFC 5322 date-time in the local time zone, as Postfix writes it."""
    return format_datetime(datetime.fromtimestamp(timestamp).astimezone())


def _stamp(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y%m%d%H%M%S")


def _lines(fields: Sequence[str]) -> bytes:
    return "".join(field + "\r\n" for field in fields).encode("utf-8")
