"""kill -9 while mail goes out: nothing lost, at most the in-flight messages sent twice.

A `twistd lightmail` child relays numbered messages to a real Postfix (through a
catch-all alias that forwards to an external address), queued while that Postfix was
down, and is killed with SIGKILL several times in the middle of delivering them, then
restarted.  At the end every message that LightMail accepted is in the receiver's
Maildir at least once; a message can be there twice only if it was in flight at a kill
(SMTP allows that: the receiver's 250 and LightMail's record of it are not one atomic
step), and at most twice the destination concurrency are (being sent, or sent and
being recorded), so duplicates are bounded by kills x 2 x destination concurrency.
"""

from __future__ import annotations

import random
import re
import smtplib
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from harness import ServerProcess, free_port, run_cli
from test_outbound import ReceivingMX

COUNT = 60
KILLS = 3
CONCURRENCY = 2
LINE = "y" * 70 + "\r\n"


def received(mx: ReceivingMX) -> Counter[int]:
    numbers: Counter[int] = Counter()
    for message in mx.messages("sink@remote.test"):
        match = re.search(rb"Subject: out-(\d+)", message)
        assert match, message[:300]
        numbers[int(match.group(1))] += 1
    return numbers


def test_kill_9_during_outbound_delivery(write_config, tmp_path: Path) -> None:
    mx_port = free_port()
    mx = None
    config = write_config(
        "[server]\nstate_dir = state\nhostname = out.crash.test\nnode_id = crash-node\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n"
        f"[outbound]\nrelay_host = [127.0.0.1]:{mx_port}\nmin_backoff = 30s\n"
        f"max_backoff = 30s\ndestination_concurrency = {CONCURRENCY}\n")
    run_cli(config, "domain", "add", "crash.test")
    run_cli(config, "alias", "add", "*@crash.test", "sink@remote.test")
    server = ServerProcess(config)
    try:
        port = server.ports(expected=1)["mx"]
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            for number in range(COUNT):
                for _ in range(10):          # a busy machine may say 451: send again
                    try:
                        smtp.sendmail("sender@client.test", [f"n{number}@crash.test"],
                                      f"Subject: out-{number}\r\n\r\n{LINE * 40}".encode())
                        break
                    except smtplib.SMTPDataError as exc:
                        assert exc.smtp_code == 451, exc
                        time.sleep(0.5)
        # The receiver was down so far, and every message waits for its retry: a
        # backlog, so that the kills fall in the middle of the work (with the
        # receiver up, LightMail keeps up with the submissions).  Then it comes up
        # and `lightmail queue requeue` wakes the runner; the kills are timed from
        # the deliveries that LightMail logs (60 take a fraction of a second).
        mx = ReceivingMX(mx_port, ["sink@remote.test"])
        cli = subprocess.Popen([sys.executable, "-m", "lightmail.admin.cli", "--config",
                                str(config), "queue", "requeue", "--all"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rng = random.Random(7)
        at_kill = []
        outputs: list[str] = []

        def relayed() -> int:
            """Deliveries logged so far, by this server and those killed before."""
            return sum(out.count("status=delivered") for out in [*outputs, server.output])
        for _ in range(KILLS):
            # Kill while deliveries are going on: after some, before all, were sent.
            # (LightMail's log, not the receiver's Maildir, which lags behind.)
            target = relayed() + rng.randint(3, 10)
            deadline = time.monotonic() + 60
            while relayed() < min(target, COUNT) and time.monotonic() < deadline:
                time.sleep(0.002)
            at_kill.append(relayed())
            server.kill()
            outputs.append(server.output)
            server = ServerProcess(config)
            server.ports(expected=1)
        assert cli.wait(60) == 0, cli.stderr.read() if cli.stderr else ""
        deadline = time.monotonic() + 120
        while len(received(mx)) < COUNT and time.monotonic() < deadline:
            time.sleep(0.2)
        got = received(mx)
        # The kills fell in the middle of the work, not after it.
        assert any(0 < n < COUNT for n in at_kill), at_kill
        assert sorted(got) == list(range(COUNT)), (sorted(set(range(COUNT)) - set(got)))
        duplicates = sum(n - 1 for n in got.values())
        # In flight at a kill: up to CONCURRENCY messages being sent, and at most as
        # many whose 250 came back and whose record is being committed (the next
        # send does not wait for it, but a third one does: SMTPDeliveryAgent's
        # deliver_held).  Besides, one whose outcome could not be recorded at all
        # (the database busy on a loaded machine) is retried, as SMTP allows.
        unrecorded = sum(out.count("recording the delivery of")
                         for out in [*outputs, server.output])
        assert duplicates <= KILLS * 2 * CONCURRENCY + unrecorded, (got, unrecorded)
        # A re-sent message means some restart took back the leases of the one killed
        # before it (its log says so), whichever restart that was.
        took_back = any("took back" in out for out in [*outputs, server.output])
        assert took_back or duplicates == 0
    finally:
        server.kill()
        if mx is not None:
            mx.stop()
