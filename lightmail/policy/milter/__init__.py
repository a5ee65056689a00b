"""A milter client: LightMail speaks the Sendmail milter protocol (version 6) to mail
filters written for Sendmail and Postfix (OpenDKIM, rspamd's proxy, ClamAV's milter)
from its inbound policy chain.

* :mod:`~lightmail.policy.milter.wire`: the packets, the negotiation, the answers;
* :mod:`~lightmail.policy.milter.client`: one connection, over Twisted;
* :mod:`~lightmail.policy.milter.check`: the chain's ``milter`` check, which maps the
  SMTP transaction onto the milter's commands and its answers onto replies and
  :class:`~lightmail.policy.inbound.Findings`.

Written here rather than taken from PyPI: ``pymilter`` and ``purepythonmilter`` (and
``kilter.protocol``, ``python-libmilter``) are for writing milters, the other side;
``miltertest`` speaks as an MTA but over blocking sockets (and is GPL-licensed).
"""
