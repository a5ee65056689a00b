"""The ARC check of the inbound chain: an adapter between the verifier
(lightmail.policy.arc) and the chain's content step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

from twisted.internet.defer import Deferred

from lightmail.policy.arc.verify import ARCResult, ARCVerifier, has_chain
from lightmail.policy.inbound.authresults import ResultClause
from lightmail.policy.inbound.findings import Findings, InboundCheck, Message
from lightmail.smtp.codes import Reply


class ARCCheck(InboundCheck):
    """RFC 8617 §5.2 on the whole message, after DKIM: the chain's verdict goes in
    ``findings.arc`` (DMARC reads it through :func:`trusted_pass`) and in
    Authentication-Results as ``arc=`` with ``header.oldest-pass`` (on pass) and
    ``smtp.remote-ip``, which a sealer copies into its ARC-Authentication-Results.
    A failed chain never refuses the message by itself: it is as if there were none.
    A DNS error on a chain whose newest sealer we trust defers it with 451 4.4.3
    (``[arc] temperror_action``)."""

    name = "arc"

    def __init__(self, verifier: ARCVerifier, settings: Callable[[], Any],
                 dkim_settings: Callable[[], Any]) -> None:
        self.verifier = verifier
        self.settings = settings              # the current [arc] section
        self.dkim_settings = dkim_settings    # [dkim]: the smallest RSA key accepted

    def content(self, session: Any, tx: Any, message: Message,
                findings: Findings) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._verify(session, message, findings))

    async def _verify(self, session: Any, message: Message,
                      findings: Findings) -> Optional[Reply]:
        cfg = self.settings()
        headers = await message.header_block()
        if has_chain(headers):
            data = await message.content()
            result = await self.verifier.verify(data, headers, cfg.max_instances,
                                                self.dkim_settings().verify_min_rsa_bits)
        else:
            result = ARCResult("none")
        findings.arc = dataclasses.replace(result, remote_ip=session.peer or "")
        if (result.temporary and cfg.temperror_action == "tempfail"
                and result.sealer in cfg.trusted_sealers):
            return Reply(451, "4.4.3", _one_line(
                f"ARC: {result.reason}; try again later"))
        return None

    def results(self, findings: Findings) -> list[ResultClause]:
        arc: Optional[ARCResult] = findings.arc
        if arc is None:
            return []
        properties = []
        if arc.result == "pass":
            properties.append(("header.oldest-pass", str(arc.oldest_pass)))
        if arc.remote_ip:
            properties.append(("smtp.remote-ip", arc.remote_ip))
        # The reason quotes dkimpy, whose texts hold quotes: not in a quoted-string.
        reason = arc.reason.replace('"', "'").replace("\\", "/")
        return [ResultClause("arc", arc.result, reason=reason,
                             properties=tuple(properties))]


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]

