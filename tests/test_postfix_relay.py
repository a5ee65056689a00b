"""A real Postfix relays mail to LightMail's MX, as an upstream MTA or a smarthost would.

Postfix's SMTP client is a demanding peer: it pipelines, sends DSN parameters (NOTIFY,
ORCPT, ENVID, RET) because LightMail offers DSN, and reads enhanced status codes.
"""

from __future__ import annotations

import re
import smtplib
import time
from pathlib import Path

from harness import ServerProcess, free_port, inbox_subjects, run_cli
from postfix import PostfixInstance


def test_postfix_relays_into_lightmail_mailboxes(write_config, tmp_path: Path) -> None:
    config = write_config(
        "[server]\nstate_dir = state\nhostname = mx.relay.test\n"
        "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n")
    run_cli(config, "domain", "add", "relay.test")
    run_cli(config, "user", "add", "alice@relay.test", "--no-password")
    run_cli(config, "user", "add", "bob@relay.test", "--no-password")
    run_cli(config, "alias", "add", "team@relay.test", "alice@relay.test")
    run_cli(config, "alias", "add", "team@relay.test", "bob@relay.test")
    server = ServerProcess(config)
    postfix = None
    try:
        lm_port = server.ports(expected=1)["mx"]
        pf_port = free_port()
        postfix = PostfixInstance(tmp_path / "postfix", pf_port, main={
            "relayhost": f"[127.0.0.1]:{lm_port}",
            "myhostname": "upstream.test",
        })
        postfix.start()
        with smtplib.SMTP("127.0.0.1", pf_port, timeout=30) as smtp:
            for number in range(10):
                rcpt = "alice@relay.test" if number % 2 else "bob@relay.test"
                smtp.sendmail("sender@client.test", [rcpt],
                              f"From: sender@client.test\r\nTo: {rcpt}\r\n"
                              f"Subject: relayed-{number}\r\n\r\nBody {number}\r\n".encode(),
                              rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
            smtp.sendmail("sender@client.test", ["team@relay.test"],
                          b"From: sender@client.test\r\nSubject: relayed-team\r\n\r\nHi all\r\n")
            smtp.sendmail("sender@client.test", ["nobody@relay.test"],
                          b"From: sender@client.test\r\nSubject: relayed-lost\r\n\r\nNo\r\n")
        state = tmp_path / "state"
        deadline = time.monotonic() + 90
        found: dict[str, list[str]] = {}
        while time.monotonic() < deadline:
            found = inbox_subjects(state)
            if len(found) >= 11 and "said: 550 5.1.1" in postfix.logtext():
                break
            time.sleep(0.3)
        for number in range(10):
            owner = "alice" if number % 2 else "bob"
            assert found.get(f"relayed-{number}") == [f"{owner}/INBOX"], (
                found, postfix.logtext())
        assert sorted(found["relayed-team"]) == ["alice/INBOX", "bob/INBOX"]
        assert "relayed-lost" not in found
        log = postfix.logtext()
        assert log.count("status=sent (250 2.0.0") >= 11, log
        # Postfix saw LightMail's reply for the unknown user, with its enhanced code.
        assert re.search(r"nobody@relay\.test.*said: 550 5\.1\.1", log), log
    finally:
        if postfix is not None:
            postfix.stop()
        server.kill()
