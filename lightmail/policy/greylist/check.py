"""The inbound chain's ``greylist`` check, at each RCPT TO.

The first attempt of a (client network, sender, recipient) triplet is refused with
``451 4.7.1 Greylisted: try again in N seconds``; a real MTA retries, most spam
engines do not.  A retry after ``[greylist] delay`` passes, and the triplet passes
from then on (see store.py for the rules and expiries).

Not greylisted: authenticated sessions, trusted and allowlisted clients and senders
(``findings.allowlisted``, from the access check), client networks that passed
``auto_allow`` retries, and senders whose domain is on ``spf_pass_domains`` when
SPF passed for it (findings.spf: big senders that retry from another address
each time would otherwise wait for hours).

The null sender (bounces, DSNs) is greylisted too, with ``<>`` in the triplet (as
Postgrey does): a bounce is then greylisted by client and recipient.  Bounces come
from MTAs, which retry.

Every refusal is a log event (``event=greylisted``), and so is a retry that passes
(``event=greylist_passed``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lightmail.policy.greylist.store import Greylist, Rules, Triplet, Verdict, normalise_sender
from lightmail.policy.inbound.findings import Findings, InboundCheck
from lightmail.policy.limits.check import network_of
from lightmail.smtp.codes import Reply

log = Logger(namespace="lightmail.greylist")


class GreylistCheck(InboundCheck):
    name = "greylist"

    def __init__(self, greylist: Greylist, settings: Callable[[], Any]) -> None:
        self.greylist = greylist
        self.settings = settings        # the current [greylist] section
        self.failing = False            # said once, until an attempt succeeds

    def rcpt(self, session: Any, tx: Any, address: str,
             findings: Findings) -> Deferred[Any]:
        if session.account is not None or findings.allowlisted:
            return defer.succeed(None)
        cfg = self.settings()
        if spf_passed_for(findings.spf, cfg.spf_pass_domains):
            return defer.succeed(None)
        triplet = Triplet(network_of(session.peer),
                          normalise_sender(tx.mail_from) if tx.mail_from else "",
                          address.lower())
        rules = Rules(cfg.delay, cfg.unconfirmed_expiry, cfg.confirmed_expiry,
                      cfg.auto_allow)
        d = self.greylist.attempt(triplet, rules)

        def decide(verdict: Verdict) -> Optional[Reply]:
            if self.failing:
                self.failing = False
                log.info("greylisting works again")
            fields = dict(peer=session.peer, network=triplet.network,
                          sender=tx.mail_from, rcpt=address, why=verdict.why,
                          conn_id=session.conn_id)
            if verdict.wait <= 0:
                if verdict.why == "retried":
                    log.info("greylisting passed: {network} <{sender}> -> <{rcpt}> "
                             "retried after the delay", event="greylist_passed",
                             **fields)
                return None
            wait = max(1, math.ceil(verdict.wait))
            log.info("greylisted {network} <{sender}> -> <{rcpt}> ({why}): try again "
                     "in {wait} s", event="greylisted", wait=wait, **fields)
            return Reply(451, "4.7.1", f"Greylisted: try again in {wait} seconds")

        def failed(failure: Any) -> None:
            # The Redis store falls back by itself; this is the database away (or a
            # bug), which lets mail in rather than holding it: said once, not per
            # recipient.
            if not self.failing:
                self.failing = True
                log.failure("greylisting failed; letting recipients pass until it "
                            "works again", failure, conn_id=session.conn_id)
            return None
        return d.addCallbacks(decide, failed)


def spf_passed_for(spf: Any, domains: tuple[str, ...]) -> bool:
    """Whether SPF passed for the MAIL FROM domain and that domain is one of
    ``domains`` or below one of them."""
    if spf is None or not domains or spf.mail_from.result != "pass":
        return False
    domain = spf.mail_from.domain.lower().rstrip(".")
    return any(domain == listed or domain.endswith("." + listed) for listed in domains)
