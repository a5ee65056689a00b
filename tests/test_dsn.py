"""Delivery status notifications (lightmail.outbound.dsn), read back with the email package."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from email.parser import HeaderParser
from email.utils import parsedate_to_datetime
from typing import Any

import pytest

from lightmail.outbound.dsn import (
    FULL_RETURN_LIMIT,
    RecipientStatus,
    build_dsn,
    is_bounce_loop,
    should_notify,
)

ORIGINAL = (b"Received: from client.example.org ([192.0.2.1])\r\n"
            b"\tby mail.example.org (LightMail) with ESMTP id Q1ABC;\r\n"
            b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
            b"From: Alice <alice@example.org>\r\n"
            b"To: bob@example.net\r\n"
            b"Subject: the plan\r\n"
            b"Message-ID: <plan@example.org>\r\n"
            b"\r\n"
            b"Line one.\r\n"
            b"--not-a-boundary\r\n"
            b"\r\n"
            b"Last line.\r\n")
HEADERS = ORIGINAL[:ORIGINAL.index(b"\r\n\r\n") + 2]
ARRIVAL = 1_700_000_000.0
NOW = 1_700_003_600.0

BOUNCE = RecipientStatus("bob@example.net", "failed", "5.1.1",
                         "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected",
                         orcpt="rfc822;bob@example.net", remote_mta="mx.example.net",
                         last_attempt=ARRIVAL + 60)


def dsn(**kwargs: Any) -> bytes:
    args: dict[str, Any] = dict(reporting_mta="mail.example.org",
                                original_sender="alice@example.org", queue_id="Q1ABC",
                                arrival=ARRIVAL, recipients=[BOUNCE], original=ORIGINAL,
                                ret="FULL", envid=None, now=NOW)
    args.update(kwargs)
    return build_dsn(**args)


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(raw: bytes) -> list[Any]:
    """The three body parts, as the email package reads them (Messages, typed loosely:
    the payload of each is a str, a list of Messages or bytes depending on its type)."""
    message = parse(raw)
    assert message.get_content_type() == "multipart/report"
    payload = message.get_payload()
    assert isinstance(payload, list) and len(payload) == 3
    return payload


def raw_parts(raw: bytes) -> list[tuple[bytes, bytes]]:
    """The (header, body) of each body part, cut out of the bytes by the boundary."""
    boundary = parse(raw).get_boundary()
    assert boundary
    delimiter = b"\r\n--" + boundary.encode()
    assert raw.endswith(delimiter + b"--\r\n")
    pieces = raw[:-len(delimiter + b"--\r\n")].split(delimiter)[1:]
    out = []
    for piece in pieces:
        assert piece.startswith(b"\r\n")
        header, _, body = piece[2:].partition(b"\r\n\r\n")
        out.append((header, body))
    return out


def status_blocks(raw: bytes) -> list[dict[str, str]]:
    """The message/delivery-status part as header blocks (RFC 3464 §2.1), parsed on
    its own: blocks separated by one blank line, each a valid RFC 5322 header."""
    _, body = raw_parts(raw)[1]
    assert body.endswith(b"\r\n") and not body.endswith(b"\r\n\r\n")
    blocks = body[:-2].split(b"\r\n\r\n")
    out = []
    for block in blocks:
        assert block and not block.startswith(b"\r\n")
        # UTF-8 in a global DSN (RFC 6533); the bytes parser would not decode it.
        text = block.decode("utf-8") + "\r\n\r\n"
        fields = HeaderParser(policy=email.policy.SMTPUTF8).parsestr(text)
        assert not fields.defects
        names = [name.lower() for name in fields]
        assert len(names) == len(set(names)), "a field appears twice in a block"
        out.append({name: str(value) for name, value in fields.items()})
    return out


def timestamp(value: str) -> float:
    return parsedate_to_datetime(value).timestamp()


# -- structure -------------------------------------------------------------------------------

def test_failure_dsn_structure_and_outer_header() -> None:
    raw = dsn()
    assert isinstance(raw, bytes)
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    message = parse(raw)
    assert [m.defects for m in message.walk()] == [[] for _ in message.walk()]
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@mail.example.org"
    assert message["To"].addresses[0].addr_spec == "alice@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert re.fullmatch(r"<[^<>@\s]+@mail\.example\.org>", message["Message-ID"])
    assert timestamp(message["Date"]) == NOW
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert "Content-Transfer-Encoding" not in message     # all 7-bit here
    text, status, returned = parts(raw)
    assert text.get_content_type() == "text/plain"
    assert text.get_content_charset() == "us-ascii"
    assert status.get_content_type() == "message/delivery-status"
    assert returned.get_content_type() == "message/rfc822"


def test_human_text_lists_recipient_with_diagnostic() -> None:
    text = parts(dsn())[0]
    assert isinstance(text, EmailMessage)
    body = text.get_content()
    assert "This is the mail system at host mail.example.org." in body
    assert "could not\r\nbe delivered to one or more recipients" in body
    assert ("<bob@example.net>: host mx.example.net said: 550 5.1.1 <bob@example.net>: "
            "Recipient address rejected") in body


def test_delivery_status_fields() -> None:
    raw = dsn(envid="QQ314159")
    # The email package's own reading of message/delivery-status: header blocks.
    status = parts(raw)[1]
    blocks: Any = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) == 2
    assert blocks[0]["Reporting-MTA"] == "dns; mail.example.org"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.net"
    # And ours, block by block.
    per_message, recipient = status_blocks(raw)
    assert per_message == {
        "Reporting-MTA": "dns; mail.example.org",
        "X-LightMail-Queue-ID": "Q1ABC",
        "X-LightMail-Sender": "rfc822; alice@example.org",
        "Original-Envelope-Id": "QQ314159",
        "Arrival-Date": per_message["Arrival-Date"],
    }
    assert timestamp(per_message["Arrival-Date"]) == ARRIVAL
    assert recipient == {
        "Final-Recipient": "rfc822; bob@example.net",
        "Original-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected",
        "Last-Attempt-Date": recipient["Last-Attempt-Date"],
    }
    assert timestamp(recipient["Last-Attempt-Date"]) == ARRIVAL + 60


def test_optional_fields_left_out() -> None:
    bare = RecipientStatus("bob@example.net", "failed", "5.0.0", None)
    per_message, recipient = status_blocks(dsn(recipients=[bare]))
    assert "Original-Envelope-Id" not in per_message
    assert set(recipient) == {"Final-Recipient", "Action", "Status"}
    assert "<bob@example.net>: delivery failed, status 5.0.0" in parts(
        dsn(recipients=[bare]))[0].get_payload()


def test_envid_and_orcpt_are_xtext_decoded() -> None:
    rcpt = RecipientStatus("bob@example.net", "failed", "5.1.1", "smtp; 550 no",
                           orcpt="rfc822;bob+2Bold@example.net")
    per_message, recipient = status_blocks(dsn(recipients=[rcpt], envid="id+3D7+2B1"))
    assert per_message["Original-Envelope-Id"] == "id=7+1"
    assert recipient["Original-Recipient"] == "rfc822; bob+old@example.net"
    # One made locally (never xtext-encoded) stays as it is.
    local = RecipientStatus("bob@example.net", "failed", "5.1.1", "smtp; 550 no",
                            orcpt="rfc822;bob+tag@example.net")
    assert status_blocks(dsn(recipients=[local]))[1]["Original-Recipient"] == \
        "rfc822; bob+tag@example.net"


def test_untyped_diagnostic_and_long_diagnostic() -> None:
    long_text = "550 5.7.1 " + " ".join(["rejected"] * 30)
    rcpts = [RecipientStatus("a@example.net", "failed", "5.4.4", "no route to host"),
             RecipientStatus("b@example.net", "failed", "5.7.1", f"smtp; {long_text}\r\n")]
    raw = dsn(recipients=rcpts)
    assert all(len(line) <= 78 for line in raw_parts(raw)[1][1].split(b"\r\n"))
    _, first, second = status_blocks(raw)
    assert first["Diagnostic-Code"] == "X-LightMail; no route to host"
    assert second["Diagnostic-Code"] == f"smtp; {long_text}"     # folded, unfolds back


# -- the returned message ----------------------------------------------------------------------

def test_ret_full_embeds_original_byte_for_byte() -> None:
    raw = dsn(ret="FULL")
    header, body = raw_parts(raw)[2]
    assert body == ORIGINAL
    assert b"Content-Type: message/rfc822" in header
    returned = parts(raw)[2]
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "the plan"
    assert inner["Message-ID"] == "<plan@example.org>"


def test_eight_bit_original_without_final_newline() -> None:
    original = (b"From: a@example.org\r\nSubject: caf\xc3\xa9\r\n\r\n"
                b"Gr\xfc\xdfe, invalid UTF-8 kept as it is\r\n\r\n--x\r\nno end")
    raw = dsn(original=original)
    header, body = raw_parts(raw)[2]
    assert body == original
    assert b"Content-Transfer-Encoding: 8bit" in header
    assert parse(raw)["Content-Transfer-Encoding"] == "8bit"


def test_bare_lf_original_gets_crlf() -> None:
    original = b"From: a@example.org\nSubject: x\n\nbody\n"
    assert raw_parts(dsn(original=original))[2][1] == original.replace(b"\n", b"\r\n")


def test_ret_hdrs_returns_header_block_only() -> None:
    raw = dsn(ret="HDRS")
    returned = parts(raw)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert raw_parts(raw)[2][1] == HEADERS
    assert b"Line one." not in raw


@pytest.mark.parametrize(("ret", "size", "full"), [
    (None, 1000, True),
    (None, FULL_RETURN_LIMIT + 1, False),
    ("FULL", FULL_RETURN_LIMIT + 1, True),
    ("full", 1000, True),
    ("HDRS", 1000, False),
])
def test_what_comes_back(ret: str | None, size: int, full: bool) -> None:
    original = HEADERS + b"\r\n" + b"x" * (size - len(HEADERS) - 4) + b"\r\n"
    raw = dsn(ret=ret, original=original)
    assert raw_parts(raw)[2][1] == (original if full else HEADERS)
    assert parts(raw)[2].get_content_type() == \
        ("message/rfc822" if full else "text/rfc822-headers")


def test_delay_notice_returns_headers_even_with_ret_full() -> None:
    delayed = RecipientStatus("bob@example.net", "delayed", "4.4.1",
                              "X-LightMail; connect to mx.example.net: Connection timed out",
                              last_attempt=NOW)
    raw = dsn(recipients=[delayed], ret="FULL")
    message = parse(raw)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert "THIS IS A WARNING ONLY" in parts(raw)[0].get_payload()
    assert raw_parts(raw)[2][1] == HEADERS
    assert status_blocks(raw)[1]["Action"] == "delayed"


def test_delay_notice_says_until_when_it_will_retry() -> None:
    until = ARRIVAL + 5 * 86400
    delayed = RecipientStatus("bob@example.net", "delayed", "4.4.1",
                              "smtp; 451 4.4.1 try later", remote_mta="mx.example.net",
                              last_attempt=NOW, will_retry_until=until)
    raw = dsn(recipients=[delayed])
    block = status_blocks(raw)[1]
    assert block["Action"] == "delayed" and block["Status"] == "4.4.1"
    assert parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == until
    text = " ".join(parts(raw)[0].get_payload().split())
    assert "keep trying until" in text and "THIS IS A WARNING ONLY" in text
    # Only a delayed recipient has it.
    failed = RecipientStatus("bob@example.net", "failed", "5.1.1", None,
                             will_retry_until=until)
    assert "Will-Retry-Until" not in status_blocks(dsn(recipients=[failed]))[1]


@pytest.mark.parametrize("action", ["delivered", "relayed", "expanded"])
def test_success_notice(action: str) -> None:
    ok = RecipientStatus("bob@example.net", action, "2.0.0",
                         "smtp; 250 2.0.0 Ok: queued as 4XyZ", remote_mta="mx.example.net")
    raw = dsn(recipients=[ok], ret="FULL")
    assert parse(raw)["Subject"] == "Successful Mail Delivery Report"
    assert "successfully delivered" in parts(raw)[0].get_payload()
    assert status_blocks(raw)[1]["Action"] == action
    assert parts(raw)[2].get_content_type() == "text/rfc822-headers"


# -- several recipients --------------------------------------------------------------------

def test_multiple_recipients() -> None:
    rcpts = [
        BOUNCE,
        RecipientStatus("carol@example.net", "delayed", "4.2.2",
                        "smtp; 452 4.2.2 Mailbox full", remote_mta="mx.example.net"),
        RecipientStatus("dave@example.com", "failed", "5.2.1", "smtp; 550 5.2.1 disabled",
                        orcpt="rfc822;d@example.com"),
    ]
    raw = dsn(recipients=rcpts)
    assert parse(raw)["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = status_blocks(raw)
    assert len(blocks) == 4
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks[1:]] == [
        ("rfc822; bob@example.net", "failed", "5.1.1"),
        ("rfc822; carol@example.net", "delayed", "4.2.2"),
        ("rfc822; dave@example.com", "failed", "5.2.1"),
    ]
    assert "Original-Recipient" not in blocks[2]
    assert blocks[3]["Original-Recipient"] == "rfc822; d@example.com"
    text = parts(raw)[0].get_payload()
    assert isinstance(text, str)
    assert "<carol@example.net>: host mx.example.net said: 452 4.2.2 Mailbox full" in text
    assert "<dave@example.com>: 550 5.2.1 disabled" in text
    assert text.index("<bob@") < text.index("<carol@") < text.index("<dave@")
    assert raw_parts(raw)[2][1] == ORIGINAL


# -- internationalized (RFC 6533) ----------------------------------------------------------

UTF8_ORIGINAL = ("From: Ålice <ålice@exämple.org>\r\nTo: 用户@例子.测试\r\n"
                 "Subject: 你好\r\n\r\nbody\r\n").encode()


def test_smtputf8_uses_global_types() -> None:
    rcpt = RecipientStatus("用户@例子.测试", "failed", "5.1.1",
                           "smtp; 550 5.1.1 unknown user", orcpt="utf-8;用户@例子.测试",
                           remote_mta="mx.例子.测试")
    raw = dsn(original_sender="ålice@exämple.org", recipients=[rcpt], original=UTF8_ORIGINAL,
              smtputf8=True)
    message = parse(raw)
    assert [m.defects for m in message.walk()] == [[] for _ in message.walk()]
    assert message.get_param("report-type") == "global-delivery-status"
    assert message["Content-Transfer-Encoding"] == "8bit"
    # The bytes parser leaves raw UTF-8 headers (RFC 6532) undecoded: read them as text.
    assert b"\r\nTo: <\xc3\xa5lice@ex\xc3\xa4mple.org>\r\n" in raw
    as_text = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert as_text["To"].addresses[0].addr_spec == "ålice@exämple.org"
    text, status, returned = parts(raw)
    assert status.get_content_type() == "message/global-delivery-status"
    assert returned.get_content_type() == "message/global"
    assert "<用户@例子.测试>: host mx.例子.测试 said: 550 5.1.1 unknown user" in \
        text.get_payload(decode=True).decode("utf-8")
    per_message, recipient = status_blocks(raw)
    assert per_message["X-LightMail-Sender"] == "utf-8; ålice@exämple.org"
    assert recipient["Final-Recipient"] == "utf-8; 用户@例子.测试"
    assert recipient["Original-Recipient"] == "utf-8; 用户@例子.测试"
    assert recipient["Remote-MTA"] == "dns; mx.例子.测试"
    assert raw_parts(raw)[2][1] == UTF8_ORIGINAL

    hdrs = dsn(original_sender="ålice@exämple.org", recipients=[rcpt],
               original=UTF8_ORIGINAL, smtputf8=True, ret="HDRS")
    assert parts(hdrs)[2].get_content_type() == "message/global-headers"


def test_smtputf8_with_ascii_addresses_stays_plain() -> None:
    raw = dsn(smtputf8=True)
    assert parse(raw).get_param("report-type") == "delivery-status"
    assert parts(raw)[1].get_content_type() == "message/delivery-status"


def test_non_ascii_address_without_smtputf8_is_escaped() -> None:
    rcpt = RecipientStatus("用户@example.net", "failed", "5.1.1", "smtp; 550 no")
    raw = dsn(recipients=[rcpt])
    status_header, status_body = raw_parts(raw)[1]
    assert status_body.isascii()
    assert b"message/delivery-status" in status_header
    assert status_blocks(raw)[1]["Final-Recipient"] == "utf-8; \\x{7528}\\x{6237}@example.net"


# -- the rules -------------------------------------------------------------------------------

@pytest.mark.parametrize(("notify", "action", "expected"), [
    (None, "failed", True),
    (None, "delayed", True),
    (None, "delivered", False),
    (None, "relayed", False),
    (None, "expanded", False),
    ("NEVER", "failed", False),
    ("NEVER", "delayed", False),
    ("NEVER", "delivered", False),
    ("SUCCESS", "delivered", True),
    ("SUCCESS", "relayed", True),
    ("SUCCESS", "expanded", True),
    ("SUCCESS", "failed", False),
    ("SUCCESS", "delayed", False),
    ("FAILURE", "failed", True),
    ("FAILURE", "delayed", False),
    ("FAILURE", "delivered", False),
    ("DELAY", "delayed", True),
    ("DELAY", "failed", False),
    ("SUCCESS,FAILURE", "failed", True),
    ("SUCCESS,FAILURE", "delivered", True),
    ("SUCCESS,FAILURE", "delayed", False),
    ("failure, delay", "delayed", True),
    ("SUCCESS,FAILURE,DELAY", "relayed", True),
])
def test_should_notify(notify: str | None, action: str, expected: bool) -> None:
    assert should_notify(notify, action) is expected


def test_should_notify_delay_default_and_errors() -> None:
    assert should_notify(None, "delayed", delay_by_default=False) is False
    assert should_notify(None, "failed", delay_by_default=False) is True
    with pytest.raises(ValueError):
        should_notify("SOMETIMES", "failed")
    with pytest.raises(ValueError):
        should_notify("SUCCESS", "bounced")


def test_bounce_loop() -> None:
    assert is_bounce_loop("") and is_bounce_loop("<>")
    assert not is_bounce_loop("alice@example.org")
    assert not is_bounce_loop("MAILER-DAEMON@example.org")
    with pytest.raises(ValueError):
        dsn(original_sender="")


@pytest.mark.parametrize("change", [
    {"recipients": []},
    {"recipients": [RecipientStatus("b@example.net", "bounced", "5.1.1", None)]},
    {"recipients": [RecipientStatus("b@example.net", "failed", "550", None)]},
    {"ret": "SOME"},
])
def test_bad_arguments(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dsn(**change)


def test_boundary_never_in_original() -> None:
    raw = dsn()
    boundary = parse(raw).get_boundary()
    assert boundary and boundary.encode() not in ORIGINAL
    assert dsn() != raw     # fresh Message-ID and boundary each time
