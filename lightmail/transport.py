"""Writing a reply to a client without a trip through the reactor when it fits.

Twisted's ``transport.write`` only buffers: it registers the socket for writing
(``epoll_ctl``), and the next reactor turn sends the buffer and unregisters it again
(another ``epoll_ctl``).  A mail session writes a short reply to a client that waits
for it, several times per message (SMTP: greeting, EHLO, MAIL, RCPT, DATA, the final
250, QUIT), so those two system calls and the extra turn were a quarter of the
reactor's system time under load.  :func:`write_at_once` sends at once when the
transport is a plain TCP or Unix socket with nothing queued before it; whatever the
socket does not take (or anything else: TLS, a wrapped transport, a connection being
closed) goes through ``transport.write`` as before, so order, flow control
(producers) and error handling stay Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp, unix

from lightmail.proxyproto.listener import ProxiedConnection

_DIRECT = (tcp.Server, unix.Server)


def write_at_once(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent straight to the socket where that is safe."""
    if type(transport) is ProxiedConnection:
        # Behind a PROXY header: its write is the socket's.
        transport = transport.transport
    if (type(transport) in _DIRECT and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._writeDisconnected
            and not transport._tempDataLen and not transport.dataBuffer):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # The connection is going: let Twisted's write path notice and report it.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)

