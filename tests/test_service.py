"""The service tree in-process: start, deliver through the queue runner, stop in order."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import task

from lightmail.config import parse_config
from lightmail.service import LightMailService, get_services, makeService
from lightmail.storage.interfaces import DurableBlob, Envelope, QueueRecipient


@pytest_twisted.inlineCallbacks
def test_queued_mail_is_delivered_and_shutdown_is_orderly(tmp_path: Path) -> None:
    config = parse_config(f"[server]\nstate_dir = {tmp_path}\nnode_id = test-node\n",
                          str(tmp_path / "lm.conf"))
    root = makeService(config)
    assert isinstance(root, LightMailService)
    parts = get_services(root)
    from twisted.internet import reactor
    root.startService()
    try:
        yield parts.storage.ready
        yield parts.directory.add_domain("example.test")
        user = yield parts.directory.add_user("bob@example.test", None)
        ref = yield parts.blobs.put(b"Subject: queued\r\n\r\nHello\r\n")
        queue_id = yield parts.write_port.enqueue(
            Envelope("a@example.org", [QueueRecipient("bob@example.test")]),
            DurableBlob(ref))
        parts.queue_runner.kick()
        for _ in range(100):
            yield parts.queue_runner.idle()
            if not (yield parts.queue.list_recipients()):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        assert (yield parts.queue.list_recipients()) == [], queue_id
        inbox = yield parts.mailstore.get_mailbox(user.id, "INBOX")
        [message] = yield parts.mailstore.list_messages(inbox.id)
        assert message.blob_id == ref.id and message.uid == 1
    finally:
        yield root.stopService()
    assert not parts.storage.running and not parts.queue_runner.running
    assert not parts.storage.db.pool.started


def test_get_services_refuses_other_trees() -> None:
    from twisted.application.service import MultiService
    with pytest.raises(TypeError):
        get_services(MultiService())


@pytest_twisted.inlineCallbacks
def test_storage_failure_is_reported_not_hidden(tmp_path: Path) -> None:
    # A database that cannot be reached: ready fails and the root reports it.
    config = parse_config("[storage]\nurl = postgresql+psycopg://nobody@127.0.0.1:1/none\n"
                          f"[server]\nstate_dir = {tmp_path}\n", str(tmp_path / "lm.conf"))
    root = makeService(config)
    from twisted.internet import reactor
    assert reactor.running
    root.startService()
    try:
        reason = yield root.failed
        assert "storage failed" in reason
    finally:
        yield root.stopService()


@pytest_twisted.inlineCallbacks
def test_listeners_do_not_start_when_storage_fails(tmp_path: Path) -> None:
    config = parse_config("[storage]\nurl = postgresql+psycopg://nobody@127.0.0.1:1/none\n"
                          f"[server]\nstate_dir = {tmp_path}\n"
                          "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n",
                          str(tmp_path / "lm.conf"))
    root = makeService(config)
    root.startService()
    try:
        yield root.failed
        from twisted.internet import reactor
        yield task.deferLater(reactor, 0, lambda: None)   # the other waiters hear of it
        listener = root.getServiceNamed("listener:mx")
        assert listener.port is None
        assert listener.listening.called     # settled: it failed, no port came of it
        outcome: list[object] = []
        listener.listening.addBoth(outcome.append)
        assert outcome == [None]
    finally:
        yield root.stopService()
