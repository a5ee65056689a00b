"""The inbound policy chain: the checks a message meets between the SMTP protocol and
its acceptance (SPF, DKIM, DMARC, ARC; abuse defence plugs in the same way).

The chain sits in the handler seam (:class:`lightmail.smtp.policy.SMTPHandler`): each
SMTP listener gets one :class:`InboundPolicy`, made when its factory is built from
the listener's ``checks`` (``[listener:NAME] checks``), so which checks run is
decided once.  Every check is an :class:`IInboundCheck` and meets each step of a
transaction:

* ``mail``: after MAIL FROM (SPF looks at the client, HELO and sender here);
* ``content``: once the whole message is in, staged but not yet durable (DKIM
  verifies, DMARC weighs SPF and DKIM);
* ``results``: what it found, as Authentication-Results entries (RFC 8601);
* ``session_ended``: the SMTP session is over (a milter's connection is closed).

A step answers ``None`` to let the message go on, or a :class:`~lightmail.smtp.codes.Reply`
that refuses it (the first refusal ends the chain).  What the checks find goes in the
transaction's :class:`Findings`, which later checks read (DMARC reads SPF's and
DKIM's) and where a check may ask for the message to be filed in another folder
(quarantine).  After the content step the chain writes one Authentication-Results
header field on top of the message and removes those from outside that claim our
authserv-id (RFC 8601 §5), which makes a new staged blob: blobs are immutable.  In
the same rewrite go the fields from outside named as a check's verdict
(``IInboundCheck.verdict_fields``: X-Spam-Status, X-Virus-Status, X-DNSBL...), for
each check the listener runs, so that a sender cannot pre-mark its mail clean.  The
header edits and the new body a check asked for (``Findings.header_edits``,
``Findings.body``: a milter's) are made in that same rewrite; the envelope changes and
a discard (``Findings.added_recipients``, ``removed_recipients``, ``new_sender``,
``discarded``) are the SMTP handler's to apply.
"""

from lightmail.policy.inbound.chain import InboundPolicy, build_checks
from lightmail.policy.inbound.findings import Findings, IInboundCheck, InboundCheck

__all__ = ["Findings", "IInboundCheck", "InboundCheck", "InboundPolicy", "build_checks"]
