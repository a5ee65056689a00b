"""The PROXY protocol (HAProxy's, versions 1 and 2) on LightMail's listeners.

A TCP load balancer (HAProxy, Postfix's postscreen, a cloud's balancer) connects to
the server itself: without more, every session would see its address.  With
``[listener:NAME] proxy_protocol`` it begins each connection with a header that names
the client it stands for, and the session, the logs, the connection limits, the
access lists, SPF, Received: and Authentication-Results see that client.

- :mod:`lightmail.proxyproto.header`: reading a header (v1 text, v2 binary; HAProxy's
  proxy-protocol.txt), with no I/O;
- :mod:`lightmail.proxyproto.listener`: whom a listener trusts to send one, and the
  protocol in front of the listener's own (and of its TLS: the header comes first).
"""
