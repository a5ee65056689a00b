"""A private Postfix instance for tests and benchmarks (Debian's postfix package).

Each instance has its own config, queue and data directories under a temporary
directory, listens on loopback ports of the caller's choosing, logs to its own
standard output (``maillog_file = /dev/stdout``) and runs in the foreground
(``postfix start-fg``) as a child process, so it dies with the test.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
MASTER_CF = Path("/etc/postfix/master.cf")


def require_postfix() -> None:
    if not (os.path.exists(POSTFIX) and MASTER_CF.exists()):
        raise AssertionError("Postfix is not installed: run scripts/test-peers.sh "
                             "(part of `make test`)")


class PostfixInstance:
    """``main`` holds extra main.cf settings; ``services`` extra master.cf lines."""

    def __init__(self, base: Path | None, smtp_port: int,
                 main: dict[str, str] | None = None, services: tuple[str, ...] = ()) -> None:
        require_postfix()
        # Postfix's daemons run as the postfix user and must reach their directories:
        # pytest's tmp_path (mode 0700, root) is out of reach, so the instance gets a
        # directory of its own (``base`` is ignored, kept for the callers' symmetry).
        del base
        self.base = Path(tempfile.mkdtemp(prefix="lightmail-postfix-"))
        os.chmod(self.base, 0o755)
        base = self.base
        self.port = smtp_port
        self.etc = base / "etc"
        for sub in ("etc", "spool", "lib"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        postfix_uid = pwd.getpwnam("postfix").pw_uid
        os.chown(base / "lib", postfix_uid, -1)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(base / "spool"),
            "data_directory": str(base / "lib"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "maillog_file": "/dev/stdout",
            "alias_maps": "",
            "alias_database": "",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtp_dns_support_level": "disabled",
            "disable_dns_lookups": "yes",
            "smtputf8_enable": "yes",
            **(main or {}),
        }
        (self.etc / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in settings.items()))
        lines = []
        for line in MASTER_CF.read_text().splitlines():
            if line.startswith("smtp ") and " inet " in line:
                line = f"127.0.0.1:{smtp_port} inet n - n - - smtpd"
            fields = line.split()
            if line[:1].isalnum() and len(fields) >= 8 and fields[4] == "y":
                # No chroot (Debian's default): the private queue directory holds no
                # copy of /etc, and LMTP must reach sockets outside it.
                fields[4] = "n"
                line = " ".join(fields)
            lines.append(line)
        lines.extend(services)
        (self.etc / "master.cf").write_text("\n".join(lines) + "\n")
        self.log = (base / "postfix.log").open("w")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        check = subprocess.run([POSTFIX, "-c", str(self.etc), "check"],
                               capture_output=True, text=True, timeout=60)
        if check.returncode:
            raise AssertionError(f"postfix check failed: {check.stdout}{check.stderr}")
        self.proc = subprocess.Popen([POSTFIX, "-c", str(self.etc), "start-fg"],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise AssertionError(f"Postfix did not start:\n{self.logtext()}")

    def logtext(self) -> str:
        self.log.flush()
        return (self.base / "postfix.log").read_text(errors="replace")

    def queued(self) -> int:
        """How many messages Postfix still holds (not yet relayed)."""
        spool = self.base / "spool"
        return sum(1 for sub in ("incoming", "active", "deferred", "maildrop")
                   for path in (spool / sub).rglob("*") if path.is_file())

    def stop(self) -> None:
        if self.proc is None:
            shutil.rmtree(self.base, ignore_errors=True)
            return
        subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], capture_output=True,
                       timeout=60)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)
