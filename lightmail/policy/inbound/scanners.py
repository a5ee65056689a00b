"""The content scanners of the inbound chain: antivirus (ClamAV, [antivirus]) and
spam scoring (rspamd or spamd, [spam]), adapters between the scanners' clients
(lightmail.policy.clamav, .rspamd, .spamd) and the chain's content step.

A scanner that gives no answer (down, too slow, garbage) never loses a message
silently: per ``on_error`` the client is told to try again (451 4.7.1) or the
message goes on with a header field saying it was not scanned; either way the
event is logged with the connection and message ids.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.policy.inbound.findings import Findings, InboundCheck, Message
from lightmail.policy.interfaces import (
    IContentScanner,
    ISpamScanner,
    ScanResult,
    SpamRequest,
    SpamVerdict,
)
from lightmail.policy.scanclient import ScannerError
from lightmail.smtp.codes import Reply

log = Logger(namespace="lightmail.policy")

VIRUS_STATUS = "X-Virus-Status"
#: The fields the spam check writes (_tag, and X-Spam-Status alone when unscanned).
SPAM_FIELDS = ("X-Spam-Flag", "X-Spam-Score", "X-Spam-Status", "X-Spam-Symbols")
SPAM_STATUS = SPAM_FIELDS[2]
UNAVAILABLE = "try again later"


def _ids(session: Any, tx: Any) -> dict[str, str]:
    return {"conn_id": session.conn_id, "msg_id": tx.queue_id}


class AntivirusCheck(InboundCheck):
    """ClamAV on the whole message: an infected one is refused with 554 5.7.1 and
    the virus's name (``[antivirus] action = reject``) or filed in the quarantine
    folder (``quarantine``); every scanned message gets X-Virus-Status, and loses
    the one it came with (clamav-milter's ``AddHeader Replace``)."""

    name = "antivirus"
    verdict_fields = (VIRUS_STATUS,)

    def __init__(self, scanner: IContentScanner, settings: Any) -> None:
        self.scanner = scanner
        self.settings = settings      # a callable giving the current [antivirus]

    def content(self, session: Any, tx: Any, message: Message,
                findings: Findings) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._scan(session, tx, message, findings))

    async def _scan(self, session: Any, tx: Any, message: Message,
                    findings: Findings) -> Optional[Reply]:
        cfg = self.settings()
        if message.size > cfg.max_size:
            result = ScanResult("unscanned", reason=f"larger than {cfg.max_size} octets")
        else:
            data = await message.content()
            try:
                result = await self.scanner.scan(data)
            except ScannerError as exc:
                return self._no_answer(str(exc), cfg, session, tx, findings)
        ids = _ids(session, tx)
        if result.status == "infected":
            log.warn("antivirus: infected: {virus}; {action}", virus=result.name,
                     action=cfg.action, verdict="infected", **ids)
            if cfg.action == "reject":
                return Reply(554, "5.7.1", f"Message refused: virus found ({result.name})")
            findings.add_header(VIRUS_STATUS, f"Infected ({result.name})")
            findings.quarantine(cfg.quarantine_folder, f"virus {result.name}")
            return None
        if result.status == "unscanned":
            log.info("antivirus: not scanned: {reason}", reason=result.reason,
                     verdict="unscanned", **ids)
            findings.add_header(VIRUS_STATUS, f"Unscanned ({result.reason})")
            return None
        log.debug("antivirus: clean", verdict="clean", **ids)
        findings.add_header(VIRUS_STATUS, "Clean")
        return None

    def _no_answer(self, error: str, cfg: Any, session: Any, tx: Any,
                   findings: Findings) -> Optional[Reply]:
        log.warn("antivirus: no answer from the scanner: {error}; {on_error}",
                 error=error, on_error=cfg.on_error, verdict="error", **_ids(session, tx))
        if cfg.on_error == "tempfail":
            return Reply(451, "4.7.1", f"The virus scanner is not available, {UNAVAILABLE}")
        findings.add_header(VIRUS_STATUS, "Unscanned (scanner not available)")
        return None


