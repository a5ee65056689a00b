"""Embedding LightMail in another Twisted application.

Run:  python docs/examples/embed.py CONFIG [HTTP-PORT]

The application below has a service of its own (a tiny web page that counts the
messages in the demo user's INBOX) and runs LightMail's whole service tree beside it,
under one MultiService, in one reactor.  SIGINT/SIGTERM stop both cleanly.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import internet, service
from twisted.internet import defer, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web import resource, server

from lightmail.config import load_config
from lightmail.service import get_services, makeService, validate


class InboxCount(resource.Resource):
    """GET / -> how many messages the given user has in INBOX."""

    isLeaf = True

    def __init__(self, services: Any, address: str) -> None:
        super().__init__()
        self.services = services
        self.address = address

    def render_GET(self, request: Any) -> Any:
        @defer.inlineCallbacks
        def count() -> Any:
            user = yield self.services.directory.get_user(self.address)
            if user is None:
                return b"no such user\n"
            box = yield self.services.mailstore.get_or_create_mailbox(user.id, "INBOX")
            messages = yield self.services.mailstore.list_messages(box.id)
            return f"{self.address}: {len(messages)} messages in INBOX\n".encode()

        def reply(body: bytes) -> None:
            request.write(body)
            request.finish()

        count().addCallback(reply)
        return server.NOT_DONE_YET


def main(config_path: str, http_port: int = 8080) -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    app = service.MultiService()
    lightmail = makeService(load_config(config_path, validators=validate))
    lightmail.setServiceParent(app)
    site = server.Site(InboxCount(get_services(lightmail), "demo@example.test"))
    internet.TCPServer(http_port, site, interface="127.0.0.1").setServiceParent(app)
    app.startService()
    reactor.addSystemEventTrigger("before", "shutdown", app.stopService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8080)
