"""SelectedMailbox: announced changes taken in without a read, gaps falling back."""

from lightmail.imap.selected import SelectedMailbox
from lightmail.storage.interfaces import Mailbox, MailboxChange, MessageInfo


def info(uid: int, modseq: int, *flags: str) -> MessageInfo:
    return MessageInfo(1, uid, modseq, "0" * 64, 10, 0, frozenset(flags))


def selected() -> SelectedMailbox:
    box = Mailbox(1, 1, "INBOX", 7, uidnext=3, highestmodseq=5)
    return SelectedMailbox(box, [info(1, 2), info(2, 5)], readonly=False,
                           first_recent=1 << 62)


def test_contiguous_changes_are_applied_without_a_read() -> None:
    sel = selected()
    sel.hear(MailboxChange(1, 1, "appended", (3,), 6, (info(3, 6),)))
    sel.hear(MailboxChange(1, 1, "flags", (1, 3), 8, (info(1, 7, "\\Seen"),
                                                        info(3, 8, "\\Seen"))))
    sel.hear(MailboxChange(1, 1, "expunged", (2,), 9))
    assert not sel.dirty
    updates = sel.apply(sel.take_pending(), allow_expunge=True)
    assert sel.uids == [1, 3] and sel.modseq == 9 and sel.uidnext == 4
    # EXPUNGE 2 is sent first, so EXISTS is the count after it (the client had two,
    # one went, one came): 2.  Saying 3 made clients think a message was missing.
    assert updates.expunged == [2] and updates.exists == 2
    assert sel.info[1].flags == {"\\Seen"} and sel.info[3].modseq == 8


def test_appended_then_expunged_is_never_told() -> None:
    sel = selected()
    sel.hear(MailboxChange(1, 1, "appended", (3,), 6, (info(3, 6),)))
    sel.hear(MailboxChange(1, 1, "expunged", (3,), 7))
    updates = sel.apply(sel.take_pending(), allow_expunge=True)
    assert sel.uids == [1, 2] and updates.exists is None and not updates.expunged


def test_a_gap_or_missing_content_needs_a_read() -> None:
    sel = selected()
    sel.hear(MailboxChange(1, 1, "expunged", (2,), 7))      # 6 was not heard of
    assert sel.dirty and not sel.pending
    sel.hear(MailboxChange(1, 1, "expunged", (1,), 8))      # still dirty
    assert sel.dirty and not sel.pending
    sel = selected()
    sel.hear(MailboxChange(1, 1, "appended", (3,), 6))       # no content
    assert sel.dirty
    sel = selected()
    sel.reading = True
    sel.hear(MailboxChange(1, 1, "expunged", (2,), 6))
    assert sel.dirty and not sel.pending


def test_recent_from_first_recent_uid() -> None:
    box = Mailbox(1, 1, "INBOX", 7, uidnext=4, highestmodseq=5)
    sel = SelectedMailbox(box, [info(1, 2), info(2, 3), info(3, 5)], readonly=False,
                          first_recent=2)
    assert sel.recent == {2, 3} and sel.flags_of(2) == {"\\Recent"}
    assert sel.number_of(3) == 3 and sel.info[1].modseq == 2


def test_hub_tells_select_of_changes_announced_during_its_read() -> None:
    from lightmail.imap import hub as hubs
    hub = hubs.MailboxHub()
    mark = hub.announced
    assert not hub.missed_since(mark, 1, 5)
    hub.mailbox_changed(MailboxChange(1, 2, "appended", (9,), 9))     # another box
    hub.mailbox_changed(MailboxChange(1, 1, "flags", (1,), 5))        # already read
    assert not hub.missed_since(mark, 1, 5)
    hub.mailbox_changed(MailboxChange(1, 1, "expunged", (1,), 6))
    assert hub.missed_since(mark, 1, 5) and not hub.missed_since(mark + 3, 1, 5)
    hub.mailbox_changed(MailboxChange(1, 1, "deleted"))
    assert hub.missed_since(mark + 3, 1, 5)
    for n in range(hubs.RECENT_CHANGES + 1):     # too many to tell: assume the worst
        hub.mailbox_changed(MailboxChange(1, 2, "flags", (1,), 10 + n))
    assert hub.missed_since(mark, 3, 5)


def test_sequence_set_selects_sorted_uids_by_bisection() -> None:
    from lightmail.imap.sequence import parse_sequence_set
    uids = [2, 4, 5, 9, 12, 40]
    assert parse_sequence_set("5:10,1,3:4,*").select_sorted(uids, 40) == [4, 5, 9, 40]
    assert parse_sequence_set("12:3,4:5").select_sorted(uids, 40) == [4, 5, 9, 12]
    assert parse_sequence_set("41:*").select_sorted(uids, 40) == [40]
    assert parse_sequence_set("13:39").select_sorted(uids, 40) == []


def test_uid_sets_come_in_ranges() -> None:
    from lightmail.imap.sequence import format_copyuid, format_sequence, formatting_sequence
    from lightmail.storage.interfaces import Copied
    assert format_sequence([7, 1, 2, 3, 3, 9, 8]) == "1:3,7:9"
    assert format_sequence(iter([4, 5, 10])) == "4:5,10" and format_sequence([]) == ""
    steps = formatting_sequence(list(range(1, 10)) + [12, 13, 15], step=3)
    assert list(steps) == [None] * 4
    steps = formatting_sequence(list(range(1, 10)) + [12, 13, 15], step=3)
    try:
        while True:
            next(steps)
    except StopIteration as done:
        assert done.value == "1:9,12:13,15"      # runs joined across steps
    # RFC 4315 §3: the n-th source UID went to the n-th new one; both ascending.
    copied = Copied.of(7, [1, 2, 3, 7], first_new=10)
    assert format_copyuid(copied.source, copied.target) == "1:3,7 10:13"
    assert copied.pairs == ((1, 10), (2, 11), (3, 12), (7, 13))
    assert Copied.of(7, [], first_new=10).source == ()


def test_many_expunges_are_numbered_as_sent() -> None:
    # Each EXPUNGE renumbers the messages after it: ascending, each number is its
    # place less the expunges told before it.  Over 64 the view is rebuilt at once.
    for count in (5, 300):
        box = Mailbox(1, 1, "INBOX", 7, uidnext=2 * count + 1, highestmodseq=2 * count)
        sel = SelectedMailbox(box, [info(uid, uid) for uid in range(1, 2 * count + 1)],
                              readonly=False, first_recent=1)
        gone = tuple(range(2, 2 * count + 1, 2))            # every even UID
        sel.hear(MailboxChange(1, 1, "expunged", gone, 2 * count + 1))
        updates = sel.apply(sel.take_pending(), allow_expunge=True)
        assert updates.expunged == list(gone)
        assert updates.expunged_numbers == list(range(2, count + 2))
        assert sel.uids == list(range(1, 2 * count + 1, 2)) and set(sel.info) == set(sel.uids)
        assert sel.recent == set(sel.uids) and not sel.gone


def test_a_change_without_its_uids_needs_a_read() -> None:
    # (A worker relays a change too big for AMP without its UIDs.)
    from lightmail.workers import control
    sel = selected()
    sel.hear(MailboxChange(1, 1, "expunged", (), 6))
    assert sel.dirty
    big = MailboxChange(1, 1, "expunged", tuple(range(1, 100_001)), 6)
    relayed = control.decode_change(control.encode_change(big))
    assert relayed.uids == () and relayed.modseq == 6 and relayed.kind == "expunged"
