"""ARC, the Authenticated Received Chain (RFC 8617), through dkimpy: verifying the
chain a message arrives with, and sealing what LightMail forwards.

Each forwarder that handles a message may add an *ARC set*: its Authentication-
Results as an ``ARC-Authentication-Results`` field (AAR), an ``ARC-Message-
Signature`` (AMS, a DKIM signature of the message as it was then) and an
``ARC-Seal`` (AS, a signature over the ARC sets so far, with ``cv=``, what that
forwarder found of the chain before it).  A receiver whose SPF and DKIM broke on
the way (a mailing list changed the subject, a forwarder's address is not in the
sender's SPF record) can then trust what the newest sealer found, if it trusts
that sealer: ``[arc] trusted_sealers``; DMARC reads :func:`trusted_pass`.

* :mod:`lightmail.policy.arc.verify`: :class:`ARCVerifier`, the chain's verdict
  (``none``, ``pass``, ``fail``; RFC 8617 §5.2) as an :class:`ARCResult`, with
  every key fetched by the asynchronous resolver first and dkimpy run in a thread
  (as DKIM verification, lightmail.policy.dkimverify).  The inbound check that
  uses it is lightmail.policy.inbound.arc.
* :mod:`lightmail.policy.arc.seal`: :class:`ARCSealer`, the outbound delivery
  agent's header source that adds our ARC set to mail that came in from outside
  and leaves again (``[arc] seal``, off by default).
"""

from lightmail.policy.arc.seal import ARCSealer, load_seal_key, load_sealer
from lightmail.policy.arc.verify import ARCResult, ARCVerifier, trusted_pass

__all__ = ["ARCResult", "ARCSealer", "ARCVerifier", "load_seal_key", "load_sealer",
           "trusted_pass"]
