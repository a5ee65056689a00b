"""What crosses a socket between LightMail's processes (lightmail.storage.wire): AMP
boxes whose record values name declared types only."""

from __future__ import annotations

import os
import pickle

import pytest
from twisted.protocols import amp

from lightmail.storage import wire
from lightmail.storage.interfaces import (
    BlobHandoff,
    BlobRef,
    Envelope,
    Filed,
    Filing,
    FilingTarget,
    Mailbox,
    MailboxChange,
    MessageInfo,
    NotFiled,
    QueueItem,
    QueueRecipient,
)


def test_records_go_and_come_back_as_they_were() -> None:
    ref = BlobRef("a" * 64, 5, b"Subject: x\r\n\r\n")
    envelope = Envelope("a@example.org", [QueueRecipient("b@example.test", "local")],
                        smtputf8=True)
    values = [
        ("accept", ([Filing((FilingTarget(1, "b@example.test", 10, "lists"),), "smtp/Q/0",
                             True)], ref), BlobHandoff(None, b"\r\n.\r\n\x00\xff", ref), True),
        ([Filed(("b@example.test/INBOX uid=1",), ())],
         [MailboxChange(1, 2, "appended", (1,), 3, (MessageInfo(
             2, 1, 3, "a" * 64, 5, 0, frozenset({"\\Seen"})),))]),
        QueueItem(7, "Q", QueueRecipient("b@example.test"), "a@example.org", ref, 0,
                  envelope),
    ]
    for value in values:
        again = wire.decode(wire.encode(value))
        assert again == value and type(again) is type(value)


@pytest.mark.parametrize("value", [os.system, Mailbox(1, 1, "INBOX", 1, 1, 1)])
def test_a_value_naming_an_undeclared_type_is_refused(value: object) -> None:
    # Pickled as such (a plain pickle), it names os.system or a record that is not
    # on the list: nothing is built from it.
    with pytest.raises(pickle.UnpicklingError, match="not a declared type"):
        wire.decode(pickle.dumps(value))


def test_boxes_are_read_whole_however_the_bytes_arrive() -> None:
    big = ("enqueue", (Envelope("a@b", []), BlobRef("c" * 64, 1), None),
           BlobHandoff("/tmp/x", b"y" * 200_000, BlobRef("c" * 64, 200_000)), False)
    data = wire.write_command(b"7", big) + wire.write_command(b"8", big)
    buf = bytearray()
    boxes = []
    for start in range(0, len(data), 4093):     # arbitrary cuts, keys and values too
        buf += data[start:start + 4093]
        boxes += wire.read_boxes(buf)
    assert not buf
    assert [wire.write_request(box) for box in boxes] == [(b"7", big), (b"8", big)]
    # Twisted's own AMP reads the same box as the Write command it declares.
    received: list[amp.AmpBox] = []

    class Boxes:
        def ampBoxReceived(self, box: amp.AmpBox) -> None:
            received.append(box)
    amp.BinaryBoxProtocol(Boxes()).dataReceived(data[:len(data) // 2])
    parsed = wire.Write.parseArguments(received[0], None)
    assert parsed == {"request": big}


def test_errors_come_back_as_declared_or_unknown() -> None:
    [box] = wire.read_boxes(bytearray(wire.write_error(b"3", NotFiled("over quota"))))
    tag, ok, error = wire.write_reply(box)
    assert (tag, ok, type(error), str(error)) == (b"3", False, NotFiled, "over quota")
    [box] = wire.read_boxes(bytearray(wire.write_error(b"4", KeyError("secret"))))
    tag, ok, error = wire.write_reply(box)
    assert isinstance(error, amp.UnknownRemoteError) and "secret" not in str(error)
    [box] = wire.read_boxes(bytearray(wire.write_answer(b"5", ("Q1", []))))
    assert wire.write_reply(box) == (b"5", True, ("Q1", []))