# What a spam verdict's action does, by [spam] actions.
RESULTS = ("reject", "tempfail", "junk", "tag")


class SpamCheck(InboundCheck):
    """Spam scoring of the whole message: the scanner's action (rspamd's, or
    spamd's mapped onto them) does what ``[spam] actions`` says: reject (550
    5.7.1), tempfail (451 4.7.1: rspamd's greylist and soft reject), junk (filed in
    the Junk folder, with the X-Spam-* fields) or tag (the fields only).  The
    X-Spam-* fields a message came with are removed, all four whichever are written
    (rspamd's milter_headers ``remove``)."""

    name = "spam"
    verdict_fields = SPAM_FIELDS

    def __init__(self, scanner: ISpamScanner, settings: Any) -> None:
        self.scanner = scanner
        self.settings = settings      # a callable giving the current [spam]

    def content(self, session: Any, tx: Any, message: Message,
                findings: Findings) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._score(session, tx, message, findings))

    async def _score(self, session: Any, tx: Any, message: Message,
                     findings: Findings) -> Optional[Reply]:
        cfg = self.settings()
        ids = _ids(session, tx)
        if message.size > cfg.max_size:
            log.info("spam: not scanned: larger than {max_size} octets",
                     max_size=cfg.max_size, verdict="unscanned", **ids)
            findings.add_header(SPAM_STATUS, "Unscanned (too large)")
            return None
        data = await message.content()
        request = SpamRequest(
            client_address=session.peer, helo=session.helo or "", mail_from=tx.mail_from,
            recipients=[address for address, _ in tx.accepted],
            queue_id=tx.queue_id or "",
            user=session.account.user.address if session.account is not None else "")
        try:
            verdict = await self.scanner.check(data, request)
        except ScannerError as exc:
            log.warn("spam: no answer from {backend}: {error}; {on_error}",
                     backend=self.scanner.name, error=str(exc), on_error=cfg.on_error,
                     verdict="error", **ids)
            if cfg.on_error == "tempfail":
                return Reply(451, "4.7.1", f"The spam scanner is not available, {UNAVAILABLE}")
            findings.add_header(SPAM_STATUS, "Unscanned (scanner not available)")
            return None
        result = dict(cfg.actions).get(verdict.action, "tag")
        log.info("spam: {action} (score {score} of {required}): {result}",
                 action=verdict.action, score=verdict.score,
                 required=verdict.required_score, result=result, verdict="scored",
                 symbols=" ".join(verdict.symbols[:50]), **ids)
        if result == "reject":
            return Reply(550, "5.7.1", _one_line(verdict.message
                                                  or "Message refused as spam"))
        if result == "tempfail":
            return Reply(451, "4.7.1", _one_line(verdict.message
                                                  or f"Not accepted yet, {UNAVAILABLE}"))
        _tag(findings, verdict, self.scanner.name, flagged=verdict.action != "no action")
        if result == "junk":
            findings.quarantine(cfg.junk_name, f"spam ({verdict.action}, "
                                               f"score {verdict.score:g})")
        return None


def _tag(findings: Findings, verdict: SpamVerdict, backend: str, flagged: bool) -> None:
    """The X-Spam-* fields, in SpamAssassin's and rspamd's milter's manner."""
    flag, score, status, symbols = SPAM_FIELDS
    findings.add_header(flag, "YES" if flagged else "NO")
    findings.add_header(score, f"{verdict.score:g}")
    findings.add_header(
        status,
        f"{'Yes' if flagged else 'No'}, score={verdict.score:g} "
        f"required={verdict.required_score:g} action={verdict.action.replace(' ', '_')} "
        f"scanner={backend}")
    if verdict.symbols:
        findings.add_header(symbols, _one_line(", ".join(verdict.symbols))[:900])


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]
